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
        if self._saved_step == trainer.global_step:
            return
        path = self.dirpath / "last.ckpt"
        trainer.save_checkpoint(path)
        self._saved_step = trainer.global_step
        if self.stopped_by is not None:
            rank_zero_info(f"{self.stopped_by}: saved {path} at step {trainer.global_step}; resume with ckpt_path=last")


class TrainingDiverged(RuntimeError):
    """Too many non-finite steps in a row; the message names the step and the checkpoint of the last good state."""


class NonFiniteGuard(L.Callback):
    """Skips an optimizer step whose gradients are not finite, counts it, and stops after ``max_bad_steps`` in a row.

    A NaN/Inf loss gives non-finite gradients too, so one check of the gradient norm covers both. A skipped step
    leaves weights and optimizer state untouched (the gradients are dropped before the optimizer sees them), so
    when the run stops, the checkpoint it writes is the last good state, not the diverged one.
    The check reads one scalar per step (a host-device synchronisation on GPUs); drop the callback with
    ``callbacks.nonfinite=null`` to avoid it.
    """

    def __init__(self, dirpath: str, max_bad_steps: int = 5) -> None:
        self.dirpath = Path(dirpath)
        self.max_bad_steps = max_bad_steps
        self.bad_in_a_row = 0
        self.skipped = 0

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        if not grads:
            return
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
        if bool(torch.isfinite(norm)):
            self.bad_in_a_row = 0
            return
        self.bad_in_a_row += 1
        self.skipped += 1
        for p in pl_module.parameters():
            p.grad = None  # the optimizer skips parameters without gradients: nothing moves
        pl_module.log("train/skipped_steps", float(self.skipped), on_step=True, on_epoch=False)
        if self.bad_in_a_row >= self.max_bad_steps:
            path = self.dirpath / "last.ckpt"
            trainer.save_checkpoint(path)
            raise TrainingDiverged(
                f"training diverged: {self.bad_in_a_row} non-finite steps in a row at step {trainer.global_step}; "
                f"the last good state is in {path} (lower optim.lr or raise sched.warmup_steps, then resume)"
            )

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = state_dict.get("skipped", 0)
