"""Encoding: the spooled documents as token ids, ``BOS document EOS`` each, in this process or a worker pool.

Encoding runs in this process with ``encode_batch`` (the tokenizer's own Rust threads) or, for a large corpus
on a machine with enough cores, in worker processes over runs of documents (``num_proc``; see
:func:`encode_processes` for the measured choice). The output, handed on in document order, is the same either
way; what is done with it (the shards) is the caller's.
"""

from __future__ import annotations

import collections
import itertools
import logging
import multiprocessing
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import IO

import numpy as np
from tokenizers import Tokenizer

from datamodules.sources import DataError
from datamodules.spool import Spool, chunks, read_docs

logger = logging.getLogger(__name__)

# UTF-8 bytes per encode_batch call: enough documents to keep the Rust threads busy, and little enough memory
# (the Encoding objects and id lists take up to ~100 bytes per token, about as many tokens as bytes for text
# in a script the tokenizer has few merges for)
ENCODE_BATCH_BYTES = 1 << 18
# Worker processes: each task is this much text, and they are only worth starting for a corpus of at least
# POOL_MIN_BYTES on a machine with at least POOL_MIN_CPUS cores (see encode_processes).
TASK_BYTES = 2 << 20
POOL_MIN_BYTES = 64 << 20
POOL_MIN_CPUS = 8

# What the encoder hands on, in document order: (train ids, val ids, text bytes they came from).
Write = Callable[[np.ndarray, np.ndarray, int], None]


