"""A study: the prompts, both answers to each, and what produced them, in one directory.

``build`` reads the prompts (JSON Lines rows in one of three forms), generates model A's answers and model B's (or
takes the rows' reference answers as B), and writes:

- ``study.json``: which checkpoint is A and which is B (path, size, modification time, SHA-256), the prompts file
  (path, SHA-256), the generation settings, the number of items, and the study's secret (it decides each rater's
  order and left/right sides; the server never sends it);
- ``items.jsonl``: one item a line, ``{"id", "source", "prompt", "messages", "a", "b", "generation"}``: ``prompt`` is
  the text raters see, ``messages`` the conversation the chat models answered, ``generation`` each side's token
  counts, finish reason and whether its prompt was cut.

An item's id is the first 12 hex digits of the SHA-256 of its conversation, so the same prompts give the same ids
whatever their order or the checkpoints (a repeated prompt gets ``-2``, ``-3``, ... in file order).

The prompt rows are :mod:`llm.human_eval.prompts`'. A checkpoint with a chat format (finetuned here, or a converted model's template) answers the conversation as it was
finetuned on it; a base model continues the prompt as plain text (the messages' contents, a blank line apart).
Decoding is greedy unless a temperature is given (then row i samples with seed + i, whatever the batches).

Reading a study back (``Study.load``, what the server and the summary do) imports neither torch nor the data code.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llm.errors import UserError

if TYPE_CHECKING:
    from llm.human_eval.prompts import Prompt

FORMAT = "llm.human_eval/1"
STUDY_FILE, ITEMS_FILE = "study.json", "items.jsonl"
REFERENCES = "references"  # --b references: B is the rows' reference answers


# --------------------------------------------------------------------------------------------------- generation


@dataclass(frozen=True)
class Settings:
    """How answers are generated (the same for A and B)."""

    max_new_tokens: int = 256
    temperature: float = 0.0  # greedy: a study compares models, not samples
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    batch_size: int = 8
    device: str = "cpu"

    def __post_init__(self) -> None:
        from llm.core.sampling import check_sampling

        check_sampling(self.temperature, self.top_k, self.top_p, self.max_new_tokens)
        if self.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens {self.max_new_tokens} must be >= 1")
        if self.batch_size < 1:
            raise UserError(f"--batch-size {self.batch_size} must be >= 1")


@dataclass
class Answer:
    text: str
    tokens: int  # new tokens
    finish: str | None  # "stop" (EOS) or "length"
    prompt_tokens: int
    prompt_truncated: bool  # the prompt's first tokens were dropped to leave room for the answer

    def record(self) -> dict[str, Any]:
        """What items.jsonl keeps of the generation, besides the text."""
        return {
            "tokens": self.tokens,
            "finish": self.finish,
            "prompt_tokens": self.prompt_tokens,
            "prompt_truncated": self.prompt_truncated,
        }


def answer_budget(prompt_len: int, max_new_tokens: int, max_len: int) -> int:
    """An answer's token budget: ``max_new_tokens``, and no more than the context leaves after the prompt, but at
    least a quarter of the context (a longer prompt then keeps its last tokens)."""
    return min(max_new_tokens, max(max_len - prompt_len, max_len // 4), max_len - 1)


def batches(lengths: Sequence[int], budgets: Sequence[int], max_len: int, batch_size: int) -> list[list[int]]:
    """Rows grouped into left-padded batches that fit the context (``sampling.fits``), similar lengths together."""
    from llm.core.sampling import fits

    out: list[list[int]] = []
    for row in sorted(range(len(lengths)), key=lambda r: (lengths[r], budgets[r])):
        batch = out[-1] if out else None
        if (
            batch is not None
            and len(batch) < batch_size
            and fits([lengths[r] for r in (*batch, row)], [budgets[r] for r in (*batch, row)], max_len)
        ):
            batch.append(row)
        else:
            out.append([row])
    return out


def generate_answers(loaded: Any, prompts: Sequence[Prompt], settings: Settings) -> list[Answer]:
    """One checkpoint's answers (``llm.generate.Loaded``), in the prompts' order, generated in batches."""
    from llm.core.sampling import Generation, Sampling

    max_len = loaded.model.cfg.max_seq_len
    encoded = [loaded.chat.prompt(p.messages) if loaded.chat is not None else loaded.encode(p.text) for p in prompts]
    budgets = [answer_budget(len(e), settings.max_new_tokens, max_len) for e in encoded]
    kept = [e[-(max_len - b) :] for e, b in zip(encoded, budgets)]  # what Generation keeps of a long prompt
    answers: list[Answer | None] = [None] * len(prompts)
    for rows in batches([len(k) for k in kept], budgets, max_len, settings.batch_size):
        sampling = [
            Sampling(budgets[r], settings.temperature, settings.top_k, settings.top_p, settings.seed + r) for r in rows
        ]
        run = Generation(
            loaded.model, [kept[r] for r in rows], sampling, eos_id=loaded.ids["eos_ids"], pad_id=loaded.pad_id
        )
        for _ in run:
            pass
        for i, r in enumerate(rows):
            text = loaded.tokenizer.decode(run.tokens[i], skip_special_tokens=True).strip()
            answers[r] = Answer(
                text, len(run.tokens[i]), run.finish_reason[i], len(kept[r]), len(kept[r]) < len(encoded[r])
            )
    return answers  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------------- identity


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def file_identity(path: Path) -> dict[str, Any]:
    """Which file exactly: resolved path, size, modification time and SHA-256."""
    stat = path.stat()
    return {
        "path": str(path.resolve()),
        "bytes": stat.st_size,
        "mtime": datetime.fromtimestamp(stat.st_mtime, timezone.utc).isoformat(timespec="seconds"),
        "sha256": sha256_of(path),
    }


# -------------------------------------------------------------------------------------------------------- study


@dataclass
class Study:
    """A study directory read back: its metadata and its items (in file order, by id)."""

    root: Path
    meta: dict[str, Any]
    items: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def secret(self) -> bytes:
        return bytes.fromhex(self.meta["secret"])

    @classmethod
    def load(cls, root: str | Path) -> Study:
        root = Path(root)
        meta_path, items_path = root / STUDY_FILE, root / ITEMS_FILE
        if not meta_path.is_file() or not items_path.is_file():
            raise UserError(f"{root}: not a study (no {STUDY_FILE} / {ITEMS_FILE}); make one with `new`")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            rows = [json.loads(line) for line in items_path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise UserError(f"{root}: unreadable study file: {err}") from err
        if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("secret"), str):
            raise UserError(f"{meta_path}: not a {FORMAT} study file")
        items: dict[str, dict[str, Any]] = {}
        for i, row in enumerate(rows, 1):
            if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in ("id", "prompt", "a", "b")):
                raise UserError(f"{items_path}:{i}: an item needs string 'id', 'prompt', 'a' and 'b'")
            if row["id"] in items:
                raise UserError(f"{items_path}:{i}: repeated item id {row['id']!r}")
            items[row["id"]] = row
        if not items:
            raise UserError(f"{items_path}: no items")
        return cls(root, meta, items)


def write_study(root: Path, meta: dict[str, Any], items: Sequence[dict[str, Any]]) -> Study:
    """Write ``items.jsonl`` then ``study.json`` (each under a temporary name, renamed): ``study.json`` present means
    the study is complete. The secret is added to ``meta`` when it has none."""
    meta = {"format": FORMAT, **meta, "items": len(items)}
    meta.setdefault("secret", secrets.token_hex(16))
    root.mkdir(parents=True, exist_ok=True)
    for name, text in [
        (ITEMS_FILE, "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items)),
        (STUDY_FILE, json.dumps(meta, indent=2, ensure_ascii=False) + "\n"),
    ]:
        tmp = root / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, root / name)
    return Study.load(root)


def check_new(root: Path) -> None:
    """A new study goes into a new or empty directory: never over another study or its ratings."""
    if root.exists() and not root.is_dir():
        raise UserError(f"{root}: exists and is not a directory")
    if root.is_dir() and any(root.iterdir()):
        raise UserError(f"{root}: not empty (a study there would mix with its files); choose a new directory")


def build(
    root: str | Path,
    a: str | Path,
    b: str | Path,
    prompts_path: str | Path,
    settings: Settings | None = None,
    log: Any = sys.stderr,
) -> Study:
    """Generate both sides' answers and write the study (see the module docstring). ``b`` may be ``"references"``."""
    from llm.human_eval.prompts import item_ids, read_prompts

    settings = Settings() if settings is None else settings
    root, prompts_path = Path(root), Path(prompts_path)
    check_new(root)
    prompts = read_prompts(prompts_path)
    references = str(b) == REFERENCES
    if references:
        missing = [p.where for p in prompts if p.reference is None]
        if missing:
            raise UserError(f"--b {REFERENCES}: {missing[0]} has no reference answer ({len(missing)} rows without one)")
    sides = {"a": Path(a)} if references else {"a": Path(a), "b": Path(b)}
    for side, path in sides.items():
        if not path.is_file():
            raise UserError(f"--{side} {path}: no such checkpoint file")

    from llm.generate import load_model

    answers: dict[str, list[Answer | None]] = {"b": [None] * len(prompts)}
    identity: dict[str, dict[str, Any]] = {"b": {"kind": REFERENCES, "of": str(prompts_path.resolve())}}
    for side, path in sides.items():
        start = time.perf_counter()
        loaded = load_model(path, settings.device)
        answers[side] = generate_answers(loaded, prompts, settings)
        identity[side] = {
            "kind": "checkpoint",
            "name": loaded.name,
            **file_identity(path),
            "chat_format": loaded.chat is not None,
            "max_seq_len": loaded.model.cfg.max_seq_len,
        }
        done = [x for x in answers[side] if x is not None]
        cut = sum(x.prompt_truncated for x in done)
        print(
            f"{side.upper()} = {path}: {len(done)} answers, {sum(x.tokens for x in done)} tokens in "
            f"{time.perf_counter() - start:.1f} s" + (f"; {cut} prompts cut to fit its context" if cut else ""),
            file=log,
        )
        del loaded

    items = []
    for p, item_id, ans_a, ans_b in zip(prompts, item_ids(prompts), answers["a"], answers["b"]):
        assert ans_a is not None
        items.append(
            {
                "id": item_id,
                "source": p.where,
                "prompt": p.display,
                "messages": p.messages,
                "a": ans_a.text,
                "b": p.reference if ans_b is None else ans_b.text,
                "generation": {"a": ans_a.record(), "b": None if ans_b is None else ans_b.record()},
            }
        )
    meta = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "a": identity["a"],
        "b": identity["b"],
        "prompts": {"path": str(prompts_path.resolve()), "sha256": sha256_of(prompts_path), "rows": len(prompts)},
        "settings": {**vars(settings), "decoding": "greedy" if settings.temperature == 0 else "sampled"},
    }
    study = write_study(root, meta, items)
    print(f"study: {len(items)} items in {root} (serve it: python -m llm.human_eval serve {root})", file=log)
    return study
