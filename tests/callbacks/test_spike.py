"""SpikeGuard: finite loss spikes are skipped and counted; a run of them rolls the run back and skips the data."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import Dataset

import train
from callbacks.resilience import LastCheckpoint
from callbacks.spike import ROLLBACK_NAME, SpikeGuard, SpikesPersist
from datamodules.dataset import WindowSampler
from datamodules.pretrain import PretrainDataModule
from tests.conftest import TINY, compose_config

# ------------------------------------------------------------------------------------------- the skip, alone


class SpikeAt(BoringModel):
    """BoringModel whose loss is 1000 times larger at the given steps; SGD, or fused AdamW (`fused=True`)."""

    def __init__(self, spikes: set[int], fused: bool = False) -> None:
        super().__init__()
        self.spikes, self.fused = spikes, fused
        self.weights_before: dict[int, torch.Tensor] = {}

    def configure_optimizers(self):
        if self.fused:
            return torch.optim.AdamW(self.parameters(), lr=0.01, fused=True)
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def training_step(self, batch, batch_idx):
        self.weights_before[self.global_step] = self.layer.weight.detach().clone()
        out = super().training_step(batch, batch_idx)
        if self.global_step in self.spikes:
            out["loss"] = out["loss"] * 1000.0
        return out


def fit(tmp_path, model, steps, guard):
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        max_steps=steps,
        callbacks=[guard],
        logger=False,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(model)
    return trainer


@pytest.mark.parametrize("fused", [False, True], ids=["sgd-host-check", "fused-adamw-on-device"])
def test_a_spike_is_skipped_and_counted(tmp_path, fused):
    guard = SpikeGuard(dirpath=str(tmp_path), sigmas=6, window=4, max_in_a_row=3)
    model = SpikeAt({6, 7}, fused=fused)  # steps 0-3 fill the window; 6 and 7 spike
    fit(tmp_path, model, 10, guard)
    assert guard.skips == 2 and guard.rollbacks == []
    assert torch.equal(model.weights_before[6], model.weights_before[7])  # a skipped step moves nothing
    assert torch.equal(model.weights_before[7], model.weights_before[8])
    assert not torch.equal(model.weights_before[8], model.weights_before[9])  # and training goes on
    assert torch.isfinite(model.layer.weight).all()


def test_spikes_in_a_row_without_a_checkpoint_stop_with_one_line(tmp_path):
    guard = SpikeGuard(dirpath=str(tmp_path), sigmas=6, window=4, max_in_a_row=3)
    with pytest.raises(
        SpikesPersist, match="3 steps in a row from step 7 skipped, and no checkpoint in .* from before"
    ):
        fit(tmp_path, SpikeAt({6, 7, 8, 9}), 12, guard)


class SpikeAtCall(SpikeAt):
    """Spikes at the given training batches, counted in calls: a rollback does not bring them back."""

    def __init__(self, spikes: set[int]) -> None:
        super().__init__(spikes)
        self.calls = 0

    def training_step(self, batch, batch_idx):
        out = BoringModel.training_step(self, batch, batch_idx)
        if self.calls in self.spikes:
            out["loss"] = out["loss"] * 1000.0
        self.calls += 1
        return out


class SavedSteps(L.Callback):
    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self.steps.append(trainer.global_step)


def test_steps_trained_again_after_a_rollback_are_saved_again(tmp_path):
    # last.ckpt and step=<n>.ckpt every 3 steps; batches 5-7 spike, so the third (step 8) rolls back to step 3,
    # past the saves at step 6 made during the spikes: the new branch's step 6 must be saved again, by both
    guard = SpikeGuard(dirpath=str(tmp_path), sigmas=6, window=4, max_in_a_row=3)
    saved = SavedSteps()
    every3 = ModelCheckpoint(dirpath=tmp_path / "every", filename="{step}", every_n_train_steps=3, save_top_k=-1)
    trainer = L.Trainer(
        default_root_dir=tmp_path, max_steps=9, limit_val_batches=0,
        callbacks=[guard, LastCheckpoint(dirpath=str(tmp_path), every_n_steps=3), every3, saved], logger=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
    )  # fmt: skip
    trainer.fit(SpikeAtCall({5, 6, 7}))
    assert [r["to_step"] for r in guard.rollbacks] == [3] and guard.rollbacks[0]["at_step"] == 8
    assert saved.steps == [3, 3, 6, 6, 3, 6, 6, 9, 9]  # the rollback's save (3), then step 6 again, by both
    again = torch.load(tmp_path / "every" / "step=6.ckpt", map_location="cpu", weights_only=False)
    assert len(again["callbacks"]["SpikeGuard"]["rollbacks"]) == 1  # written after the rollback
    last = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 9 and len(last["callbacks"]["SpikeGuard"]["rollbacks"]) == 1
    assert guard.status_fields() == {"spike_skips": 3, "spike_rollbacks": guard.rollbacks}


# ------------------------------------------------------------------------------------- a poisoned corpus, whole

STEPS = 36
POISONED = range(80, 96)  # samples of epoch 0's train order: batches 20-23 (4 samples each), the steps 21-24
JUNK_VOCAB = 512  # data.vocab_size in TINY
SPIKE = ["callbacks.spike.window=8", "callbacks.spike.max_in_a_row=3"]
RUN = [
    *TINY,
    f"trainer.max_steps={STEPS}",
    "trainer.val_check_interval=6",  # last.ckpt at steps 6, 12, 18, ...
    "trainer.precision=32-true",
    "callbacks.samples=null",
    "callbacks.attention=null",
    "callbacks.embeddings=null",
    *SPIKE,
]


class Junk(Dataset):
    """The train windows, with uniformly random tokens instead of text at the given positions of epoch 0's order."""

    def __init__(self, windows: Dataset, seed: int, positions: range) -> None:
        self.windows = windows
        order = WindowSampler(windows, shuffle=True, seed=seed, rank=0, world_size=1).order(0)
        self.poisoned = {int(i) for i in order[positions.start : positions.stop]}

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = dict(self.windows[i])
        if i in self.poisoned:
            g = torch.Generator().manual_seed(i)
            tokens = torch.randint(0, JUNK_VOCAB, (item["input_ids"].numel() + 1,), generator=g)
            item["input_ids"], item["labels"] = tokens[:-1], tokens[1:]
        return item


