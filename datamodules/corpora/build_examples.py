"""Build the embedded example sets from the embedded corpus (janeausten.jsonl.gz), deterministically.

    python datamodules/corpora/build_examples.py      # rewrites the files below, byte for byte the same

- ``austen_classify.jsonl.gz``: ``{"text", "label"}`` rows, a passage and the novel it comes from (six labels,
  the same number of passages each); ``data=classify`` reads it when ``data.paths`` is null.
- ``austen_sft.jsonl.gz``: instruction rows ``{"instruction", "input"?, "response"}`` (continue a passage; name the
  novel of a passage) and chat rows ``{"messages": [...]}`` (name the novel, then its author and year);
  ``data=sft`` reads it when ``data.paths`` is null.
- ``austen_preference.jsonl.gz``: the SFT set as preference pairs, the true answer chosen and another question's
  answer of the same kind rejected (another novel, another passage's next sentence, another year): ``{"prompt",
  "chosen", "rejected"}`` rows from the instruction rows, TRL's conversational ``{"chosen": [...], "rejected":
  [...]}`` from the chat rows; ``data=preference`` reads it when ``data.paths`` is null.

A passage is one or more consecutive paragraphs (hard line wraps joined), cut at a sentence end. Passages are
drawn at evenly spread places of each novel, so each set covers the whole book; the same text is never used
twice within one set. The novels are public domain (see LICENSE.md).
"""

from __future__ import annotations

import gzip
import io
import json
import random
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "janeausten.jsonl.gz"
CLASSIFY = HERE / "austen_classify.jsonl.gz"
SFT = HERE / "austen_sft.jsonl.gz"
PREFERENCE = HERE / "austen_preference.jsonl.gz"

TITLES = {
    "emma": ("Emma", 1815),
    "mansfieldpark": ("Mansfield Park", 1814),
    "northangerabbey": ("Northanger Abbey", 1817),
    "persuasion": ("Persuasion", 1817),
    "prideprejudice": ("Pride and Prejudice", 1813),
    "sensesensibility": ("Sense and Sensibility", 1811),
}
CLASSIFY_PER_NOVEL = 400
SFT_PER_NOVEL = {"novel": 100, "continue": 100, "chat": 50}
SEED = 0

_ABBREVIATIONS = re.compile(r"\b(Mr|Mrs|Dr|St|Col|Capt)\.")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[.!?][\"'])\s+")


