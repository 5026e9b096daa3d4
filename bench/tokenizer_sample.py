"""How much text the tokenizer needs: BPE trained on growing seeded samples of real text, measured on held-out text.

    python bench/tokenizer_sample.py [--vocab 4096 16384] [--samples-mb 0.25 0.5 1 2 4] [--scale-mb 25 100]

Train text: the real corpora of ``../shared/corpora`` (Jane Austen's novels but *Sense and Sensibility*, and 三国演义
but its last 12 chapters; where that folder is absent, the embedded corpus), as paragraphs. Held out: the rest.
For each vocabulary size and sample size (and all of the train text), a tokenizer is trained in a fresh process on a
seeded random sample of the paragraphs (as ``data.tokenizer_sample_bytes`` draws it: every document with the same
probability), and measured: training seconds, peak RSS, and the held-out text's bytes per token (higher is better:
the same text in fewer tokens), relative to the tokenizer trained on all of it.

``--scale-mb``: training time and peak RSS on that many MB (the train text repeated, each paragraph prefixed with
its copy so that no two are equal): time grows with the bytes, memory with the distinct words, which repetition
does not add, so this shows time per MB, not a web corpus's memory.
"""

from __future__ import annotations

import argparse
import gzip
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CORPORA = ROOT.parent / "shared" / "corpora"
HELD_OUT_NOVEL = "sensesensibility"
HELD_OUT_CHAPTERS = 12


def paragraphs(text: str) -> list[str]:
    return [p.strip() for p in text.replace("\r\n", "\n").split("\n\n") if p.strip()]


def split_text() -> tuple[list[str], list[str]]:
    """(train paragraphs, held-out paragraphs)."""
    austen, sanguo = CORPORA / "janeausten.jsonl", CORPORA / "sanguo_yanyi.jsonl"
    if not austen.exists():  # the embedded corpus: one paragraph per line, no titles; hold out its last tenth
        with gzip.open(ROOT / "datamodules" / "corpora" / "janeausten.jsonl.gz", "rt", encoding="utf-8") as f:
            docs = [json.loads(line)["text"] for line in f]
        cut = len(docs) * 9 // 10
        return docs[:cut], docs[cut:]
    train, held = [], []
    for line in austen.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        (held if row["title"] == HELD_OUT_NOVEL else train).extend(paragraphs(row["text"]))
    chapters = [json.loads(line)["text"] for line in sanguo.read_text(encoding="utf-8").splitlines()]
    for i, text in enumerate(chapters):
        (held if i >= len(chapters) - HELD_OUT_CHAPTERS else train).extend(paragraphs(text))
    return train, held


def child(job: dict[str, Any]) -> dict[str, Any]:
    from datamodules.tokenizer import train_tokenizer

    train, held = split_text()
    if job.get("copies"):
        train = [f"[{c}.{i}] {p}" for c in range(job["copies"]) for i, p in enumerate(train)]
    sizes = np.array([len(p.encode("utf-8")) for p in train])
    keep_p = 1.0 if job["sample_mb"] is None else min(1.0, job["sample_mb"] * 1e6 / sizes.sum())
    rng = np.random.default_rng(1235)  # as datamodules.corpus.train_documents draws: one draw per document
    chosen = [p for p in train if keep_p >= 1.0 or rng.random() < keep_p]
    t0 = time.perf_counter()
    tok = train_tokenizer(iter(chosen), job["vocab"])
    seconds = time.perf_counter() - t0
    held_bytes = sum(len(p.encode("utf-8")) for p in held)
    held_tokens = sum(len(e.ids) for e in tok.encode_batch(held, add_special_tokens=False))
    return {
        "seconds": seconds,
        "trained_mb": sum(len(p.encode("utf-8")) for p in chosen) / 1e6,
        "bytes_per_token": held_bytes / held_tokens,
        "vocab": tok.get_vocab_size(),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def run(job: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--samples-mb", type=float, nargs="+", default=[0.25, 0.5, 1, 2, 4])
    parser.add_argument("--scale-mb", type=float, nargs="*", default=[25, 100])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    train, held = split_text()
    train_mb = sum(len(p.encode("utf-8")) for p in train) / 1e6
    print(f"train text {train_mb:.1f} MB ({len(train)} paragraphs), held out {len(held)} paragraphs")
    print("| vocab | sample | trained on MB | seconds | peak RSS MB | held-out bytes/token | vs all |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for vocab in args.vocab:
        full = run({"vocab": vocab, "sample_mb": None})
        for mb in [s for s in args.samples_mb if s < train_mb]:
            r = run({"vocab": vocab, "sample_mb": mb})
            print(
                f"| {vocab} | {mb:g} MB | {r['trained_mb']:.2f} | {r['seconds']:.2f} | {r['peak_rss_mb']:.0f} | "
                f"{r['bytes_per_token']:.3f} | {r['bytes_per_token'] / full['bytes_per_token']:.3f} |",
                flush=True,
            )
        print(
            f"| {vocab} | all | {full['trained_mb']:.2f} | {full['seconds']:.2f} | {full['peak_rss_mb']:.0f} | "
            f"{full['bytes_per_token']:.3f} | 1.000 |",
            flush=True,
        )
    for mb in args.scale_mb:
        copies = max(1, round(mb / train_mb))
        r = run({"vocab": args.vocab[0], "sample_mb": None, "copies": copies})
        print(
            f"| {args.vocab[0]} | {copies} copies | {r['trained_mb']:.1f} | {r['seconds']:.2f} | "
            f"{r['peak_rss_mb']:.0f} | {r['bytes_per_token']:.3f} | {r['trained_mb'] / r['seconds']:.1f} MB/s |",
            flush=True,
        )


if __name__ == "__main__":
    main()
