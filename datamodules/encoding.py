"""Encoding: documents as token ids, ``BOS document EOS`` each, with ``encode_batch`` (the tokenizer's Rust threads).

Which process encodes which file is :mod:`datamodules.filecache`'s business; the layout of the ids is decided here.
"""

from __future__ import annotations

import os

import numpy as np
from tokenizers import Tokenizer

# UTF-8 bytes per encode_batch call: enough documents to keep the Rust threads busy, and little enough memory
# (the Encoding objects and id lists take up to ~100 bytes per token, about as many tokens as bytes for text
# in a script the tokenizer has few merges for)
ENCODE_BATCH_BYTES = 1 << 18


def available_cpus() -> int:
    """Cores this process may run on (the affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def doc_ids(tok: Tokenizer, docs: list[str]) -> tuple[list[list[int]], np.ndarray]:
    """The token ids of every document (no special tokens) and their counts."""
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # _fast (tokenizers >= 0.21): no offsets
    ids = [e.ids for e in encode(docs, add_special_tokens=False)]
    return ids, np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))


def encode_with_lengths(
    tok: Tokenizer, docs: list[str], bos_id: int | None, eos_id: int, dtype: np.dtype
) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, lens)``: every document as BOS ids EOS (Llama's layout), back to back, and each one's token count.

    BOS opens every document, as the tokenizer's post-processor does for a prompt, so generation starts from the
    context the model saw at each document start; EOS closes it, so the model learns where documents end. A
    tokenizer whose BOS is its EOS (GPT-2 style) gets only the EOS.
    """
    ids, n = doc_ids(tok, docs)
    has_bos = bos_id is not None and bos_id != eos_id
    lens = n + (2 if has_bos else 1)
    arr = np.empty(int(lens.sum()), dtype=dtype)
    starts = np.cumsum(lens) - lens
    arr[starts + lens - 1] = eos_id
    if has_bos:
        arr[starts] = bos_id
    off = int(has_bos)
    for s, row in zip(starts.tolist(), ids):
        arr[s + off : s + off + len(row)] = row
    return arr, lens


def encode_documents(
    tok: Tokenizer, docs: list[str], is_val: np.ndarray, bos_id: int | None, eos_id: int, dtype: np.dtype
) -> tuple[np.ndarray, np.ndarray]:
    """The train and val token arrays of ``docs`` (see :func:`encode_with_lengths`), by ``is_val``."""
    arr, lens = encode_with_lengths(tok, docs, bos_id, eos_id, dtype)
    tokens_val = np.repeat(np.asarray(is_val, dtype=bool), lens)
    return arr[~tokens_val], arr[tokens_val]
