"""PyTorch profiler traces of a few training steps, for TensorBoard's PyTorch Profiler tab (``profiler=pytorch``).

The trace is torch's Chrome trace format (``<dirpath>/<host>_<pid>.<time>.pt.trace.json``), written by
``torch.profiler.tensorboard_trace_handler``: the torch-tb-profiler plugin lists every directory under
TensorBoard's ``--logdir`` that holds such files, and chrome://tracing or Perfetto open them too.

Why a callback rather than Lightning's ``trainer.profiler=pytorch``: train.py calls the Trainer three times (the
step-0 validation, fit, the validation of the best checkpoint) and Lightning's PyTorchProfiler profiles each call
with one schedule. A call that ends before the schedule's warm-up step fails with an AssertionError from torch:
validation off, or a validation of fewer than 5 batches (the tests' two), after which Lightning drops its default
schedule and the next call records nothing. In fit the training and validation steps share one profiler, so a
trace mixes them. This one profiles the training steps only, once per
run, counting optimizer steps (a step under gradient accumulation is all its micro-batches).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.profiler import ProfilerActivity, schedule, tensorboard_trace_handler

from llm.errors import UserError


class TraceProfiler(L.Callback):
    """Profiles optimizer steps ``wait + warmup + 1`` to ``wait + warmup + active`` of the run (counted from the
    step it starts or resumes at) and writes their trace to ``dirpath``; the other steps run unprofiled.

    Args:
        dirpath: where the trace goes (``${run_dir}/profiler``: ``tensorboard --logdir outputs`` finds it).
        wait: steps run without the profiler first (the first steps allocate optimizer state, warm caches).
        warmup: steps run under the profiler but not recorded (torch's advice: its own start-up cost).
        active: steps recorded; each is a few MB of trace for the default model.
        record_shapes, profile_memory, with_stack: torch.profiler.profile's options (larger traces; the memory
            view of the plugin needs ``profile_memory``, its call stacks ``with_stack``).
    """

    def __init__(
        self,
        dirpath: str,
        wait: int = 5,
        warmup: int = 1,
        active: int = 3,
        record_shapes: bool = False,
        profile_memory: bool = False,
        with_stack: bool = False,
    ) -> None:
        if wait < 0 or warmup < 0 or active < 1:
            raise UserError(f"profiler: wait={wait} and warmup={warmup} must be >= 0, active={active} >= 1")
        self.dirpath = str(dirpath)
        self.wait, self.warmup, self.active = wait, warmup, active
        self.options = {"record_shapes": record_shapes, "profile_memory": profile_memory, "with_stack": with_stack}
        self._profiler: torch.profiler.profile | None = None
        self._start = self._last_step = 0
        self.done = False  # one window per run: fit is called once, but keep a second call from profiling again

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.done or self._profiler is not None:
            return
        activities = [ProfilerActivity.CPU]
        if pl_module.device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        handler = tensorboard_trace_handler(self.dirpath)
        self._start = trainer.global_step

        def on_trace_ready(profiler: torch.profiler.profile) -> None:
            handler(profiler)
            first, last = self._window()
            last = min(last, self._start + profiler.step_num)  # a run that ended inside the window
            # torch counts its ProfilerStep#k from 0 at the profiler's start
            k = first - self._start - 1
            rank_zero_info(
                f"profiler: optimizer steps {first}-{last} (ProfilerStep#{k}-{k + last - first}) traced in {self.dirpath}"
            )

        self._profiler = torch.profiler.profile(
            activities=activities,
            schedule=schedule(wait=self.wait, warmup=self.warmup, active=self.active, repeat=1),
            on_trace_ready=on_trace_ready,
            **self.options,
        )
        self._last_step = self._start
        self._profiler.start()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._profiler is None or trainer.global_step == self._last_step:  # a micro-batch, not a step yet
            return
        self._last_step = trainer.global_step
        self._profiler.step()
        if self._profiler.step_num >= self.wait + self.warmup + self.active:  # the trace is written: stop now
            self._stop()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop()  # a run shorter than the window: torch writes the steps it recorded, if any

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._stop()

    def _window(self) -> tuple[int, int]:
        """The global steps recorded: the optimizer step that ends at global step ``n`` is step ``n``."""
        first = self._start + self.wait + self.warmup + 1
        return first, first + self.active - 1

    def _stop(self) -> None:
        if self._profiler is None:
            return
        if self._profiler.step_num <= self.wait + self.warmup:  # the run ended before a step was recorded
            self._profiler.on_trace_ready = None  # torch would write the warm-up's events as a trace
            first, last = self._window()
            rank_zero_info(f"profiler: no trace, the run ended before step {first} (the window: {first}-{last})")
        self._profiler.stop()
        self._profiler = None
        self.done = True
