"""The train order of a DataModule, resumable mid-epoch: a ``WindowSampler`` whose position travels in checkpoints.

Every DataModule that trains (text windows, SFT examples or packed rows, labelled texts, preference pairs) mixes in
:class:`ResumableOrder`: its train loader is a :class:`ResumableLoader` over a ``WindowSampler`` sharded by
data-parallel rank, and its ``state_dict`` is the sampler's epoch and position, so a run stopped mid-epoch
continues with the very next batch (without it Lightning restarts the epoch: another order, another run).
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.data import DataLoader, Dataset

from datamodules.dataset import WindowSampler
from llm.errors import UserError
from llm.runtime.topology import data_parallel_rank, process_rank


def own_generator(seed: int) -> torch.Generator:
    """For a DataLoader: without one, each new iterator draws its workers' base seed from the global RNG, and a
    resumed run, creating its iterator at another step, would then draw dropout masks from another state."""
    return torch.Generator().manual_seed(seed)


class ResumableLoader(DataLoader):
    """The train DataLoader, marked resumable for Lightning (it has ``state_dict``/``load_state_dict``).

    The state is the DataModule's own (the sampler position): Lightning saves it twice, in the
    DataModule's and in the fit loop's entry of a checkpoint, and restoring either gives the same result.
    Without the mark Lightning warns, wrongly, that a mid-epoch resume is unreliable.
    """

    datamodule: ResumableOrder | None = None

    def state_dict(self) -> dict[str, Any]:
        return self.datamodule.state_dict() if self.datamodule is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.datamodule is not None:
            self.datamodule.load_state_dict(state_dict)


class ResumableOrder:
    """Mixed into a LightningDataModule that has ``seed`` and ``batch_size``; call ``train_loader`` for training."""

    train_sampler: WindowSampler | None = None
    _pending_state: dict[str, Any] | None = None

    def rank_and_world(self) -> tuple[int, int]:
        """This process's data-parallel rank and the number of data-parallel replicas."""
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return data_parallel_rank(trainer)
        return process_rank()

    def train_order(self, dataset: Dataset) -> WindowSampler:
        """A fresh shuffled order of ``dataset`` for this rank, at the restored position if there is one."""
        rank, world = self.rank_and_world()
        self.train_sampler = WindowSampler(dataset, shuffle=True, seed=self.seed, rank=rank, world_size=world)
        if self._pending_state is not None:
            self.train_sampler.load_state_dict(self._pending_state)
            self._pending_state = None
        return self.train_sampler

    def train_loader(self, dataset: Dataset, drop_last: bool = True, **kwargs: Any) -> ResumableLoader:
        """A loader over ``train_order(dataset)``; ``kwargs`` go to the DataLoader. A last, partial batch
        (``drop_last=False``) only ever ends an epoch, so counting full batches still finds the position."""
        sampler = self.train_order(dataset)
        loader = ResumableLoader(dataset, batch_size=self.batch_size, sampler=sampler, drop_last=drop_last,
                                 generator=own_generator(self.seed), **kwargs)  # fmt: skip
        loader.datamodule = self
        return loader

    def state_dict(self) -> dict[str, Any]:
        """The train sampler's epoch and position (samples of the epoch's order consumed, all ranks)."""
        if self.train_sampler is None:
            return dict(self._pending_state or {})
        state = self.train_sampler.state_dict()
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.state.fn == TrainerFn.FITTING:
            # The sampler runs ahead of training (workers prefetch); count what the loop consumed instead.
            # Lightning's counter includes batches before a resume, and restores the same count.
            batches = trainer.fit_loop.epoch_loop.batch_progress.current.processed
            state["position"] = batches * self.batch_size * self.train_sampler.num_replicas
        # samples per loader step over all ranks: what Lightning's batch counters count in (see adapt_checkpoint)
        state["batch_samples"] = self.batch_size * self.train_sampler.num_replicas
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.train_sampler is not None:
            self.train_sampler.load_state_dict(state_dict)
        else:
            self._pending_state = dict(state_dict)

    def adapt_checkpoint(self, checkpoint: dict[str, Any], path: Any = None) -> None:
        """Lightning's counts of train batches in ``checkpoint`` (micro-batches: epoch position, accumulation
        boundaries, validation interval) made this run's, when it reads another number of samples per batch
        over all ranks (another world size or ``data.batch_size``): the position in samples is what is kept.

        Called from the LightningModule's ``on_load_checkpoint``, before Lightning restores its loops.
        """
        state = checkpoint.get(type(self).__qualname__) or {}
        progress = (checkpoint.get("loops") or {}).get("fit_loop", {}).get("epoch_loop.batch_progress")
        if not progress:
            return
        saved = state.get("batch_samples")
        processed = int(progress["current"]["processed"])
        if saved is None and processed and int(state.get("position", 0)) % processed == 0:
            saved = int(state["position"]) // processed  # a checkpoint from before batch_samples was recorded
        _, world = self.rank_and_world()
        now = int(self.batch_size) * world
        if saved is None or int(saved) == now:
            return
        saved = int(saved)
        samples = int(progress["current"]["processed"]) * saved
        if samples % now:
            raise UserError(
                f"{path or 'checkpoint'}: saved {samples} samples into the epoch, which is not a whole number of"
                f" this run's batches of {self.batch_size} x {world} data-parallel replicas = {now} samples"
                " (choose data.batch_size so that it is, or resume with the world size that saved it)"
            )
        for part in ("current", "total"):
            counts = progress[part]
            processed = int(counts["processed"])
            scaled = processed * saved // now  # exact for `current`; `total` spans epochs and only its offsets matter
            for key, value in counts.items():
                counts[key] = scaled - (processed - int(value))  # a batch in flight at the save stays in flight
