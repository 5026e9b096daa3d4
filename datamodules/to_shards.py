"""The prepared corpus's last step: the kept documents' token ids, from their files' entries, into the split shards.

Each file's entry (:mod:`datamodules.filecache`) is encoded once per tokenizer, in worker processes for a large
corpus or as Ray tasks (:mod:`datamodules.engine`); its ids are then copied, in the files' order, into the train or
val shards as the split says of each document, counting the train split's token ids on the way (``token_counts.npy``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from datamodules.engine import run_tasks
from datamodules.filecache import FileEntry, encode_entry, processes, progress, tokenizer_key
from datamodules.shards import ShardIndex, ShardWriter

SPLITS = ("train", "val")


class KeptDocs:
    """The documents that cleaning kept, file after file, read from the files' entries: what tokenizer training
    reads and the shards are made of."""

    def __init__(self, parts: list[tuple[FileEntry, np.ndarray]]) -> None:
        self.parts = parts  # (entry, keep mask) in order

    def sizes(self) -> Iterator[np.ndarray]:
        """Per part, its kept documents' sizes in bytes (read from the entry: the parts' arrays are never all in
        memory at once)."""
        for e, k in self.parts:
            yield e.sizes[k]

    def total_bytes(self, mask: np.ndarray | None = None) -> int:
        """The kept documents' bytes; with ``mask`` (bool, one per kept document), those it marks only."""
        total, start = 0, 0
        for sizes in self.sizes():
            total += int(sizes.sum() if mask is None else sizes[mask[start : start + len(sizes)]].sum())
            start += len(sizes)
        return total

    def docs(self) -> Iterator[str]:
        for e, k in self.parts:
            yield from e.docs(k)


def encode_to_shards(
    kept: KeptDocs,
    is_val: np.ndarray,
    tok: Tokenizer,
    tok_info: dict[str, Any],
    dtype: np.dtype,
    num_proc: int | None,
    out_dir: Path,
    engine: str = "local",
) -> tuple[dict[str, ShardIndex], int, np.ndarray, int]:
    """Encode -> shards: every file's entry encoded with ``tok`` (where not yet), then the kept documents' ids
    copied into their split's shards in order. Returns the index, the encoding processes, the train split's token
    counts and how many files were encoded."""
    bos_id, eos_id = tok_info["bos_id"], tok_info["eos_id"]
    tok_file = out_dir / "tokenizer.json"
    tok.save(str(tok_file))  # before encoding: worker processes load it
    tok_key = tokenizer_key(tok_file)
    entries = list({e.dir: e for e, _ in kept.parts}.values())
    todo = [e for e in entries if e.token_ids(tok_key, dtype) is None]
    total = int(sum(int(e.sizes.sum()) for e in todo))
    n_proc = processes(num_proc, len(todo), total)
    with progress(total, "encoding") as bar:
        tasks = [(str(e.dir), str(tok_file), tok_key, bos_id, eos_id, dtype.str) for e in todo]
        n_proc = run_tasks(encode_entry, tasks, n_proc, lambda i, _: bar.update(int(todo[i].sizes.sum())), engine)
    writers = {split: ShardWriter(out_dir, split) for split in SPLITS}
    counts = np.zeros(tok_info["vocab_size"], dtype=np.int64)
    start = 0  # position of the part's first kept document in is_val
    for entry, keep in kept.parts:
        found = entry.token_ids(tok_key, dtype)
        assert found is not None
        lens = found[1]
        del found  # read below, not memory-mapped: a mapping's pages count in this process's memory until unmapped
        split = np.full(len(keep), -1, dtype=np.int8)  # per document: -1 dropped, 0 train, 1 val
        n_kept = int(keep.sum())
        split[keep] = is_val[start : start + n_kept]
        start += n_kept
        ends = np.cumsum(lens)
        with open(entry.dir / f"ids-{tok_key}.bin", "rb") as f:
            for first, end in _runs(ends, COPY_TOKENS):  # a run of documents at a time: memory stays bounded
                base = int(ends[first - 1]) if first else 0
                tokens = np.fromfile(f, dtype=dtype, count=int(ends[end - 1]) - base)  # the runs are consecutive
                per_token = np.repeat(split[first:end], lens[first:end])
                train = tokens[per_token == 0]
                np.add(counts, np.bincount(train, minlength=len(counts)), out=counts)
                writers["train"].write(train)
                writers["val"].write(tokens[per_token == 1])
    return {split: w.close() for split, w in writers.items()}, n_proc, counts, len(todo)


COPY_TOKENS = 1 << 20  # tokens copied from the files' ids into the shards at a time


def _runs(ends: np.ndarray, max_tokens: int) -> Iterator[tuple[int, int]]:
    """``(first, end)`` document ranges of about ``max_tokens`` tokens, from the cumulative token counts."""
    first = 0
    while first < len(ends):
        base = int(ends[first - 1]) if first else 0
        end = max(first + 1, int(np.searchsorted(ends, base + max_tokens, side="right")))
        yield first, end
        first = end
