"""What keeps a long run alive: exact RNG resume, a checkpoint on SIGTERM/SIGUSR1, and a non-finite guard."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from llm.errors import LLMError
from llm.training.parallelize import total_norm


class RngState(L.Callback):
    """Saves the torch, CUDA, numpy and python RNG states in every checkpoint and restores them on resume.

    Lightning's Trainer restores model, optimizer, scheduler and loops but not the generators, so dropout
    masks after a resume would differ from those of the uninterrupted run.
    """

    def state_dict(self) -> dict[str, Any]:
        states = _collect_rng_states(include_cuda=torch.cuda.is_available())
        # numpy's state holds an ndarray, which `torch.load(weights_only=True)` refuses: store it as a list
        name, keys, pos, has_gauss, gauss = states["numpy"]
        states["numpy"] = (name, keys.tolist(), pos, has_gauss, gauss)
        return {"rng": states}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "rng" in state_dict:
            states = dict(state_dict["rng"])
            name, keys, pos, has_gauss, gauss = states["numpy"]
            states["numpy"] = (name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss)
            _set_rng_states(states)


class LastCheckpoint(L.Callback):
    """Owns ``<dirpath>/last.ckpt``: written after every validation, every ``every_n_steps`` steps, at the last
    step, and on SIGTERM / SIGUSR1 (then the run stops), so ``ckpt_path=last`` always has a recent state.

    Saves happen in ``on_train_batch_end``, the point from which Lightning's loops know how to resume mid-epoch
    exactly. (ModelCheckpoint's own ``save_last`` also saves in ``on_train_end``, where Lightning's counters
    disagree, and a run resumed from that file logs every step one too low; so the ModelCheckpoints in
    ``conf/callbacks`` keep ``save_last: false`` and leave last.ckpt to this callback.)
    A signal (SIGTERM from a scheduler, SIGUSR1 as SLURM's pre-emption warning) is noted and the current step
    finishes first. The handlers are installed in ``setup``, before the step-0 validation, and kept until the
    end of training: Lightning installs its own SIGTERM handler only while each ``validate``/``fit`` call runs
    (and resets its flag at each), so a SIGTERM between or during those calls would otherwise kill the run
    unsaved or be forgotten. Lightning's handler still runs as well and is broadcast to every rank. Under SLURM
    with auto-requeue Lightning handles SIGUSR1 itself (it saves ``hpc_ckpt_<n>.ckpt`` and requeues), and this
    callback leaves that signal alone.
    """

    def __init__(
        self, dirpath: str, every_n_steps: int | None = None, signals: tuple[str, ...] = ("SIGTERM", "SIGUSR1")
    ) -> None:
        self.dirpath = Path(dirpath)
        self.every_n_steps = every_n_steps
        self.signals = signals
        self.requested: str | None = None
        self.stopped_by: str | None = None
        self._previous: dict[int, Any] = {}
        self._saved_step: int | None = None
        self._finished = False
        self._announced = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._previous or self._finished or threading.current_thread() is not threading.main_thread():
            return  # installed already (step-0 validate, then fit); signals can only be set from the main thread
        environment = trainer._accelerator_connector.cluster_environment
        requeue = isinstance(environment, SLURMEnvironment) and environment.auto_requeue
        for name in self.signals:
            signum = getattr(signal, name, None)
            if signum is None or (requeue and name != "SIGTERM"):
                continue  # not on this platform, or SLURM's requeue signal, which Lightning handles
            self._previous[signum] = signal.signal(signum, self._handler)

    def _handler(self, signum: int, frame: Any) -> None:
        self.requested = signal.Signals(signum).name
        previous = self._previous.get(signum)
        if callable(previous):  # chain a handler someone installed before us
            previous(signum, frame)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        reason = "SIGTERM" if trainer.received_sigterm else self.requested
        if reason is not None and self.stopped_by is None:
            self.stopped_by = reason
            trainer.should_stop = True
        periodic = bool(self.every_n_steps) and step % self.every_n_steps == 0
        if reason is not None or periodic or step >= trainer.max_steps > 0:
            self._save(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._save(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer)  # a run bounded by max_epochs ends here; no-op when the last step was saved

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":  # after the step-0 validate training is still to come: keep the handlers
            self._restore_handlers()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException) and trainer.state.fn == "fit":
            # Lightning stopped a validation at once to keep the scheduler's grace period; the training state of
            # this step is whole (a run resumed from it skips the cut validation and trains on exactly)
            self.stopped_by = "SIGTERM"
            self._save(trainer)
        # Lightning skips the teardown hooks when a call fails, and right after this hook puts back the handlers it
        # found when the call began (ours): have it put back the ones from before us instead
        originals = getattr(getattr(trainer, "_signal_connector", None), "_original_handlers", None)
        if isinstance(originals, dict):
            originals.update({signum: h for signum, h in self._previous.items() if signum in originals})
        self._restore_handlers()

    def _restore_handlers(self) -> None:
        self._finished = True  # the final validate of the best checkpoint does not reinstall them
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _save(self, trainer: L.Trainer) -> None:
        path = self.dirpath / "last.ckpt"
        if self._saved_step != trainer.global_step:  # else this step's state is there already
            trainer.save_checkpoint(path, weights_only=False)  # the full state (also says so to Lightning)
            self._saved_step = trainer.global_step
        if self.stopped_by is not None and not self._announced:
            self._announced = True
            rank_zero_info(f"{self.stopped_by}: saved {path} at step {trainer.global_step}; resume with ckpt_path=last")


class TrainingDiverged(LLMError):
    """Too many non-finite steps in a row; the message names the step and the checkpoint of the last good state."""


class NonFiniteGuard(L.Callback):
    """Skips an optimizer step whose gradients are not finite, counts it, and stops after ``max_bad_steps`` in a row.

    A NaN/Inf loss gives non-finite gradients too, so one check of the gradient norm covers both. A skipped step
    leaves weights and optimizer state untouched, so when the run stops, the checkpoint it writes is the last good
    state, not the diverged one.

    With a fused optimizer (``optim.fused``; Adam/AdamW, the default on CUDA and CPU) the whole guard stays on
    the device: the finite check is handed to the fused kernel as its ``found_inf`` flag (as GradScaler does),
    which then leaves parameters, moments and step counts as they were, and the counters are device tensors
    read at logging steps only (``trainer.log_every_n_steps``): no host-device synchronisation in the step,
    and a divergence is noticed at the next logging step. Other optimizers need the decision on the host: one
    scalar read per step, and the gradients are dropped before the optimizer sees them.
    """

    def __init__(self, dirpath: str, max_bad_steps: int = 5) -> None:
        self.dirpath = Path(dirpath)
        self.max_bad_steps = max_bad_steps
        self.skipped = 0  # as of the last read
        # device counters (float32, as found_inf): steps skipped, the current and the longest run of bad steps
        self._counters: torch.Tensor | None = None
        self._read_skipped = 0

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        if not grads:
            return
        norm = total_norm(grads)  # FSDP/TP shards included: the same value on every rank, so all skip together
        bad = (~torch.isfinite(norm)).float()  # 1.0: skip this step
        self._count(bad)
        if _skips_on_device(optimizer):
            optimizer.found_inf = bad  # read by the fused kernel in this step (GradScaler overwrites it in 16-mixed)
            return
        if bool(bad):  # the host read: other optimizers cannot skip on their own
            for p in pl_module.parameters():
                p.grad = None  # the optimizer skips parameters without gradients: nothing moves
            self._check(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        logging_step = trainer.global_step % max(trainer.log_every_n_steps, 1) == 0
        if self._counters is not None and (logging_step or trainer.global_step >= trainer.max_steps > 0):
            self._check(trainer, pl_module)

    def _count(self, bad: torch.Tensor) -> None:
        if self._counters is None or self._counters.device != bad.device:
            self._counters = torch.zeros(3, device=bad.device)
        skipped, run, longest = self._counters.unbind()
        run = (run + bad) * bad  # +1 on a bad step, 0 on a good one
        self._counters = torch.stack([skipped + bad, run, torch.maximum(longest, run)])

    def _check(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Reads the counters (a sync), logs the skipped steps, and stops a run that diverged."""
        skipped, _, longest = (int(v) for v in self._counters.tolist())
        self.skipped = self._read_skipped + skipped
        if self.skipped:
            pl_module.log("train/skipped_steps", float(self.skipped), on_step=True, on_epoch=False)
        if longest >= self.max_bad_steps:
            path = self.dirpath / "last.ckpt"
            trainer.save_checkpoint(path, weights_only=False)  # the full state (also says so to Lightning)
            raise TrainingDiverged(
                f"training diverged: {longest} non-finite steps in a row by step {trainer.global_step}; "
                f"the last good state is in {path} (lower optim.lr or raise sched.warmup_steps, then resume)"
            )

    def state_dict(self) -> dict[str, Any]:
        unread = int(self._counters[0]) if self._counters is not None else 0  # one read per checkpoint
        return {"skipped": self._read_skipped + unread}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = self._read_skipped = state_dict.get("skipped", 0)
        self._counters = None


def _skips_on_device(optimizer: Any) -> bool:
    """Whether the optimizer's step honours a ``found_inf`` flag on its own (PyTorch's fused Adam/AdamW/SGD)."""
    optimizer = getattr(optimizer, "optimizer", optimizer)  # a LightningOptimizer wraps the torch one
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False)) and all(
        g.get("fused") for g in optimizer.param_groups
    )
