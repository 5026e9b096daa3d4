"""NonFiniteGuard skips and counts non-finite steps, then stops with the last good state saved."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel

from callbacks.resilience import NonFiniteGuard, RngState, TrainingDiverged


class NaNAt(BoringModel):
    """BoringModel whose loss is NaN at the given steps; trained with SGD, or with fused AdamW (`fused=True`)."""

    def __init__(self, bad_steps: set[int], fused: bool = False) -> None:
        super().__init__()
        self.bad_steps = bad_steps
        self.fused = fused
        self.weights_before: dict[int, torch.Tensor] = {}

    def configure_optimizers(self):
        if self.fused:
            return torch.optim.AdamW(self.parameters(), lr=0.1, fused=True)
        return super().configure_optimizers()

    def training_step(self, batch, batch_idx):
        self.weights_before[self.global_step] = self.layer.weight.detach().clone()
        out = super().training_step(batch, batch_idx)
        if self.global_step in self.bad_steps:
            out["loss"] = out["loss"] * float("nan")
        return out


def trainer(tmp_path, guard, steps, *callbacks):
    return L.Trainer(
        default_root_dir=tmp_path,
        max_steps=steps,
        callbacks=[guard, *callbacks],
        logger=False,
        log_every_n_steps=4,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )


class OptimizerState(L.Callback):
    """Test helper: the AdamW step count of the first parameter before each step."""

    def __init__(self) -> None:
        self.steps: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        state = trainer.optimizers[0].state.get(pl_module.layer.weight, {})
        self.steps.append(float(state["step"]) if "step" in state else 0.0)


@pytest.mark.parametrize("fused", [False, True], ids=["sgd-host-check", "fused-adamw-on-device"])
def test_bad_steps_are_skipped_and_counted(tmp_path, fused):
    guard = NonFiniteGuard(dirpath=str(tmp_path), max_bad_steps=3)
    model = NaNAt({2, 3}, fused=fused)
    state = OptimizerState()
    trainer(tmp_path, guard, 6, state).fit(model)
    assert guard.skipped == 2
    # a skipped step leaves the weights (and AdamW's moments and step count) as they were
    assert torch.equal(model.weights_before[2], model.weights_before[3])
    assert torch.equal(model.weights_before[3], model.weights_before[4])
    assert not torch.equal(model.weights_before[4], model.weights_before[5])
    assert torch.isfinite(model.layer.weight).all()
    if fused:
        assert state.steps == [0, 1, 2, 2, 2, 3]


@pytest.mark.parametrize("fused", [False, True], ids=["sgd-host-check", "fused-adamw-on-device"])
def test_too_many_bad_steps_stop_with_last_good_state(tmp_path, fused):
    guard = NonFiniteGuard(dirpath=str(tmp_path), max_bad_steps=3)
    model = NaNAt({2, 3, 4, 5, 6, 7, 8, 9}, fused=fused)
    # noticed at once (host check), or by the fused path at the next logging step (every 4)
    expected = "6 non-finite steps in a row by step 8" if fused else "3 non-finite steps in a row by step 4"
    with pytest.raises(TrainingDiverged, match=expected):
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
