"""Loss-spike guard: skip a step whose loss is far above the recent ones; after several in a row, roll back.

A finite spike is invisible to the non-finite guard (callbacks/resilience.py), yet one bad batch at a high
learning rate can knock a run off course for thousands of steps. OLMo-core skips steps whose loss is more than
6 standard deviations above the recent mean; PaLM restarted from a checkpoint before a spike and skipped the
batches around it, by hand. :class:`SpikeGuard` does both, automatically and in the same process.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn

from llm.errors import LLMError, UserError
from llm.training import safe_load

ROLLBACK_NAME = "spike-rollback.ckpt"  # the last checkpoint written with no spike under way (a hard link)


class SpikesPersist(LLMError):
    """Spikes came back after every rollback allowed, or there is no checkpoint from before them to go back to."""


class SpikeGuard(L.Callback):
    """Skips an optimizer step whose loss exceeds the mean of the last ``window`` good steps by ``sigmas``
    standard deviations, counts it (``train/spike_skips``), and after ``max_in_a_row`` skips in a row rolls the
    run back to the last checkpoint written before those spikes began, skipping the batches read since.

    **The judgement.** The loss of an optimizer step (micro-batches summed, as Lightning scales them for
    accumulation) is averaged over the data-parallel ranks, one all-reduce of one number, so every rank
    decides the same. Only good steps enter the window, so a spike does not widen the band that judges the
    next one; steps are judged once the window is full. A skipped step is skipped as the non-finite guard skips
    one: with a fused optimizer (AdamW's default here) its ``found_inf`` flag, or-ed with that guard's, makes
    the kernel leave parameters, moments and step counts untouched; other optimizers get their gradients
    dropped, which needs the decision on the host (one scalar read per step, as the non-finite guard already
    does there).

    **Host synchronisation.** With a fused optimizer nothing here waits for the device in a step: the window,
    the verdict and the counters are device tensors, read at logging steps (``trainer.log_every_n_steps``,
    where Lightning reads the logged values anyway) and at the last step, so a run of spikes is acted on at the
    next logging step. On a GPU that keeps the host queueing kernels ahead of the device; a read every step
    would stall that queue once per step (tens of microseconds to milliseconds, more for small models with
    short steps). On the CPU reading is free, and the counters are read every step.

    **The rollback.** In the same process, with what a resume from that checkpoint restores: weights,
    optimizer, learning-rate schedule, gradient scaler, the optimizer-step counters (so ``global_step`` goes
    back) and every callback's state (the RNG streams among them), except this guard's own counts and the
    ModelCheckpoints' lists of the files on disk. The data loader is *not* rewound: it goes on with the next
    batch, so the batches read since the checkpoint are skipped, and Lightning's count of batches read (the
    data position saved in checkpoints, in global samples, see datamodules/order.py) stays the loader's. Each
    rollback is recorded (steps, checkpoint, the data positions skipped: epoch and global sample) in this
    guard's state, so in every later checkpoint, logged on one line, and ``last.ckpt`` is rewritten at once.
    After ``max_rollbacks`` the run stops with :class:`SpikesPersist`: spikes that survive several rollbacks
    are no bad batch but a learning rate, or data, to look at.

    **The checkpoint to go back to.** Every save records whether a spike was under way (this guard's state
    in it). ``last.ckpt`` is overwritten as training goes on, possibly during a run of spikes, so each clean
    one is also hard-linked as ``<dirpath>/spike-rollback.ckpt`` (no extra disk until ``last.ckpt`` is
    replaced; a copy where the filesystem has no hard links). The guard notices a new ``last.ckpt`` with one
    ``stat`` per step on the first process, so it does not depend on the order of the callbacks or on when an
    asynchronous save lands.
    """

    def __init__(
        self,
        dirpath: str,
        sigmas: float = 6.0,
        window: int = 100,
        max_in_a_row: int = 5,
        max_rollbacks: int = 3,
    ) -> None:
        if sigmas <= 0 or window < 2 or max_in_a_row < 1 or max_rollbacks < 0:
            raise UserError(
                f"callbacks.spike: sigmas={sigmas} must be > 0, window={window} >= 2, max_in_a_row={max_in_a_row}"
                f" >= 1 and max_rollbacks={max_rollbacks} >= 0"
            )
        self.dirpath = Path(dirpath)
        self.sigmas = float(sigmas)
        self.window = int(window)
        self.max_in_a_row = int(max_in_a_row)
        self.max_rollbacks = int(max_rollbacks)
        self.skips = 0  # spikes skipped, as of the last read
        self.rollbacks: list[dict[str, Any]] = []
        # device state: the last `window` good losses (a ring), how many there are, where the next one goes
        self._history: torch.Tensor | None = None
        self._filled: torch.Tensor | None = None
        self._next: torch.Tensor | None = None
        # device counters (float32): spikes skipped since the state was set, the current run of spikes and the step
        # it began at, the longest run and the step it began at, and the optimizer steps taken
        self._counters: torch.Tensor | None = None
        self._loss: torch.Tensor | None = None  # this optimizer step's loss so far (micro-batches summed)
        self._loaded: dict[str, Any] | None = None  # a checkpoint's state, moved to the device at the next step
        self._read_skips = 0
        self._host_decided = False  # this step's verdict was read on the host already (a non-fused optimizer)
        self._seen: tuple[int, int] | None = None  # (inode, mtime) of the last.ckpt looked at

    # ------------------------------------------------------------------------------------------------ judging

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        loss = loss.detach().float()
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and getattr(scaler, "_scale", None) is not None:
            loss = loss / scaler._scale  # 16-mixed scales the loss before this hook; the scale stays on the device
        self._loss = loss if self._loss is None else self._loss + loss

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        if self._loss is None:
            return
        loss = trainer.strategy.reduce(self._loss, reduce_op="mean")  # the same verdict on every rank
        self._loss = None
        self._ensure_state(loss.device, trainer.global_step)
        bad = self._judge(loss)
        inner = getattr(optimizer, "optimizer", optimizer)  # a LightningOptimizer wraps the torch one
        if _skips_on_device(inner):
            found = getattr(inner, "found_inf", None)  # the non-finite guard's verdict of this step, if any
            inner.found_inf = bad if found is None else torch.maximum(found.to(bad), bad)
            return
        self._host_decided = True
        if bool(bad):  # the host read: other optimizers cannot skip on their own
            for p in pl_module.parameters():
                p.grad = None  # the optimizer skips parameters without gradients: nothing moves

    def _judge(self, loss: torch.Tensor) -> torch.Tensor:
        """1.0 when ``loss`` (a 0-d tensor) is a spike, else 0.0; updates the window and the counters."""
        slots = torch.arange(self.window, device=loss.device)
        valid = slots < self._filled
        n = self._filled.clamp(min=1)
        mean = (self._history * valid).sum() / n
        std = (((self._history - mean) * valid).square().sum() / (n - 1).clamp(min=1)).sqrt()
        finite = torch.isfinite(loss)
        spike = finite & (self._filled >= self.window) & (loss > mean + self.sigmas * std)
        good = finite & ~spike  # non-finite steps are the non-finite guard's: neither counted nor remembered
        self._history = torch.where((slots == self._next) & good, loss, self._history)
        self._next = (self._next + good.long()) % self.window
        self._filled = (self._filled + good.long()).clamp(max=self.window)
        bad = spike.float()
        skipped, run, run_start, longest, longest_start, step = self._counters.unbind()
        step = step + 1  # the optimizer step being judged (global_step after it)
        run = (run + bad) * bad  # +1 on a spike, 0 otherwise
        run_start = torch.where(run == 1, step, run_start)
        longer = run > longest
        self._counters = torch.stack(
            [skipped + bad, run, run_start, torch.maximum(run, longest), torch.where(longer, run_start, longest_start),
             step]
        )  # fmt: skip
        return bad

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.is_global_zero:
            self._keep_clean_checkpoint()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        if optimizer is not None and hasattr(optimizer, "found_inf"):
            optimizer.found_inf = None  # read by this step's kernel; a stale flag must not skip the next step
        if self._counters is None:
            return
        read = (
            self._host_decided
            or self._counters.device.type == "cpu"
            or trainer.global_step % max(trainer.log_every_n_steps, 1) == 0
            or trainer.global_step >= trainer.max_steps > 0
        )
        self._host_decided = False
        if read:
            self._check(trainer, pl_module)

    def _check(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Reads the counters (a sync), logs the skips, and rolls back after ``max_in_a_row`` spikes in a row."""
        skipped, _, _, longest, start, _ = (int(v) for v in self._counters.tolist())
        self.skips = self._read_skips + skipped
        pl_module.log("train/spike_skips", float(self.skips), on_step=True, on_epoch=False)
        if longest >= self.max_in_a_row:
            self._rollback(trainer, pl_module, spikes=longest, first=start)

    # ------------------------------------------------------------------------------------------ the rollback

    def _rollback(self, trainer: L.Trainer, pl_module: L.LightningModule, spikes: int, first: int) -> None:
        at = trainer.global_step
        if len(self.rollbacks) >= self.max_rollbacks:
            raise SpikesPersist(
                f"loss spikes: {spikes} steps in a row from step {first} skipped, after {len(self.rollbacks)}"
                f" rollback(s) already (callbacks.spike.max_rollbacks={self.max_rollbacks}); the last good state is"
                f" {self.dirpath / ROLLBACK_NAME}: lower optim.lr, or look at the data near the skipped positions"
                f" recorded in it"
            )
        path = trainer.strategy.broadcast(self._target(first) if trainer.is_global_zero else None)
        if path is None:
            raise SpikesPersist(
                f"loss spikes: {spikes} steps in a row from step {first} skipped, and no checkpoint in {self.dirpath}"
                f" from before step {first} to roll back to (one is written at every validation and every"
                f" checkpoint.every_n_steps: check more often, or raise callbacks.spike.max_in_a_row)"
            )
        datamodule = getattr(trainer, "datamodule", None)
        read_to = _data_position(datamodule.state_dict()) if hasattr(datamodule, "state_dict") else None
        batches_to = trainer.fit_loop.epoch_loop.batch_progress.total.processed
        ckpt = trainer.strategy.load_checkpoint(path)
        to = int(ckpt["global_step"])
        _restore(trainer, pl_module, ckpt, keep=self)
        mine = (ckpt.get("callbacks") or {}).get(self.state_key) or {}
        self.load_state_dict({**mine, "skips": self.skips, "rollbacks": self.rollbacks})
        read_from = _data_position(ckpt.get(type(datamodule).__qualname__)) if datamodule is not None else None
        batches_from = _total_processed(ckpt)
        record = {
            "at_step": at,
            "spikes": spikes,
            "first_spike_step": first,
            "to_step": to,
            "checkpoint": str(path),
            "skipped_batches": None if batches_from is None else batches_to - batches_from,
            "skipped_from": read_from,  # {"epoch", "sample"}: the data position, in samples over all ranks
            "skipped_to": read_to,
        }
        self.rollbacks.append(record)
        pl_module.log("train/spike_rollbacks", float(len(self.rollbacks)), on_step=True, on_epoch=False)
        where = ""
        if read_from is not None and read_to is not None:
            where = f" (epoch {read_from['epoch']} sample {read_from['sample']} to epoch {read_to['epoch']}"
            where += f" sample {read_to['sample']}, in samples over all ranks)"
        rank_zero_warn(
            f"loss spikes: {spikes} steps in a row from step {first} skipped; rolled back from step {at} to step {to}"
            f" ({path}) and skipped the {record['skipped_batches']} batches read since{where}"
        )
        trainer.save_checkpoint(self.dirpath / "last.ckpt", weights_only=False)  # the new branch, and this record
        for callback in trainer.callbacks:  # the steps after `to` come again: they must be saved again
            if hasattr(callback, "rewound"):
                callback.rewound(to)
            elif isinstance(callback, ModelCheckpoint):  # it skips a step it saved once (a private counter)
                callback._last_global_step_saved = min(callback._last_global_step_saved, to)

    def _target(self, first: int) -> Path | None:
        """The newest checkpoint written with no spike under way, before step ``first`` (first process only)."""
        self._keep_clean_checkpoint()
        best: tuple[int, Path] | None = None
        for path in (self.dirpath / ROLLBACK_NAME, self.dirpath / "last.ckpt"):
            saved = _saved_state(path, self.state_key)
            if saved is None:
                continue
            step, clean = saved
            if clean and step < first and (best is None or step > best[0]):
                best = (step, path)
        return None if best is None else best[1]

    def _keep_clean_checkpoint(self) -> None:
        """Hard-links a new, clean ``last.ckpt`` as the rollback checkpoint (one ``stat`` when nothing changed)."""
        last = self.dirpath / "last.ckpt"
        try:
            info = last.stat()
        except OSError:
            return
        seen = (info.st_ino, info.st_mtime_ns)
        if seen == self._seen:
            return
        self._seen = seen
        saved = _saved_state(last, self.state_key)
        if saved is not None and saved[1]:
            _link(last, self.dirpath / ROLLBACK_NAME)

    def status_fields(self) -> dict[str, Any]:
        """For ``status.json``: the spikes skipped and the rollbacks, as recorded in the checkpoints."""
        if self._counters is not None:
            self.skips = self._read_skips + int(self._counters[0])
        return {"spike_skips": self.skips, "spike_rollbacks": list(self.rollbacks)}

    # ------------------------------------------------------------------------------------------------- state

    def _ensure_state(self, device: torch.device, global_step: int) -> None:
        if self._counters is not None and self._counters.device == device:
            return
        state = self._loaded or {}
        history = torch.zeros(self.window, device=device)
        saved = list(state.get("history", []))[-self.window :]
        if saved:
            history[: len(saved)] = torch.tensor(saved, device=device)
        self._history = history
        self._filled = torch.tensor(len(saved), device=device)
        self._next = torch.tensor(len(saved) % self.window, device=device)
        run, start = float(state.get("run", 0)), float(state.get("run_start", 0))
        self._counters = torch.tensor([0.0, run, start, run, start, float(global_step)], device=device)
        self._loaded = None

    def state_dict(self) -> dict[str, Any]:
        """The window in order (oldest first), the counts, the records of rollbacks; one read per checkpoint."""
        if self._counters is None:
            state = dict(self._loaded or {})
            state.setdefault("run", 0)
        else:
            filled, at = int(self._filled), int(self._next)
            values = self._history.tolist()
            history = values[:filled] if filled < self.window else values[at:] + values[:at]
            skipped, run, start, _, _, _ = (int(v) for v in self._counters.tolist())
            state = {"history": history, "run": run, "run_start": start}
            self.skips = self._read_skips + skipped
        state.update(skips=self.skips, rollbacks=list(self.rollbacks), clean=state["run"] == 0)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skips = self._read_skips = int(state_dict.get("skips", 0))
        self.rollbacks = list(state_dict.get("rollbacks", []))
        self._loaded = {k: state_dict[k] for k in ("history", "run", "run_start") if k in state_dict}
        self._counters = None


