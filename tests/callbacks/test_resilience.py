"""NonFiniteGuard skips and counts non-finite steps, then stops with the last good state saved."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel

from callbacks.resilience import NonFiniteGuard, RngState, TrainingDiverged


class NaNAt(BoringModel):
    """BoringModel whose loss is NaN at the given steps."""

    def __init__(self, bad_steps: set[int]) -> None:
        super().__init__()
        self.bad_steps = bad_steps
        self.weights_before: dict[int, torch.Tensor] = {}

    def training_step(self, batch, batch_idx):
        self.weights_before[self.global_step] = self.layer.weight.detach().clone()
        out = super().training_step(batch, batch_idx)
        if self.global_step in self.bad_steps:
            out["loss"] = out["loss"] * float("nan")
        return out


def trainer(tmp_path, guard, steps):
    return L.Trainer(
        default_root_dir=tmp_path,
        max_steps=steps,
        callbacks=[guard],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )


def test_bad_steps_are_skipped_and_counted(tmp_path):
    guard = NonFiniteGuard(dirpath=str(tmp_path), max_bad_steps=3)
    model = NaNAt({2, 3})
    trainer(tmp_path, guard, 6).fit(model)
    assert guard.skipped == 2
    # a skipped step leaves the weights as they were
    assert torch.equal(model.weights_before[2], model.weights_before[3])
    assert torch.equal(model.weights_before[3], model.weights_before[4])
    assert not torch.equal(model.weights_before[4], model.weights_before[5])
    assert torch.isfinite(model.layer.weight).all()


def test_too_many_bad_steps_stop_with_last_good_state(tmp_path):
    guard = NonFiniteGuard(dirpath=str(tmp_path), max_bad_steps=3)
    model = NaNAt({2, 3, 4, 5, 6})
    with pytest.raises(TrainingDiverged, match="3 non-finite steps in a row"):
        trainer(tmp_path, guard, 10).fit(model)
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)["state_dict"]["layer.weight"]
    assert torch.isfinite(saved).all()
    assert torch.equal(saved, model.weights_before[2])  # the state before the first bad step


def test_rng_state_round_trips():
    cb = RngState()
    state = cb.state_dict()
    a = (torch.rand(3), __import__("numpy").random.rand(), __import__("random").random())
    cb.load_state_dict(state)
    b = (torch.rand(3), __import__("numpy").random.rand(), __import__("random").random())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]
