"""What keeps a long run alive: exact RNG resume, a checkpoint on SIGTERM/SIGUSR1, and a non-finite guard."""

from __future__ import annotations

import signal
import sys
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
from llm.runtime import launch
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
    unsaved or be forgotten.

    With several processes a signal may reach one rank only, or each rank at another step (SLURM signals its
    tasks one by one), and a stop must still be one step for all, or the ranks wait for each other's
    collectives for ever and the checkpoint mixes steps. So there a handler only notes the signal, and the
    ranks agree (an all-reduce of one number: the signal, 0 for none) at every logging step
    (``trainer.log_every_n_steps``, where logging reads values to the host anyway) and at the last step: no
    host synchronisation of its own between them. Lightning's SIGTERM handler is set aside in those runs: it
    runs a collective inside the handler (which pairs with another rank's next collective when only one rank
    got the signal) and stops the rank that got it on its own.

    Under SLURM, Lightning's auto-requeue (SIGUSR1: save ``hpc_ckpt_<n>.ckpt`` inside the handler, in the middle
    of a step, and requeue while the job still runs) is turned off: the stop is this callback's, at a step
    boundary, and ``scripts/train.sbatch`` requeues the job once every task has exited (``status.json`` says
    ``stopped`` with ``"signal": "SIGUSR1"``); the requeued job keeps its id, so its run directory and
    ``ckpt_path=last`` find this checkpoint.
    """

    def __init__(
        self, dirpath: str, every_n_steps: int | None = None, signals: tuple[str, ...] = ("SIGTERM", "SIGUSR1")
    ) -> None:
        self.dirpath = Path(dirpath)
        self.every_n_steps = every_n_steps
        self.signals = tuple(signals)
        self.requested: str | None = None  # this process's own request (a signal, or a test's)
        self.stopped_by: str | None = None
        self._previous: dict[int, Any] = {}
        self._saved_step: int | None = None
        self._agreed_step: int | None = None
        self._finished = False
        self._announced = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        environment = trainer._accelerator_connector.cluster_environment
        if isinstance(environment, SLURMEnvironment):
            environment.auto_requeue = False  # read by Lightning's signal connector after this hook (see above)
        if self._previous or self._finished or threading.current_thread() is not threading.main_thread():
            return  # installed already (step-0 validate, then fit); signals can only be set from the main thread
        for name in self.signals:
            signum = getattr(signal, name, None)
            if signum is not None:  # else not on this platform
                self._previous[signum] = signal.signal(signum, self._handler)
        noted = launch.take_noted_signal()
        if noted in self.signals:  # it came while the data was read or the model was built
            self.requested = self.requested or noted

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._set_aside_lightnings_sigterm(trainer)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._set_aside_lightnings_sigterm(trainer)

    def _set_aside_lightnings_sigterm(self, trainer: L.Trainer) -> None:
        """Several processes: SIGTERM goes to our handler only (Lightning's, installed once each call began, runs
        a collective inside the handler). Lightning puts ours back at the end of the call (it found it there)."""
        if trainer.world_size > 1 and signal.SIGTERM in self._previous and not self._finished:
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum: int, frame: Any) -> None:
        self.requested = self.requested or signal.Signals(signum).name  # the first one names the stop
        previous = self._previous.get(signum)
        if callable(previous) and previous is not launch.note_signal:  # chain a handler someone installed before us
            previous(signum, frame)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        reason = self._reason(trainer)
        if reason is not None and self.stopped_by is None:
            self.stopped_by = reason
            trainer.should_stop = True
        periodic = bool(self.every_n_steps) and step % self.every_n_steps == 0
        if self.stopped_by is not None or periodic or step >= trainer.max_steps > 0:
            self._save(trainer)

    def _reason(self, trainer: L.Trainer) -> str | None:
        """Why to stop after this step, the same on every rank: the signal (or request) that came first."""
        if trainer.world_size == 1 or not torch.distributed.is_initialized():
            return "SIGTERM" if trainer.received_sigterm else self.requested
        step = trainer.global_step
        last = step >= trainer.max_steps > 0
        if self._agreed_step == step or not (step % max(trainer.log_every_n_steps, 1) == 0 or last):
            return None  # not an agreement step (or agreed already: the other micro-batches of this step)
        self._agreed_step = step
        # each rank's request as a number: 1 + its index in `signals` (or past them for a test's request), 0: none
        names = [*self.signals, self.requested]
        code = 0 if self.requested is None else names.index(self.requested) + 1
        flag = torch.tensor([code], dtype=torch.int32, device=trainer.strategy.root_device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        agreed = int(flag.item())
        if agreed == 0:
            return None
        return names[agreed - 1] if agreed <= len(self.signals) else (self.requested or "a request on another rank")

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
        elif trainer.world_size > 1 and _lost_a_peer(exception):
            # another process of the run died: say so in one line before the traceback, naming what is kept
            print(  # every rank that notices says it: the survivor may be any of them
                f"error: rank {trainer.global_rank}: another process of this run is gone ({_first_line(exception)});"
                f" stopping. The last good state is {self.dirpath / 'last.ckpt'} (resume with ckpt_path=last)",
                file=sys.stderr,
                flush=True,
            )
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

    def rewound(self, step: int) -> None:
        """The run went back to ``step`` and saved that state as last.ckpt (SpikeGuard's rollback): the steps
        after it are trained again, and saved again, though this callback saved those step numbers before."""
        self._saved_step = step

    def _save(self, trainer: L.Trainer) -> None:
        path = self.dirpath / "last.ckpt"
        if self._saved_step != trainer.global_step:  # else this step's state is there already
            trainer.save_checkpoint(path, weights_only=False)  # the full state (also says so to Lightning)
            self._saved_step = trainer.global_step
        if self.stopped_by is not None and not self._announced:
            self._announced = True
            rank_zero_info(f"{self.stopped_by}: saved {path} at step {trainer.global_step}; resume with ckpt_path=last")


# what gloo (and NCCL) raise in a survivor when a peer process is gone: its socket closed, or the collective timed out
_PEER_LOST = ("connection closed by peer", "connection reset by peer", "broken pipe", "timed out", "timeout")


def _lost_a_peer(exception: BaseException) -> bool:
    dist_error = getattr(torch.distributed, "DistError", RuntimeError)
    if not isinstance(exception, (dist_error, RuntimeError)):
        return False
    return any(marker in str(exception).lower() for marker in _PEER_LOST)


def _first_line(exception: BaseException) -> str:
    lines = [line.strip() for line in str(exception).splitlines() if line.strip()]
    return f"{type(exception).__name__}: {lines[0] if lines else ''}"[:300]


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
