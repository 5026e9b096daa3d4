"""The on-disk token shard format: one split's token ids as a sequence of headerless binary files, and its index.

A split (``"train"`` or ``"val"``) is the files ``<split>-00000.bin``, ``<split>-00001.bin`` ... in one directory,
each at most :data:`SHARD_TOKENS` token ids stored back to back in the native byte order as :func:`token_dtype`
(uint16 when the vocabulary allows, else uint32), with no header. Their index, kept by whoever writes them (the
corpus cache keeps it in ``meta.json``), is the list of ``{"file": name, "tokens": count}`` in order; an empty split
still has one (empty) shard, so the index is never empty. Read in order, the shards are one token stream.

:class:`ShardWriter` writes a split; :class:`TokenShards` reads it back, memory-mapped, as one sequence;
:func:`shards_intact` checks files against their index.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

SHARD_TOKENS = 1 << 28  # tokens per shard file (512 MiB of uint16)

ShardIndex = list[dict[str, Any]]  # [{"file": "train-00000.bin", "tokens": 268435456}, ...] in order


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def shard_name(split: str, i: int) -> str:
    """The file name of shard ``i`` of ``split``."""
    return f"{split}-{i:05d}.bin"


class ShardWriter:
    """Appends a split's tokens to ``<split>-00000.bin``, ``<split>-00001.bin`` ... of at most ``shard_tokens``
    (default :data:`SHARD_TOKENS`, read when the writer is made); :meth:`close` returns the index."""

    def __init__(self, out_dir: Path, split: str, shard_tokens: int | None = None) -> None:
        self.out_dir, self.split = Path(out_dir), split
        self.shard_tokens = SHARD_TOKENS if shard_tokens is None else int(shard_tokens)
        self.index: ShardIndex = []
        self._f: IO[bytes] | None = None
        self.total = 0

    def _next(self) -> None:
        if self._f is not None:
            self._f.close()
        name = shard_name(self.split, len(self.index))
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

    def close(self) -> ShardIndex:
        if self._f is None:  # an empty split still gets its (empty) shard: the index is never empty
            self._next()
        assert self._f is not None
        self._f.close()
        return self.index


def shards_intact(directory: Path, index: ShardIndex, dtype: np.dtype | str, n_tokens: int) -> bool:
    """Whether the shards of ``index`` in ``directory`` hold ``n_tokens`` in all, each file of the size its
    index entry says (a truncated or missing file is not)."""
    itemsize = np.dtype(dtype).itemsize
    if sum(int(s["tokens"]) for s in index) != n_tokens:
        return False
    for s in index:
        path = Path(directory) / s["file"]
        if not path.is_file() or path.stat().st_size != int(s["tokens"]) * itemsize:
            return False
    return True


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
