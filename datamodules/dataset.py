"""Windows over a packed token stream, and the sampler that orders and shards them.

Sample ``i`` is the ``seq_len + 1`` tokens starting at ``i * seq_len``: consecutive windows share one
token, so every token of the stream but the first is a label exactly once. ``input_ids`` is the window
without its last token and ``labels`` the window without its first. Without ``tail`` (training) the
tokens after the last whole window are left out; with it (validation) a last, shorter window takes them,
padded to ``seq_len`` with ``pad_id`` inputs and ``IGNORE_INDEX`` labels, so the whole stream is measured.
:class:`EvenWindows` adds empty windows (every label ignored) so that every rank reads as many batches.

Document masking (``eos_id`` given): each window also carries ``segments`` and ``positions`` (see
:func:`document_layout`), computed here from the EOS tokens of the window, so the prepared stream (and its cache)
is the same with or without it. Labels do not change: masking changes what each token attends to, not what it
predicts, so the loss covers the same tokens either way.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler

from datamodules.shards import TokenShards

IGNORE_INDEX = -100  # label value the loss ignores (the padding of a val tail window; train windows have none)


def document_layout(input_ids: torch.Tensor, eos_id: int, n_real: int | None = None) -> dict[str, torch.Tensor]:
    """``segments`` and ``positions`` (T,) int64 of a window's inputs (T,) of a packed ``BOS doc EOS BOS ...`` stream.

    A new segment begins after each EOS: the EOS belongs to the document it closes, as it is predicted from that
    document's tokens. ``positions`` restart at 0 at each segment's first token (its BOS; the first text token with a
    tokenizer whose BOS is its EOS, which encoding then leaves out). The first segment of a window may be the end of
    a document that began in an earlier window: its positions start at 0 as well, as the tokens before the window
    are not there to attend to (rotary attention depends only on the distance between positions, so the offset
    would change nothing, and 0 keeps positions below ``seq_len``). Past ``n_real`` (the padding of a val tail
    window) the inputs are padding: a segment of its own, so padding never sees a real token, at position 0 (what
    the packed SFT rows do); an EOS used as padding starts no segment.
    The label of a document's EOS is the next document's BOS: kept, predicted from the EOS's own document (it is a
    label without the mask too, so the loss counts the same tokens and val/loss compares with runs without it).
    """
    T = input_ids.shape[0]
    n = T if n_real is None else n_real
    starts = torch.zeros(n, dtype=torch.bool)  # (n,) True at each segment's first token
    if n:
        starts[0] = True
        starts[1:] = input_ids[: n - 1] == eos_id
    index = torch.arange(n)
    first = torch.where(starts, index, 0).cummax(0).values  # (n,) where each token's segment begins
    segments = torch.zeros(T, dtype=torch.long)
    positions = torch.zeros(T, dtype=torch.long)
    segments[:n] = starts.cumsum(0) - 1
    positions[:n] = index - first
    segments[n:] = int(segments[n - 1]) + 1 if n else 0
    return {"segments": segments, "positions": positions}


class TokenWindows(Dataset):
    """Non-overlapping ``seq_len + 1`` windows over a token stream (the format of :mod:`datamodules.shards`).

    ``source`` is one token file, or a split's shards as ``(path, tokens)`` pairs read as one stream (a window
    may span two shards). The memory maps open lazily in each process, so the dataset pickles cheaply into
    DataLoader workers (a pickled ``np.memmap`` would copy the whole array). ``tail``: a last, padded window
    holds the tokens after the last whole one (see the module's docstring). ``eos_id``: windows also carry
    ``segments`` and ``positions`` (:func:`document_layout`), for attention that stays inside each document.
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
        eos_id: int | None = None,
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
        self.eos_id = None if eos_id is None else int(eos_id)

    def __len__(self) -> int:
        labels = max(0, self.n_tokens - 1)  # every token but the first is a label
        return -(-labels // self.seq_len) if self.tail else labels // self.seq_len

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(f"window {i} out of range ({len(self)} windows)")
        start = i * self.seq_len
        window = torch.from_numpy(self.tokens[start : start + self.seq_len + 1].astype(np.int64))
        input_ids, labels = window[:-1], window[1:]
        n_real = len(labels)
        if n_real < self.seq_len:  # the tail window
            pad = self.seq_len - n_real
            input_ids = torch.cat([input_ids, torch.full((pad,), self.pad_id, dtype=torch.long)])
            labels = torch.cat([labels, torch.full((pad,), IGNORE_INDEX, dtype=torch.long)])
        if self.eos_id is None:
            return {"input_ids": input_ids, "labels": labels}
        return {"input_ids": input_ids, "labels": labels, **document_layout(input_ids, self.eos_id, n_real)}

    def empty(self) -> dict[str, torch.Tensor]:
        """A window of padding only (every label ignored), with the keys of the others."""
        input_ids = torch.full((self.seq_len,), self.pad_id, dtype=torch.long)
        window = {"input_ids": input_ids, "labels": torch.full((self.seq_len,), IGNORE_INDEX, dtype=torch.long)}
        if self.eos_id is not None:
            window.update(document_layout(input_ids, self.eos_id, 0))
        return window


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
        return self.windows.empty()


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
