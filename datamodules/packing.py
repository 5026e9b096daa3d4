"""Packing: clean, tokenize and concatenate a corpus into sharded memory-mapped token arrays, cached.

One call of :func:`prepare_corpus` runs the whole pipeline, sources -> cleaning -> tokenizer -> packing:

1. read and clean every document, spooling the kept ones to disk as UTF-8 (memory stays bounded);
2. split the documents into train and val with a seeded permutation (by document, never inside one);
3. train the tokenizer on the train documents (or load the configured one);
4. encode in batches as ``BOS document EOS`` and append the ids to the split's shards, ``train-00000.bin``,
   ``train-00001.bin`` ... (at most :data:`SHARD_TOKENS` tokens each; uint16 when the vocabulary allows).

Encoding runs in this process with ``encode_batch`` (the tokenizer's own Rust threads) or, for a large corpus
on a machine with enough cores, in worker processes over chunks of documents (``num_proc``; see
:func:`encode_processes` for the measured choice). The output is the same either way.

The result lives in ``cache_dir/<key>/``: ``tokenizer.json``, the shards, ``report.json`` and ``meta.json``
(the index: dtype, and every shard's file and token count in order). The key hashes the *content* of every
input file and every setting that changes the output, so an edited file or rule rebuilds and anything else is
a cache hit. The directory is built under a temporary name and renamed into place once complete, and
``meta.json`` (with ``"complete": true``) is written last: a build that crashes, or is killed, never leaves a
directory that a later run trusts; a later build removes its leftovers.
"""

from __future__ import annotations

import array
import collections
import contextlib
import hashlib
import itertools
import json
import logging
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import tokenizers
from tokenizers import Tokenizer
from tqdm import tqdm

from datamodules import sources
from datamodules.cleaning import Cleaner, normalize_rules
from datamodules.sources import DataError, SourceStats, file_format, find_files, read_documents
from datamodules.tokenizer import load_tokenizer, special_ids, tokenizer_file, train_tokenizer

logger = logging.getLogger(__name__)