# ---------------------------------------------------------------------------------------------------- helpers


def _restore(trainer: L.Trainer, pl_module: L.LightningModule, ckpt: dict[str, Any], keep: L.Callback) -> None:
    """What Lightning restores on resume, but mid-epoch and without rewinding the data: the weights, optimizer,
    schedules, scaler, optimizer-step counters and callbacks (not ``keep``, not ModelCheckpoints) of ``ckpt``."""
    strategy = trainer.strategy
    strategy.load_model_state_dict(ckpt, strict=pl_module.strict_loading)  # FSDP2: done by load_checkpoint
    strategy.load_optimizer_state_dict(ckpt)
    for config, state in zip(trainer.lr_scheduler_configs, ckpt.get("lr_schedulers", [])):
        config.scheduler.load_state_dict(state)
    plugin = trainer.precision_plugin
    if type(plugin).__qualname__ in ckpt:
        plugin.load_state_dict(ckpt[type(plugin).__qualname__])
    # the optimizer-step counters go back by the steps undone; the batch counters (the data read) do not
    undone = trainer.global_step - int(ckpt["global_step"])
    loop = trainer.fit_loop.epoch_loop
    for progress in (loop.automatic_optimization.optim_progress, loop.scheduler_progress):
        _shift(progress, -undone)
    loop._batches_that_stepped -= undone  # the loggers' step
    states = ckpt.get("callbacks") or {}
    for callback in trainer.callbacks:
        if callback is keep or isinstance(callback, ModelCheckpoint):
            continue  # the files a ModelCheckpoint lists are still on disk; its list must say so
        if callback.state_key in states:
            callback.load_state_dict(states[callback.state_key])


