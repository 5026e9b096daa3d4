"""A weighted mixture of token streams: how many windows each source gives an epoch, and in which order.

Every source is its own packed corpus, cut into ``seq_len + 1`` windows (:class:`~datamodules.dataset.TokenWindows`);
a window is ``seq_len`` predicted tokens whatever the source, so drawing windows in proportion to the weights is
sampling by *token* proportion, not by document. An epoch of the mixture is ``epoch_windows`` windows (default: as
many as all sources hold together), of which source ``s`` gives ``round(p_s * epoch_windows)`` (largest remainders,
so the counts add up exactly), ``p_s`` its normalised weight. A source with fewer windows than its share is
repeated, one with more is subsampled: each source walks an endless sequence of its own seeded permutations, an
epoch taking the next ``count_s`` windows of it, so a subsampled source shows all of its windows before any
repeats, and a repeated one shows each window once per pass. The epoch's windows are then shuffled together.

Everything is a function of ``(seed, epoch)``: :class:`MixtureSampler` is a
:class:`~datamodules.dataset.WindowSampler` with another ``order``, so its position (epoch, samples consumed) is
what a checkpoint keeps and a resumed run draws the same sequence (:mod:`datamodules.order`).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset

from datamodules.dataset import TokenWindows, WindowSampler
from llm.errors import DataError


@dataclass(frozen=True)
class MixturePlan:
    """Per source (in the order of ``names``): normalised weight, windows held, and windows drawn per epoch."""

    names: tuple[str, ...]
    shares: np.ndarray  # (S,) float64, summing to 1
    windows: np.ndarray  # (S,) int64: train windows each source holds
    per_epoch: np.ndarray  # (S,) int64: windows each source gives one epoch of the mixture

    @classmethod
    def build(
        cls, names: Sequence[str], weights: Sequence[float], windows: Sequence[int], epoch_windows: int | None = None
    ) -> MixturePlan:
        w = np.asarray(weights, dtype=np.float64)
        held = np.asarray(windows, dtype=np.int64)
        for name, weight, n in zip(names, w, held):
            if not np.isfinite(weight) or weight <= 0:
                raise DataError(f"data.sources.{name}.weight={weight} must be a positive number")
            if n < 1:
                raise DataError(f"data.sources.{name}: no whole train window of data.seq_len+1 tokens: add data")
        total = int(held.sum()) if epoch_windows is None else int(epoch_windows)
        if total < 1:
            raise DataError(f"data.epoch_tokens gives {total} windows per epoch: it must give at least one")
        shares = w / w.sum()
        exact = shares * total
        counts = np.floor(exact).astype(np.int64)
        left = total - int(counts.sum())
        counts[np.argsort(-(exact - counts), kind="stable")[:left]] += 1  # largest remainders: the sum is exact
        return cls(tuple(names), shares, held, counts)

    @property
    def epoch_windows(self) -> int:
        return int(self.per_epoch.sum())

    @property
    def offsets(self) -> np.ndarray:
        """(S,) index of each source's first window in the concatenated train dataset."""
        return np.concatenate([[0], np.cumsum(self.windows)[:-1]]).astype(np.int64)

    def repetitions(self) -> np.ndarray:
        """(S,) how many times an epoch shows each source's windows: above 1 repeated, below 1 subsampled."""
        return self.per_epoch / self.windows

    def source_windows(self, s: int, epoch: int, seed: int) -> np.ndarray:
        """The windows (indices into source ``s``) that source ``s`` gives ``epoch``: the next ``per_epoch[s]`` of its
        endless sequence of permutations."""
        n, count = int(self.windows[s]), int(self.per_epoch[s])
        start = epoch * count
        out, got = [], 0
        k, offset = divmod(start, n)
        while got < count:
            perm = self._permutation(s, k, seed)[offset:]
            take = perm[: count - got]
            out.append(take)
            got += len(take)
            k, offset = k + 1, 0
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    def _permutation(self, s: int, k: int, seed: int) -> np.ndarray:
        # seeded by the source's name, not its position: adding a source leaves the others' sequences alone
        key = zlib.crc32(self.names[s].encode("utf-8"))
        return np.random.default_rng([seed, key, k]).permutation(int(self.windows[s]))

    def order(self, epoch: int, seed: int) -> np.ndarray:
        """The epoch's windows as indices into the concatenated train dataset, shuffled together."""
        picks = [self.offsets[s] + self.source_windows(s, epoch, seed) for s in range(len(self.names))]
        everything = np.concatenate(picks)
        return everything[np.random.default_rng([seed, epoch, 0x313]).permutation(len(everything))]


class MixtureSampler(WindowSampler):
    """:class:`WindowSampler` over a mixture: an epoch is :meth:`MixturePlan.order` (cut to a multiple of the world
    size, sharded by rank); position, resume and state are the parent's."""

    def __init__(self, dataset: Dataset, plan: MixturePlan, *, seed: int, rank: int = 0, world_size: int = 1) -> None:
        super().__init__(dataset, shuffle=True, seed=seed, rank=rank, world_size=world_size)
        self.plan = plan
        self.n = plan.epoch_windows  # samples per epoch (the dataset holds the windows of every source)

    def order(self, epoch: int) -> torch.Tensor:
        usable = self.n - self.n % self.num_replicas
        return torch.from_numpy(self.plan.order(epoch, self.seed)[:usable])


def train_windows(sources: Sequence[TokenWindows]) -> ConcatDataset:
    """The sources' train windows as one dataset, source after source (:attr:`MixturePlan.offsets`)."""
    return ConcatDataset(list(sources))


class SourceWindows(Dataset):
    """The val windows of every source, interleaved, each tagged with its source's index (``source``, int64), which
    the module uses to measure each source apart (``val/loss/NAME``).

    Interleaved so that any first part of the val set (``trainer.limit_val_batches`` below 1) holds about the same
    fraction of every source: window ``j`` of a source of ``n`` comes at ``(j + 0.5) / n`` of the way.
    """

    def __init__(self, sources: Sequence[TokenWindows]) -> None:
        self.sources = list(sources)
        sizes = [len(w) for w in self.sources]
        source = np.repeat(np.arange(len(sizes)), sizes)
        local = np.concatenate([np.arange(n) for n in sizes]) if sizes else np.zeros(0, dtype=np.int64)
        where = (local + 0.5) / np.repeat(np.maximum(sizes, 1), sizes)
        order = np.lexsort((source, where))  # by position along each source, then by source
        self.source, self.local = source[order], local[order]

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(f"window {i} out of range ({len(self)} windows)")
        s = int(self.source[i])
        return {**self.sources[s][int(self.local[i])], "source": torch.tensor(s, dtype=torch.long)}

    def empty(self) -> dict[str, torch.Tensor]:
        """A window of padding only (every label ignored: it counts for no source)."""
        return {**self.sources[0].empty(), "source": torch.tensor(0, dtype=torch.long)}
