"""Throughput and MFU, logged as ``perf/tokens_per_sec`` and ``perf/mfu``.

Lightning's ``ThroughputMonitor`` logs under its own names and takes its device peaks from a table that
lists sparse figures for some GPUs (2.0e15 for H200), which halves MFU; this callback uses the dense peaks
of ``llm.runtime.hardware`` and the FLOPs formula of ``llm.core.flops`` (the one the planner uses).
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch

from llm.core.flops import flops_per_token
from llm.runtime.hardware import peak_flops, peak_memory_bytes
from llm.runtime.topology import data_parallel_rank


class Throughput(L.Callback):
    """Tokens per second over the last ``window`` optimizer steps, on every logging step.

    Time is measured between batch starts on rank 0 and covers everything the loop does (data, forward,
    backward, optimizer, logging), so it is what a user waits for. Tokens are counted for all ranks.
    """

    def __init__(self, window: int = 10) -> None:
        self.window = window
        self._times: list[float] = []
        self._tokens: list[int] = []
        self._flops_per_token: float | None = None
        self._peak: float | None = None
        self._replicas = 1

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        seq_len = trainer.datamodule.seq_len if trainer.datamodule is not None else pl_module.config.max_seq_len
        self._flops_per_token = flops_per_token(pl_module.config, seq_len)
        self._peak = peak_flops(pl_module.device, trainer.precision)
        self._replicas = data_parallel_rank(trainer)[1]  # each reads its own batch (a TP group shares one)
        self._times, self._tokens = [], []

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._times.append(time.perf_counter())
        self._tokens.append(batch["input_ids"].numel() * self._replicas)
        del self._times[: -self.window - 1], self._tokens[: -self.window - 1]

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # the loop logs on (global_step % log_every_n_steps == 0); mirror it so we add no extra syncs
        if len(self._times) < 2 or trainer.global_step % max(1, trainer.log_every_n_steps) != 0:
            return
        elapsed = self._times[-1] - self._times[0]
        tokens = sum(self._tokens[:-1])  # the batches that finished between the first and last start
        if elapsed <= 0:
            return
        tokens_per_sec = tokens / elapsed
        metrics = {"perf/tokens_per_sec": tokens_per_sec}
        if self._peak and self._flops_per_token:
            per_device = tokens_per_sec / trainer.world_size
            metrics["perf/mfu"] = per_device * self._flops_per_token / self._peak
        metrics["perf/peak_memory_gb"] = peak_memory_bytes(pl_module.device) / 2**30
        pl_module.log_dict({k: torch.tensor(v) for k, v in metrics.items()}, on_step=True, on_epoch=False)