class PoisonedPretrain(PretrainDataModule):
    """The real pretraining DataModule over the embedded corpus, its train windows at ``POISONED`` junk."""

    def train_dataloader(self):
        self.prepare()
        if not isinstance(self.train_dataset, Junk):
            self.train_dataset = Junk(self.train_dataset, self.seed, POISONED)
        return super().train_dataloader()


PROBED: list[dict] = []


class RollbackProbe(L.Callback):
    """Test helper, after the guard: at a rollback, compares the live state with the checkpoint it went back to."""

    def __init__(self) -> None:
        self.seen = 0

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        guard = next(cb for cb in trainer.callbacks if isinstance(cb, SpikeGuard))
        if len(guard.rollbacks) == self.seen:
            return
        self.seen = len(guard.rollbacks)
        # the checkpoint it names is still the one it read (it is re-linked at the next step's start)
        ckpt = torch.load(guard.rollbacks[-1]["checkpoint"], map_location="cpu", weights_only=False)
        live = pl_module.state_dict()
        optimizer = trainer.optimizers[0]
        saved_opt = ckpt["optimizer_states"][0]["state"]
        PROBED.append(
            {
                "global_step": trainer.global_step,
                "checkpoint_step": ckpt["global_step"],
                "weights": all(torch.equal(live[k], v) for k, v in ckpt["state_dict"].items()),
                "moments": all(
                    torch.equal(optimizer.state[p]["exp_avg"], saved_opt[i]["exp_avg"])
                    for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])
                ),
                "lr": optimizer.param_groups[0]["lr"] == ckpt["optimizer_states"][0]["param_groups"][0]["lr"],
                "record": guard.rollbacks[-1],
            }
        )


def scalars(run_dir: Path, tag: str) -> dict[int, float]:
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)} if tag in acc.Tags()["scalars"] else {}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_cache):
    """A clean run and a poisoned one (with the guard, as configured by default but for a short window)."""
    root = tmp_path_factory.mktemp("spike")
    clean = train.train(compose_config(RUN, run_dir=root / "clean", cache_dir=data_cache))
    PROBED.clear()
    poisoned_cfg = [
        *RUN,
        "data._target_=tests.callbacks.test_spike.PoisonedPretrain",
        "+callbacks.probe._target_=tests.callbacks.test_spike.RollbackProbe",
    ]
    poisoned = train.run(compose_config(poisoned_cfg, run_dir=root / "poisoned", cache_dir=data_cache))
    return {"clean": clean, "poisoned": poisoned.value, "fields": poisoned.fields, "root": root,
            "probed": list(PROBED)}  # fmt: skip


@pytest.mark.slow
def test_poisoned_batches_roll_back_and_are_skipped(runs):
    run = runs["root"] / "poisoned"
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    state = ckpt["callbacks"]["SpikeGuard"]
    # steps 21-23 spike (batches 20-22), the third in a row rolls back to step 18, the last validation's
    # checkpoint; the data goes on, so the fourth poisoned batch is read once more: one skip, no rollback
    assert state["skips"] == 4
    assert len(state["rollbacks"]) == 1
    record = state["rollbacks"][0]
    assert record["first_spike_step"] == 21 and record["at_step"] == 23 and record["to_step"] == 18
    assert record["skipped_batches"] == 5  # batches 18-22, read since step 18's checkpoint
    assert record["skipped_from"] == {"epoch": 0, "sample": 72} and record["skipped_to"] == {"epoch": 0, "sample": 92}
    assert Path(record["checkpoint"]).name == ROLLBACK_NAME
    # the run still takes its 36 steps, reading 5 batches more; its data position says so (global samples)
    assert ckpt["global_step"] == STEPS
    assert ckpt["PoisonedPretrain"]["position"] == (STEPS + 5) * 4  # the DataModule, by its class name
    assert max(scalars(run, "train/spike_skips").values()) == 4
    # and status.json says so (train.main writes these fields)
    assert runs["fields"]["spike_skips"] == 4 and runs["fields"]["spike_rollbacks"] == [record]


@pytest.mark.slow
def test_the_rollback_restores_the_checkpoint_exactly(runs):
    (probe,) = runs["probed"]
    assert probe["global_step"] == probe["checkpoint_step"] == 18
    assert probe["weights"] and probe["moments"] and probe["lr"]


@pytest.mark.slow
def test_the_poisoned_run_ends_close_to_the_clean_one(runs):
    clean, poisoned = runs["clean"], runs["poisoned"]
    assert abs(poisoned - clean) < 0.05 * clean, (clean, poisoned)