def _shift(progress: Any, delta: int) -> None:
    """Adds ``delta`` to every counter of a Lightning progress tracker (``current`` ones no lower than 0)."""
    for name, value in vars(progress).items():
        if isinstance(value, int) and not isinstance(value, bool) and name in ("ready", "started", "processed",
                                                                               "completed"):  # fmt: skip
            setattr(progress, name, max(value + delta, 0))
        elif hasattr(value, "__dict__") and not isinstance(value, (str, bytes)):
            _shift(value, delta)


def _data_position(state: dict[str, Any] | None) -> dict[str, int] | None:
    if not state or "position" not in state:
        return None
    return {"epoch": int(state.get("epoch", 0)), "sample": int(state["position"])}


def _total_processed(ckpt: dict[str, Any]) -> int | None:
    progress = ((ckpt.get("loops") or {}).get("fit_loop") or {}).get("epoch_loop.batch_progress")
    return None if not progress else int(progress["total"]["processed"])


def _saved_state(path: Path, key: str) -> tuple[int, bool] | None:
    """(global_step, clean) of a checkpoint file or sharded directory; None if it is not there or unreadable."""
    meta = path / "meta.pt" if path.is_dir() else path
    if not meta.is_file():
        return None
    try:
        ckpt = safe_load.torch_load(meta, mmap=True)  # the tensors stay on disk
    except Exception:  # noqa: BLE001 - a truncated or foreign file is no rollback target
        return None
    state = (ckpt.get("callbacks") or {}).get(key) if isinstance(ckpt, dict) else None
    if not state or "global_step" not in ckpt:
        return None
    return int(ckpt["global_step"]), bool(state.get("clean", False))


def _link(source: Path, target: Path) -> None:
    """``target`` becomes ``source``'s content atomically: a hard link (a copy where links are not possible)."""
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    _remove(tmp)
    try:
        if source.is_dir():
            shutil.copytree(source, tmp, copy_function=_link_or_copy)
        else:
            _link_or_copy(source, tmp)
        old = target.with_name(f"{target.name}.old-{os.getpid()}")
        if target.is_dir():
            target.rename(old)
        os.replace(tmp, target)
        _remove(old)
    except OSError as err:
        _remove(tmp)
        rank_zero_warn(f"loss spikes: could not keep {source} as {target} ({err}); a rollback may find no checkpoint")


def _link_or_copy(source: Any, target: Any) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _skips_on_device(optimizer: Any) -> bool:
    """Whether the optimizer's step honours a ``found_inf`` flag on its own (PyTorch's fused Adam/AdamW/SGD)."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False)) and all(
        g.get("fused") for g in optimizer.param_groups
    )
