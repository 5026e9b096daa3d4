"""A progress bar that shows the training loss without a host-device synchronisation on every step."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar


class ProgressBar(TQDMProgressBar):
    """Lightning's TQDM bar, with the metrics in ``show`` read from ``trainer.callback_metrics`` at refresh only.

    Logging with ``self.log(..., prog_bar=True)`` makes Lightning turn the value into a Python number every time
    its metrics are read, which is at least once per step: a ``.item()``, so a GPU sync per step that stalls
    the queue of kernels (``python bench/train_cpu.py --syncs`` counts them). Here the module logs without
    ``prog_bar`` and the bar reads the tensors itself, once per ``refresh_rate`` steps when it redraws.
    """

    def __init__(self, refresh_rate: int = 10, show: tuple[str, ...] = ("train/loss",), **kwargs: Any) -> None:
        super().__init__(refresh_rate=refresh_rate, **kwargs)
        self.show = tuple(show)

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, int | str | float]:
        items = super().get_metrics(trainer, pl_module)
        metrics = trainer.callback_metrics
        for name in self.show:
            value = metrics.get(name)
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                items[name] = f"{value.item():.3f}"
        return items