def available_cpus() -> int:
    """Cores this process may run on (the affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def encode_processes(num_proc: int | None, text_bytes: int) -> int:
    """How many worker processes encode ``text_bytes`` of text: 1 means this process, with ``encode_batch``.

    ``num_proc`` set by the user wins. ``None`` (auto) starts workers only for a corpus of at least
    :data:`POOL_MIN_BYTES` on :data:`POOL_MIN_CPUS` cores or more. On few cores ``encode_batch``'s own Rust
    threads already use them all, and workers only add their start-up (loading the tokenizer, shipping ids back);
    they win once the part of encoding that runs in Python under the GIL (ids to arrays, reading the spool) limits
    ``encode_batch``'s scaling (``bench/data.py`` measures both; README's performance table has the figures).
    """
    if num_proc is not None:
        if int(num_proc) < 1:
            raise DataError(f"data.num_proc={num_proc} must be at least 1 (or null for automatic)")
        return int(num_proc)
    cpus = available_cpus()
    if text_bytes < POOL_MIN_BYTES or cpus < POOL_MIN_CPUS:
        return 1
    return min(cpus, max(1, text_bytes // TASK_BYTES))


def encode_documents(
    tok: Tokenizer, docs: list[str], is_val: np.ndarray, bos_id: int | None, eos_id: int, dtype: np.dtype
) -> tuple[np.ndarray, np.ndarray]:
    """The train and val token arrays of ``docs``, each document as BOS ids EOS (Llama's layout).

    BOS opens every document, as the tokenizer's post-processor does for a prompt, so generation starts from the
    context the model saw at each document start; EOS closes it, so the model learns where documents end. A
    tokenizer whose BOS is its EOS (GPT-2 style) gets only the EOS.
    """
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # _fast (tokenizers >= 0.21): no offsets
    encs = encode(docs, add_special_tokens=False)
    ids = [e.ids for e in encs]
    lens = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    has_bos = bos_id is not None and bos_id != eos_id
    extra = 2 if has_bos else 1
    out = []
    for split_is_val in (False, True):
        mask = is_val == split_is_val
        arr = np.empty(int(lens[mask].sum()) + extra * int(mask.sum()), dtype=dtype)
        pos = 0
        for i in np.flatnonzero(mask).tolist():
            if has_bos:
                arr[pos] = bos_id
                pos += 1
            n = int(lens[i])
            arr[pos : pos + n] = ids[i]
            arr[pos + n] = eos_id
            pos += n + 1
        out.append(arr)
    return out[0], out[1]


def encode_spool(
    spool: Spool,
    is_val: np.ndarray,
    tok: Tokenizer,
    tokenizer_file: Path,
    bos_id: int | None,
    eos_id: int,
    dtype: np.dtype,
    n_proc: int,
    write: Write,
) -> int:
    """Encode every spooled document, handing the ids to ``write`` in document order, in this process or with
    ``n_proc`` worker processes (which load the tokenizer from ``tokenizer_file``); returns how many processes
    encoded (1 if the workers failed and this process took over)."""
    sizes = spool.sizes_array()
    tasks: Iterator[tuple[int, int, int]] = iter(chunks(sizes, TASK_BYTES if n_proc > 1 else int(sizes.sum()) + 1))
    if n_proc > 1:
        tasks, ok = _encode_in_workers(
            spool, sizes, is_val, tokenizer_file, bos_id, eos_id, dtype, n_proc, tasks, write
        )
        n_proc = n_proc if ok else 1
    with open(spool.path, "rb") as f:
        for first, end, offset in tasks:  # in this process: all of it, or what the workers left
            for train, val, n in _encode_range(
                tok, f, offset, sizes[first:end], is_val[first:end], bos_id, eos_id, dtype
            ):
                write(train, val, n)
    return n_proc


def _encode_range(
    tok: Tokenizer,
    f: IO[bytes],
    offset: int,
    sizes: np.ndarray,
    is_val: np.ndarray,
    bos_id: int | None,
    eos_id: int,
    dtype: np.dtype,
) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """``(train, val, text_bytes)`` for consecutive batches of :data:`ENCODE_BATCH_BYTES` of the spooled documents
    starting at ``offset`` with byte ``sizes``."""
    for first, end, start in chunks(sizes, ENCODE_BATCH_BYTES):
        docs = read_docs(f, offset + start, sizes[first:end])
        train, val = encode_documents(tok, docs, is_val[first:end], bos_id, eos_id, dtype)
        yield train, val, int(sizes[first:end].sum())


# ---------------------------------------------------------------------------------------------------------
# The worker pool

_worker_tokenizer: Tokenizer | None = None  # in a worker process: the tokenizer its initializer loaded


def _init_worker(tokenizer_path: str) -> None:
    global _worker_tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker: the processes are the parallelism
    _worker_tokenizer = Tokenizer.from_file(tokenizer_path)


def _encode_task(task: tuple) -> tuple[np.ndarray, np.ndarray]:
    """Encode one run of spooled documents in a worker process."""
    spool_path, offset, sizes, is_val, bos_id, eos_id, dtype = task
    assert _worker_tokenizer is not None
    with open(spool_path, "rb") as f:
        parts = list(_encode_range(_worker_tokenizer, f, offset, sizes, is_val, bos_id, eos_id, np.dtype(dtype)))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _encode_in_workers(
    spool: Spool,
    sizes: np.ndarray,
    is_val: np.ndarray,
    tokenizer_file: Path,
    bos_id: int | None,
    eos_id: int,
    dtype: np.dtype,
    n_proc: int,
    tasks: Iterator[tuple[int, int, int]],
    write: Write,
) -> tuple[Iterator[tuple[int, int, int]], bool]:
    """Encode ``tasks`` (runs of documents) in worker processes, writing the results in order. Returns the tasks
    left undone and whether the workers did their part: if they broke (a script without the
    ``if __name__ == "__main__":`` guard that the spawn start method needs, a worker killed for memory), this
    process encodes the rest, to the same result."""
    # spawn, not fork: the tokenizer's Rust threads may already run in this process, and fork would copy their locks.
    # What a worker is started with stays small (a path, not the tokenizer): CPython's spawn writes it into a pipe
    # and would block forever on a payload larger than the pipe if the worker died while starting.
    ctx = multiprocessing.get_context("spawn")
    pending: collections.deque = collections.deque()
    initargs = (str(tokenizer_file),)
    with ProcessPoolExecutor(n_proc, mp_context=ctx, initializer=_init_worker, initargs=initargs) as pool:

        def submit() -> None:
            task = next(tasks, None)
            if task is not None:
                first, end, offset = task
                args = (str(spool.path), offset, sizes[first:end], is_val[first:end], bos_id, eos_id, dtype.str)
                pending.append((task, pool.submit(_encode_task, args)))

        try:
            for _ in range(2 * n_proc):  # a bounded window of tasks in flight: memory stays bounded
                submit()
            while pending:
                task, future = pending[0]
                train, val = future.result()
                pending.popleft()
                write(train, val, int(sizes[task[0] : task[1]].sum()))
                submit()
        except (BrokenProcessPool, BrokenPipeError) as e:
            logger.warning(
                "data: encoding worker processes failed (%s); encoding in this process instead. A script that "
                'prepares data with data.num_proc > 1 needs the `if __name__ == "__main__":` guard.',
                type(e).__name__,
            )
            return itertools.chain([t for t, _ in pending], tasks), False
    return iter(()), True
