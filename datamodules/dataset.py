"""Windows over a packed token stream, and the sampler that orders and shards them.

Sample ``i`` is the ``seq_len + 1`` tokens starting at ``i * seq_len``: consecutive windows share one
token, so every token of the stream but the first is a label exactly once. ``input_ids`` is the window
without its last token and ``labels`` the window without its first. Without ``tail`` (training) the
tokens after the last whole window are left out; with it (validation) a last, shorter window takes them,
padded to ``seq_len`` with ``pad_id`` inputs and ``IGNORE_INDEX`` labels, so the whole stream is measured.
:class:`EvenWindows` adds empty windows (every label ignored) so that every rank reads as many batches.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler

from datamodules.shards import TokenShards

IGNORE_INDEX = -100  # label value the loss ignores (the padding of a val tail window; train windows have none)


class TokenWindows(Dataset):
    """Non-overlapping ``seq_len + 1`` windows over a token stream (the format of :mod:`datamodules.shards`).

    ``source`` is one token file, or a split's shards as ``(path, tokens)`` pairs read as one stream (a window
    may span two shards). The memory maps open lazily in each process, so the dataset pickles cheaply into
    DataLoader workers (a pickled ``np.memmap`` would copy the whole array). ``tail``: a last, padded window
    holds the tokens after the last whole one (see the module's docstring).
    """

    def __init__(
        self,
        source: str | Path | Sequence[tuple[str | Path, int]],
        dtype: np.dtype | str,
        n_tokens: int,
        seq_len: int,
        *,
        tail: bool = False,
        pad_id: int = 0,
    ) -> None:
        if seq_len < 1:
            raise ValueError(f"data.seq_len={seq_len} must be positive")
        shards = [(source, int(n_tokens))] if isinstance(source, (str, Path)) else list(source)
        self.tokens = TokenShards(shards, dtype)
        if len(self.tokens) != int(n_tokens):
            raise ValueError(f"the shards hold {len(self.tokens)} tokens, not n_tokens={n_tokens}")
        self.dtype = self.tokens.dtype
        self.n_tokens = int(n_tokens)
        self.seq_len = int(seq_len)
        self.tail = bool(tail)
        self.pad_id = int(pad_id)

    def __len__(self) -> int:
        labels = max(0, self.n_tokens - 1)  # every token but the first is a label
        return -(-labels // self.seq_len) if self.tail else labels // self.seq_len

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(f"window {i} out of range ({len(self)} windows)")
        start = i * self.seq_len
        window = torch.from_numpy(self.tokens[start : start + self.seq_len + 1].astype(np.int64))
        input_ids, labels = window[:-1], window[1:]
        if len(labels) < self.seq_len:  # the tail window
            pad = self.seq_len - len(labels)
            input_ids = torch.cat([input_ids, torch.full((pad,), self.pad_id, dtype=torch.long)])
            labels = torch.cat([labels, torch.full((pad,), IGNORE_INDEX, dtype=torch.long)])
        return {"input_ids": input_ids, "labels": labels}


class EvenWindows(Dataset):
    """``windows`` followed by empty windows (``pad_id`` inputs, every label ``IGNORE_INDEX``) up to a multiple of
    ``multiple``: the val dataset of ``multiple`` ranks.

    :class:`WindowSampler` cuts an order to a multiple of the world size; validation must not lose windows, nor
    repeat them as ``DistributedSampler`` does (a repeated window would count twice), and every rank must run as
    many forward passes (a sharded model gathers its weights in each). The empty windows add nothing to the loss
    or the metrics, so the ranks together measure every window exactly once.
    """

    def __init__(self, windows: TokenWindows, multiple: int) -> None:
        self.windows = windows
        n = len(windows)
        self.n = -(-n // multiple) * multiple if n else 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < self.n:
            raise IndexError(f"window {i} out of range ({self.n} windows)")
        if i < len(self.windows):
            return self.windows[i]
        seq_len = self.windows.seq_len
        return {
            "input_ids": torch.full((seq_len,), self.windows.pad_id, dtype=torch.long),
            "labels": torch.full((seq_len,), IGNORE_INDEX, dtype=torch.long),
        }


class WindowSampler(DistributedSampler):
    """Deterministic order of sample indices, sharded over ranks, resumable mid-epoch.

    The epoch's order is a permutation seeded by ``(seed, epoch)`` (or ``0..n-1`` without ``shuffle``),
    cut to a multiple of ``world_size`` so that every rank gets the same number of samples; rank ``r``
    takes every ``world_size``-th index from ``r``. The ranks together walk the order front to back, so
    the position — samples of the order consumed, over all ranks — is one number, and a run resumed from
    it (even with another world size) continues exactly where it stopped.

    It subclasses ``DistributedSampler`` only so that Lightning sees the dataloader as already sharded
    and leaves it alone.
    """

    def __init__(
        self, dataset: Dataset, *, shuffle: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1
    ) -> None:
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=True)
        self.n = len(dataset)  # type: ignore[arg-type]
        self.epoch = 0
        self._yielded = 0  # by this rank, in the current iteration
        self._start = 0  # position the current iteration started from
        self._resume: tuple[int, int] | None = None  # (epoch, position) to start the next iteration from

    def order(self, epoch: int) -> torch.Tensor:
        """The epoch's order over all ranks (cut to a multiple of the world size)."""
        usable = self.n - self.n % self.num_replicas
        if not self.shuffle:
            return torch.arange(usable)
        g = torch.Generator()
        g.manual_seed(self.seed + epoch)
        return torch.randperm(self.n, generator=g)[:usable]

    def __len__(self) -> int:
        """Samples of this rank in a whole epoch (Lightning counts resumed batches itself)."""
        return self.n // self.num_replicas

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def position(self) -> int:
        """Samples of this epoch's order consumed so far, over all ranks."""
        return self._start + self._yielded * self.num_replicas

    def __iter__(self) -> Iterator[int]:
        start = 0
        if self._resume is not None and self._resume[0] == self.epoch:
            start = self._resume[1]
        self._resume = None
        order = self.order(self.epoch)
        start = min(start, len(order))
        remaining = order[start:]
        remaining = remaining[: len(remaining) - len(remaining) % self.num_replicas]
        self._start, self._yielded = start, 0
        for i in remaining[self.rank :: self.num_replicas].tolist():
            self._yielded += 1
            yield i

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from ``state``: the next iteration of ``state["epoch"]`` skips what was consumed."""
        self.epoch = int(state["epoch"])
        self._resume = (self.epoch, int(state["position"]))
        self._start, self._yielded = int(state["position"]), 0