# Bump when the cache layout or anything in the pipeline changes what a given input produces.
PIPELINE_VERSION = 3  # 2: BOS before every document; 3: sharded arrays, binary files skipped
# UTF-8 bytes per encode_batch call: enough documents to keep the Rust threads busy, and little enough memory
# (the Encoding objects and id lists take up to ~100 bytes per token, about as many tokens as bytes for text
# in a script the tokenizer has few merges for)
ENCODE_BATCH_BYTES = 1 << 18
SHARD_TOKENS = 1 << 28  # tokens per shard file (512 MiB of uint16)
# Worker processes: each task is this much text, and they are only worth starting for a corpus of at least
# POOL_MIN_BYTES on a machine with at least POOL_MIN_CPUS cores (see encode_processes).
TASK_BYTES = 2 << 20
POOL_MIN_BYTES = 64 << 20
POOL_MIN_CPUS = 8


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def hash_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """BLAKE2b of the file's bytes, read in chunks."""
    h = hashlib.blake2b(digest_size=20)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def split_documents(n_docs: int, val_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of the validation documents: ``round(n_docs * val_fraction)`` of them (at least one,
    and at least one left for training), picked by a permutation seeded with ``seed``."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"data.val_fraction={val_fraction} must be between 0 and 1 (exclusive)")
    if n_docs < 2:
        raise DataError(
            f"only {n_docs} document after cleaning: train and val are split by document, so at least 2 are "
            "needed (set data.split_paragraphs=true to make each paragraph a document)"
        )
    n_val = min(max(1, round(n_docs * val_fraction)), n_docs - 1)
    is_val = np.zeros(n_docs, dtype=bool)
    is_val[np.random.default_rng(seed).permutation(n_docs)[:n_val]] = True
    return is_val


def available_cpus() -> int:
    """Cores this process may run on (the affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def encode_processes(num_proc: int | None, text_bytes: int) -> int:
    """How many worker processes encode ``text_bytes`` of text: 1 means this process, with ``encode_batch``.

    ``num_proc`` set by the user wins. ``None`` (auto) starts workers only for a corpus of at least
    :data:`POOL_MIN_BYTES` on :data:`POOL_MIN_CPUS` cores or more. Measured with ``bench/data.py`` on 2 cores
    (59 MB of text): ``encode_batch``'s own Rust threads already use both cores, and 2 single-threaded workers
    took the same wall time for 6% more CPU (starting, loading the tokenizer, shipping ids back), so auto stays
    in this process there. Workers win once the part of encoding that runs in Python under the GIL (~6% of it:
    ids to arrays, reading the spool) limits ``encode_batch``'s scaling: by Amdahl's law, from about 6 cores
    (an estimate: no machine with more than 2 cores was at hand to measure it).
    """
    if num_proc is not None:
        if int(num_proc) < 1:
            raise DataError(f"data.num_proc={num_proc} must be at least 1 (or null for automatic)")
        return int(num_proc)
    cpus = available_cpus()
    if text_bytes < POOL_MIN_BYTES or cpus < POOL_MIN_CPUS:
        return 1
    return min(cpus, max(1, text_bytes // TASK_BYTES))


@dataclass
class CorpusSettings:
    """Everything that decides what :func:`prepare_corpus` produces (besides the input files' bytes), plus
    ``num_proc``, which decides only how fast."""

    paths: Sequence[str]
    text_field: str = "text"
    split_paragraphs: bool = False
    cleaning: list[dict[str, Any]] | None = None  # None: cleaning.DEFAULT_RULES
    tokenizer: str | None = None  # a tokenizer.json (or a directory holding one) to load; None: train one
    vocab_size: int = 4096
    tokenizer_sample_bytes: int | None = None
    val_fraction: float = 0.05
    seed: int = 1234
    num_proc: int | None = None  # encoding processes; None: automatic (see encode_processes)
    cleaning_rules: list[dict[str, Any]] = field(init=False)

    def __post_init__(self) -> None:
        self.paths = [str(p) for p in self.paths]
        self.cleaning_rules = normalize_rules(self.cleaning)


# ---------------------------------------------------------------------------------------------------------
# Reading the packed arrays


class TokenShards:
    """One split's shards read as a single token sequence: ``len()``, and slices that may span shards.

    The memory maps open lazily, in each process that reads, so the object pickles cheaply into DataLoader
    workers (a pickled ``np.memmap`` would copy the array).
    """

    def __init__(self, shards: Sequence[tuple[str | Path, int]], dtype: np.dtype | str) -> None:
        self.paths = [str(p) for p, _ in shards]
        self.sizes = [int(n) for _, n in shards]
        self.starts = np.cumsum([0, *self.sizes])  # shard i holds tokens starts[i] .. starts[i + 1] - 1
        self.dtype = np.dtype(dtype)
        self._maps: list[np.ndarray | None] = [None] * len(self.paths)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def shard(self, i: int) -> np.ndarray:
        """Shard ``i`` as a read-only memory map."""
        m = self._maps[i]
        if m is None:
            n = self.sizes[i]
            m = np.memmap(self.paths[i], dtype=self.dtype, mode="r", shape=(n,)) if n else np.zeros(0, self.dtype)
            self._maps[i] = m
        return m

    def __getitem__(self, key: slice | int) -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            i = int(key) + len(self) if key < 0 else int(key)
            if not 0 <= i < len(self):
                raise IndexError(f"token {key} out of range ({len(self)} tokens)")
            k = int(np.searchsorted(self.starts, i, side="right")) - 1
            return self.shard(k)[i - self.starts[k]]
        start, stop, step = key.indices(len(self))
        if step != 1:
            raise ValueError("TokenShards slices take no step")
        pieces = []
        k = int(np.searchsorted(self.starts, start, side="right")) - 1
        while start < stop:
            end = min(stop, int(self.starts[k + 1]))
            pieces.append(self.shard(k)[start - self.starts[k] : end - self.starts[k]])
            start, k = end, k + 1
        if len(pieces) == 1:
            return pieces[0]
        return np.concatenate(pieces) if pieces else np.zeros(0, self.dtype)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = np.asarray(self[:])
        return out if dtype is None else out.astype(dtype)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_maps": [None] * len(self.paths)}


@dataclass
class PackedCorpus:
    """A prepared corpus: its tokenizer, where its token shards are, and the report."""

    dir: Path
    tokenizer: Tokenizer
    dtype: np.dtype
    n_train: int
    n_val: int
    report: dict[str, Any]
    index: dict[str, list[dict[str, Any]]]  # split -> [{"file", "tokens"}, ...] in order

    def shards(self, split: str) -> list[tuple[Path, int]]:
        """``(path, tokens)`` of every shard of ``"train"`` or ``"val"``, in order."""
        return [(self.dir / s["file"], int(s["tokens"])) for s in self.index[split]]

    def tokens(self, split: str) -> TokenShards:
        """The token ids of ``"train"`` or ``"val"``: read-only, memory-mapped."""
        return TokenShards(self.shards(split), self.dtype)


# ---------------------------------------------------------------------------------------------------------
# The cache key


def cache_key(files: Sequence[Path], settings: CorpusSettings) -> str:
    """Hash of the input files' content (in order, with their format) and of every setting that changes output."""
    inputs = []
    for p in files:
        try:
            inputs.append({"format": file_format(p), "blake2b": hash_file(p)})
        except OSError as e:
            raise DataError(f"{p}: cannot be read ({e.strerror or e})") from None
    tok: dict[str, Any]
    if settings.tokenizer is not None:
        tok = {"file": hash_file(tokenizer_file(settings.tokenizer))}
    else:
        tok = {"vocab_size": settings.vocab_size, "sample_bytes": settings.tokenizer_sample_bytes}
    payload = {
        "version": PIPELINE_VERSION,
        "inputs": inputs,
        "reading": {"sniff_bytes": sources.SNIFF_BYTES, "max_bad_ratio": sources.MAX_BAD_RATIO},
        "text_field": settings.text_field,
        "split_paragraphs": settings.split_paragraphs,
        "cleaning": settings.cleaning_rules,
        "tokenizer": tok,
        "tokenizers": tokenizers.__version__,  # training and encoding may change between versions
        "val_fraction": settings.val_fraction,
        "seed": settings.seed,
    }
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.blake2b(blob, digest_size=16).hexdigest()


# ---------------------------------------------------------------------------------------------------------
# Progress


def progress(total: int | None, desc: str, unit: str = "B") -> tqdm:
    """A progress bar on stderr: on a terminal, for steps of more than two seconds; in a log, only for steps of
    more than a minute, and then at most a line a minute."""
    tty = sys.stderr.isatty()
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        unit_scale=True,
        unit_divisor=1024 if unit == "B" else 1000,
        delay=2 if tty else 60,
        mininterval=0.2 if tty else 60,
        leave=False,
        file=sys.stderr,
    )


# ---------------------------------------------------------------------------------------------------------
# The spool: the cleaned documents, UTF-8 one after another, with their sizes kept in memory (8 bytes each)


class _Spool:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.sizes = array.array("q")

    def write_all(self, docs: Iterator[str]) -> None:
        with open(self.path, "wb") as f:
            for doc in docs:
                raw = doc.encode("utf-8", "replace")  # (a lone surrogate would become "?")
                f.write(raw)
                self.sizes.append(len(raw))

    def sizes_array(self) -> np.ndarray:
        return np.frombuffer(self.sizes, dtype=np.int64) if len(self.sizes) else np.zeros(0, dtype=np.int64)

    def docs(self) -> Iterator[str]:
        sizes = self.sizes_array()
        with open(self.path, "rb") as f:
            for first, end, offset in _chunks(sizes, ENCODE_BATCH_BYTES):
                yield from _read_docs(f, offset, sizes[first:end])


def _chunks(sizes: np.ndarray, max_bytes: int) -> Iterator[tuple[int, int, int]]:
    """``(first_doc, end_doc, byte_offset)`` of consecutive runs of documents of about ``max_bytes``."""
    offset = first = acc = 0
    for i, n in enumerate(sizes.tolist()):
        acc += n
        if acc >= max_bytes:
            yield first, i + 1, offset
            first, offset, acc = i + 1, offset + acc, 0
    if first < len(sizes):
        yield first, len(sizes), offset


def _read_docs(f: IO[bytes], offset: int, sizes: np.ndarray) -> list[str]:
    f.seek(offset)
    raw = f.read(int(sizes.sum()))
    ends = np.cumsum(sizes).tolist()
    starts = [0, *ends[:-1]]
    return [raw[a:b].decode("utf-8") for a, b in zip(starts, ends)]


# ---------------------------------------------------------------------------------------------------------
# Encoding


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
    for first, end, start in _chunks(sizes, ENCODE_BATCH_BYTES):
        docs = _read_docs(f, offset + start, sizes[first:end])
        train, val = encode_documents(tok, docs, is_val[first:end], bos_id, eos_id, dtype)
        yield train, val, int(sizes[first:end].sum())


_worker_tokenizer: Tokenizer | None = None


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


class _ShardWriter:
    """Appends a split's tokens to ``<split>-00000.bin``, ``<split>-00001.bin`` ... of at most ``shard_tokens``."""

    def __init__(self, out_dir: Path, split: str, shard_tokens: int) -> None:
        self.out_dir, self.split, self.shard_tokens = out_dir, split, shard_tokens
        self.index: list[dict[str, Any]] = []
        self._f: IO[bytes] | None = None
        self.total = 0

    def _next(self) -> None:
        if self._f is not None:
            self._f.close()
        name = f"{self.split}-{len(self.index):05d}.bin"
        self._f = open(self.out_dir / name, "wb")
        self.index.append({"file": name, "tokens": 0})

    def write(self, arr: np.ndarray) -> None:
        while len(arr):
            if self._f is None or self.index[-1]["tokens"] == self.shard_tokens:
                self._next()
            assert self._f is not None
            room = self.shard_tokens - self.index[-1]["tokens"]
            part, arr = arr[:room], arr[room:]
            self._f.write(part.tobytes())
            self.index[-1]["tokens"] += len(part)
            self.total += len(part)

    def close(self) -> list[dict[str, Any]]:
        if self._f is None:  # an empty split still gets its (empty) shard: the index is never empty
            self._next()
        assert self._f is not None
        self._f.close()
        return self.index


def _encode_all(
    spool: _Spool,
    is_val: np.ndarray,
    tok: Tokenizer,
    bos_id: int | None,
    eos_id: int,
    dtype: np.dtype,
    writers: dict[str, _ShardWriter],
    n_proc: int,
) -> int:
    """Encode the spool into the writers, in this process or with ``n_proc`` worker processes; returns how many
    processes encoded (1 if the workers failed and this process took over)."""
    sizes = spool.sizes_array()
    tasks: Iterator[tuple[int, int, int]] = iter(_chunks(sizes, TASK_BYTES if n_proc > 1 else int(sizes.sum()) + 1))
    with progress(int(sizes.sum()), "encoding") as bar, open(spool.path, "rb") as f:

        def write(train: np.ndarray, val: np.ndarray, n_bytes: int) -> None:
            writers["train"].write(train)
            writers["val"].write(val)
            bar.update(n_bytes)

        if n_proc > 1:
            tasks, ok = _encode_in_workers(spool, sizes, is_val, tok, bos_id, eos_id, dtype, n_proc, tasks, write)
            n_proc = n_proc if ok else 1
        for first, end, offset in tasks:  # in this process: all of it, or what the workers left
            for train, val, n in _encode_range(
                tok, f, offset, sizes[first:end], is_val[first:end], bos_id, eos_id, dtype
            ):
                write(train, val, n)
    return n_proc


def _encode_in_workers(
    spool: _Spool,
    sizes: np.ndarray,
    is_val: np.ndarray,
    tok: Tokenizer,
    bos_id: int | None,
    eos_id: int,
    dtype: np.dtype,
    n_proc: int,
    tasks: Iterator[tuple[int, int, int]],
    write: Any,
) -> tuple[Iterator[tuple[int, int, int]], bool]:
    """Encode ``tasks`` (runs of documents) in worker processes, writing the results in order. Returns the tasks
    left undone and whether the workers did their part: if they broke (a script without the
    ``if __name__ == "__main__":`` guard that the spawn start method needs, a worker killed for memory), this
    process encodes the rest, to the same result."""
    # spawn, not fork: the tokenizer's Rust threads may already run in this process, and fork would copy their locks.
    # What a worker is started with stays small (a path, not the tokenizer): CPython's spawn writes it into a pipe
    # and would block forever on a payload larger than the pipe if the worker died while starting.
    ctx = multiprocessing.get_context("spawn")
    tok_path = spool.path.with_name("tokenizer.json")
    pending: collections.deque = collections.deque()
    with ProcessPoolExecutor(n_proc, mp_context=ctx, initializer=_init_worker, initargs=(str(tok_path),)) as pool:

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


# ---------------------------------------------------------------------------------------------------------
# Building


def _summary(paths: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def _nothing_read(settings: CorpusSettings, stats: SourceStats) -> DataError:
    names = _summary(settings.paths)
    skipped = [s for s in stats.skipped_files if s["reason"] not in ("hidden file", "unsupported file type")]
    parts = []
    if stats.empty_files:
        parts.append(f"{stats.empty_files} empty file{'s' * (stats.empty_files != 1)}")
    if skipped:
        first = skipped[0]
        parts.append(f"{len(skipped)} skipped, e.g. {first['path']}: {first['reason']}")
    if not parts:
        parts.append(f"empty files, or data.text_field={settings.text_field!r} empty")
    return DataError(f"data.paths: no documents in {names} ({'; '.join(parts)})")


def _build(files: list[Path], skipped: list[dict], settings: CorpusSettings, key: str, out_dir: Path) -> dict[str, Any]:
    """Run the pipeline into ``out_dir`` (an empty directory); returns the report."""
    t0 = time.perf_counter()
    stats = SourceStats(skipped_files=list(skipped))
    cleaner = Cleaner(settings.cleaning_rules)

    # 1. read + clean, spooled to disk
    spool = _Spool(out_dir / "docs.spool")
    disk_total = sum(p.stat().st_size for p in files)
    with progress(disk_total, "reading and cleaning") as bar:

        def cleaned() -> Iterator[str]:
            for i, doc in enumerate(
                cleaner(read_documents(files, settings.text_field, settings.split_paragraphs, stats))
            ):
                if i % 1024 == 0:
                    bar.update(stats.disk_bytes - bar.n)
                yield doc

        spool.write_all(cleaned())
    if cleaner.docs_read == 0:
        raise _nothing_read(settings, stats)
    if cleaner.docs_kept == 0:
        drops = ", ".join(f"{r.name}: {r.dropped}" for r in cleaner.rules if r.dropped)
        raise DataError(
            f"data.cleaning dropped all {cleaner.docs_read} documents of {_summary(settings.paths)} ({drops})"
        )
    t_clean = time.perf_counter()

    # 2. split by document
    is_val = split_documents(cleaner.docs_kept, settings.val_fraction, settings.seed)
    sizes = spool.sizes_array()

    # 3. tokenizer
    if settings.tokenizer is not None:
        tok = load_tokenizer(settings.tokenizer)
        tok_info = {"trained": False, "source": str(settings.tokenizer)}
    else:
        used = [0]
        docs = _train_docs(spool, is_val, sizes, settings.tokenizer_sample_bytes, settings.seed, used)
        tok = train_tokenizer(docs, settings.vocab_size)
        tok_info = {
            "trained": True,
            "source": "trained on the train documents",
            "sample_bytes": settings.tokenizer_sample_bytes,
            "trained_on_bytes": used[0],
        }
    bos_id, eos_id, pad_id = special_ids(tok, name=str(settings.tokenizer))
    vocab_size = tok.get_vocab_size()
    dtype = token_dtype(vocab_size)
    t_tok = time.perf_counter()

    # 4. encode + pack into shards
    text_bytes = int(sizes.sum())
    n_proc = encode_processes(settings.num_proc, text_bytes)
    tok.save(str(out_dir / "tokenizer.json"))  # before encoding: worker processes load it
    writers = {split: _ShardWriter(out_dir, split, SHARD_TOKENS) for split in ("train", "val")}
    n_proc = _encode_all(spool, is_val, tok, bos_id, eos_id, dtype, writers, n_proc)
    index = {split: w.close() for split, w in writers.items()}
    counts = {split: w.total for split, w in writers.items()}
    spool.path.unlink()
    t_end = time.perf_counter()

    clean = cleaner.report()
    report = {
        "sources": {
            "paths": list(settings.paths),
            "files": stats.files,
            "bytes": stats.bytes,
            "empty_files": stats.empty_files,
            "skipped_files": len(stats.skipped_files),
        },
        "documents": clean["documents"],
        "characters": clean["characters"],
        "rules": clean["rules"],
        "invalid_utf8_replacements": stats.invalid_utf8_replacements,
        "skipped_files": stats.skipped_files[:100],
        "split": {
            "train_documents": int((~is_val).sum()),
            "val_documents": int(is_val.sum()),
            "val_fraction": settings.val_fraction,
            "seed": settings.seed,
        },
        "tokens": counts,
        "tokenizer": {"vocab_size": vocab_size, **tok_info, "bos_id": bos_id, "eos_id": eos_id, "pad_id": pad_id},
        "packing": {
            "dtype": dtype.name,
            "shards": {split: len(s) for split, s in index.items()},
            "encode_processes": n_proc,
            "text_bytes": text_bytes,
        },
        "cache": {"key": key, "hit": False},
        "settings": {k: v for k, v in asdict(settings).items() if k != "cleaning"},
        "timings": {
            "read_and_clean": round(t_clean - t0, 3),
            "tokenizer": round(t_tok - t_clean, 3),
            "encode_and_pack": round(t_end - t_tok, 3),
        },
        "seconds": round(time.perf_counter() - t0, 3),
    }
    _write_json(out_dir / "report.json", report)
    meta = {"key": key, "version": PIPELINE_VERSION, "dtype": dtype.name, **{f"n_{s}": counts[s] for s in counts}}
    _write_json(out_dir / "meta.json", {**meta, "shards": index, "complete": True})  # last: marks it usable
    return report


def _train_docs(
    spool: _Spool, is_val: np.ndarray, sizes: np.ndarray, sample_bytes: int | None, seed: int, used: list[int]
) -> Iterator[str]:
    """The train documents for tokenizer training; with ``sample_bytes``, a seeded random subset of about that
    many bytes spread over the whole corpus rather than its first files. Adds the bytes given to ``used[0]``."""
    keep_p = 1.0
    if sample_bytes is not None:
        total = int(sizes[~is_val].sum())
        keep_p = min(1.0, sample_bytes / max(total, 1))
    rng = np.random.default_rng(seed + 1)
    for i, doc in enumerate(spool.docs()):
        if is_val[i]:
            continue
        if keep_p < 1.0 and rng.random() >= keep_p:
            continue
        used[0] += int(sizes[i])
        yield doc


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)


def _load(out_dir: Path) -> PackedCorpus | None:
    """The cached corpus in ``out_dir``, or None if it is missing, incomplete or damaged."""
    try:
        meta = json.loads((out_dir / "meta.json").read_text(encoding="utf-8"))
        if not meta.get("complete") or meta.get("version") != PIPELINE_VERSION:
            return None
        report = json.loads((out_dir / "report.json").read_text(encoding="utf-8"))
        tok = Tokenizer.from_file(str(out_dir / "tokenizer.json"))
        dtype = np.dtype(meta["dtype"])
        index = meta["shards"]
        for split in ("train", "val"):
            if sum(s["tokens"] for s in index[split]) != meta[f"n_{split}"]:
                return None
            for s in index[split]:
                if (out_dir / s["file"]).stat().st_size != s["tokens"] * dtype.itemsize:
                    return None
    except Exception:  # unreadable, truncated or from another version: rebuild
        return None
    return PackedCorpus(out_dir, tok, dtype, meta["n_train"], meta["n_val"], report, index)


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive file lock, so that concurrent processes (DDP ranks) build a cache entry once."""
    try:
        import fcntl
    except ImportError:  # not POSIX: the atomic rename below still keeps the cache consistent
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def prepare_corpus(settings: CorpusSettings, cache_dir: str | Path) -> PackedCorpus:
    """Build the corpus described by ``settings`` under ``cache_dir``, or load it if already built."""
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        # We are being imported as the __main__ of a starting worker process: a script that calls this at top
        # level without the `if __name__ == "__main__":` guard. Stop now; the parent encodes in-process instead.
        raise RuntimeError(
            "prepare_corpus() called while a worker process starts: guard the calling script with "
            '`if __name__ == "__main__":`'
        )
    t0 = time.perf_counter()
    files, skipped = find_files(settings.paths)
    if not files:
        raise DataError(f"data.paths: no readable files in {_summary(settings.paths)}")
    key = cache_key(files, settings)
    cache_dir = Path(cache_dir).expanduser()
    out_dir = cache_dir / key
    corpus = _load(out_dir)
    if corpus is None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        with _lock(cache_dir / ".lock"):  # one lock file for the directory, not one left behind per key
            corpus = _load(out_dir)  # another process may have built it while we waited
            if corpus is None:
                for stale in cache_dir.glob(f"{key}.tmp-*"):  # left by a killed build: we hold the lock
                    shutil.rmtree(stale, ignore_errors=True)
                tmp = Path(tempfile.mkdtemp(prefix=f"{key}.tmp-", dir=cache_dir))
                try:
                    _build(files, skipped, settings, key, tmp)
                    if out_dir.exists():  # an incomplete or damaged leftover
                        shutil.rmtree(out_dir)
                    os.replace(tmp, out_dir)
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
                corpus = _load(out_dir)
                if corpus is None:
                    raise RuntimeError(f"data cache {out_dir} was just written but cannot be read back")
                return corpus  # report as built: hit false, seconds of the build
    corpus.report["cache"] = {"key": key, "hit": True}
    corpus.report["seconds"] = round(time.perf_counter() - t0, 3)
    return corpus
