"""The progress bar shows train/loss without a tensor-to-Python read on every training step."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import train
from callbacks.progress import ProgressBar

REFRESH = 5
LOG_EVERY = 100  # no logger write inside the window below


class CountReads(L.Callback):
    """Counts `aten::_local_scalar_dense` (`.item()`, `float(t)`, `bool(t)`: a GPU sync) over steps [2, 12)."""

    def __init__(self) -> None:
        self.reads = 0
        self.postfix: dict = {}
        count = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func is torch.ops.aten._local_scalar_dense.default:
                    import traceback

                    # AdamW's step counters live on the host on every device (not capturable): not a device sync
                    if not any("/torch/optim/" in f.filename for f in traceback.extract_stack()[-6:]):
                        count.reads += 1
                return func(*args, **(kwargs or {}))

        self.mode = Mode()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == 2:
            self.mode.__enter__()
        if trainer.global_step == 12:
            self.mode.__exit__(None, None, None)

    def on_train_end(self, trainer, pl_module) -> None:
        for cb in trainer.callbacks:
            if isinstance(cb, ProgressBar):
                self.postfix = cb.get_metrics(trainer, pl_module)


def test_train_loss_is_read_only_when_the_bar_redraws(tiny_cfg, monkeypatch):
    counter = CountReads()
    cfg = tiny_cfg(
        "trainer.max_steps=14",
        f"trainer.log_every_n_steps={LOG_EVERY}",
        "trainer.val_check_interval=100",
        "trainer.limit_val_batches=1",
        f"callbacks.progress_bar={{_target_: callbacks.progress.ProgressBar, refresh_rate: {REFRESH}}}",
        # the callbacks that read a scalar by design (the non-finite check each step, norms, samples) are off
        "callbacks.nonfinite=null",
        "callbacks.norms=null",
        "callbacks.samples=null",
        "callbacks.throughput=null",
    )
    build_all = train.build_all
    monkeypatch.setattr(
        train,
        "build_all",
        lambda node, **kw: [*build_all(node, **kw), counter] if node is cfg.callbacks else build_all(node),
    )
    train.train(cfg)
    assert counter.reads <= 10 // REFRESH  # 10 steps: one read per redraw (Lightning's prog_bar: one per step)
    assert float(counter.postfix["train/loss"]) > 0