def paragraphs(text: str) -> list[str]:
    """Paragraphs of prose: blank-line separated blocks, wraps joined; headings and short lines dropped."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        para = " ".join(block.split())
        if len(para) >= 80 and sum(c.isupper() for c in para) < 0.5 * sum(c.isalpha() for c in para):
            out.append(para)
    return out


def sentences(para: str) -> list[str]:
    protected = _ABBREVIATIONS.sub(lambda m: m.group(1) + "\0", para)
    return [s.replace("\0", ".") for s in _SENTENCE_END.split(protected) if s.strip()]


def passage_at(sents: list[str], start: int, min_chars: int, max_chars: int) -> tuple[str, int] | None:
    """Sentences from ``start`` until at least ``min_chars`` (never above ``max_chars``); and the index after."""
    text, i = "", start
    while i < len(sents) and len(text) < min_chars:
        candidate = f"{text} {sents[i]}".strip()
        if len(candidate) > max_chars:
            break
        text, i = candidate, i + 1
    return (text, i) if len(text) >= min_chars else None


def novels() -> dict[str, list[str]]:
    """Each novel (by its key in the corpus) as its paragraphs, each a list of sentences."""
    out = {}
    with gzip.open(CORPUS, "rt", encoding="utf-8") as f:
        for line in f:
            book = json.loads(line)
            out[book["title"]] = [sentences(p) for p in paragraphs(book["text"])]
    return out


def spread(n_items: int, k: int, rng: random.Random) -> list[int]:
    """k positions spread over 0..n_items-1, one drawn at random within each of k equal slices."""
    edges = [round(i * n_items / k) for i in range(k + 1)]
    return [rng.randrange(edges[i], max(edges[i] + 1, edges[i + 1])) for i in range(k)]


def classify_rows(books: dict[str, list[list[str]]], rng: random.Random) -> list[dict]:
    rows = []
    for key, paras in books.items():
        candidates = [p for p in (passage_at(s, 0, 200, 500) for s in paras) if p]
        picked = sorted(set(spread(len(candidates), CLASSIFY_PER_NOVEL, rng)))
        rows += [{"text": candidates[i][0], "label": TITLES[key][0]} for i in picked]
    rng.shuffle(rows)
    return rows


def sft_rows(books: dict[str, list[list[str]]], rng: random.Random) -> list[dict]:
    rows = []
    for key, paras in books.items():
        title, year = TITLES[key]
        n = sum(SFT_PER_NOVEL.values())
        places = spread(len(paras), 3 * n, rng)  # spare places: some paragraphs are too short for a task
        rng.shuffle(places)
        made = dict.fromkeys(SFT_PER_NOVEL, 0)
        for i in places:
            sents = paras[i]
            task = next((t for t, k in SFT_PER_NOVEL.items() if made[t] < k), None)
            if task is None:
                break
            if task == "continue":
                head = passage_at(sents, 0, 120, 350)
                if head is None or head[1] >= len(sents) or len(sents[head[1]]) > 250:
                    continue
                passage, answer = head[0], sents[head[1]]
                if made[task] % 2:
                    row = {"instruction": "Continue this passage by one sentence.", "input": passage}
                else:
                    row = {"instruction": f"Continue this passage by one sentence:\n\n{passage}"}
                rows.append({**row, "response": answer})
            else:
                found = passage_at(sents, 0, 150, 400)
                if found is None:
                    continue
                question = f"Which Jane Austen novel is this passage from?\n\n{found[0]}"
                if task == "novel":
                    rows.append({"instruction": question, "response": f"{title}."})
                else:
                    rows.append(
                        {
                            "messages": [
                                {"role": "user", "content": question},
                                {"role": "assistant", "content": f"{title}."},
                                {"role": "user", "content": "Who wrote it, and when was it published?"},
                                {"role": "assistant", "content": f"Jane Austen; it was published in {year}."},
                            ]
                        }
                    )
            made[task] += 1
    rng.shuffle(rows)
    return rows


def preference_rows(sft: list[dict], rng: random.Random) -> list[dict]:
    """Each SFT row as a pair: its answer chosen, the answer of another row of the same task rejected.

    Drawing the rejected answer from the same task keeps it plausible (a title for a title, a sentence of the
    novels for a next sentence), so what separates the two is whether it answers this prompt.
    """

    def task(row: dict) -> str:
        if "messages" in row:
            return "chat"
        return "novel" if row["instruction"].startswith("Which Jane Austen novel") else "continue"

    def answer(row: dict) -> str:
        return row["messages"][-1]["content"] if "messages" in row else row["response"]

    by_task: dict[str, list[str]] = {}
    for row in sft:
        by_task.setdefault(task(row), []).append(answer(row))
    rows = []
    for row in sft:
        chosen, others = answer(row), by_task[task(row)]
        rejected = chosen
        while rejected == chosen:
            rejected = rng.choice(others)
        if "messages" in row:
            prompt = row["messages"][:-1]
            rows.append(
                {
                    "chosen": [*prompt, {"role": "assistant", "content": chosen}],
                    "rejected": [*prompt, {"role": "assistant", "content": rejected}],
                }
            )
        else:
            user = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
            rows.append({"prompt": user, "chosen": chosen, "rejected": rejected})
    return rows


def to_jsonl_gz(rows: list[dict]) -> bytes:
    """JSON Lines, gzipped without a timestamp or file name, so the same rows give the same bytes."""
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, filename="", compresslevel=9) as gz:
        for row in rows:
            gz.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
    return buf.getvalue()


def build() -> dict[Path, list[dict]]:
    books = novels()
    sft = sft_rows(books, random.Random(SEED + 1))
    return {
        CLASSIFY: classify_rows(books, random.Random(SEED)),
        SFT: sft,
        PREFERENCE: preference_rows(sft, random.Random(SEED + 2)),
    }


def main() -> None:
    for path, rows in build().items():
        path.write_bytes(to_jsonl_gz(rows))
        print(f"wrote {path.name}: {len(rows)} rows, {path.stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
