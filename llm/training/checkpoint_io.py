"""Writing checkpoints atomically: Lightning's CheckpointIO that never leaves a truncated file under the real name,
and its asynchronous form (``checkpoint.async_save``), which writes in a background thread.

Apart from llm/training/checkpoint.py (the format and reading) because it needs Lightning, which the inference
commands (generate, chat, serve) do not import.
"""

from __future__ import annotations

import errno
import os
import shutil
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning_utilities.core.apply_func import apply_to_collection

from llm.errors import LLMError
from llm.training import safe_load
from llm.training.checkpoint import is_sharded, load_whole, swap_in


class CheckpointWriteError(LLMError):
    """Saving a checkpoint failed (full disk, no permission); the previous checkpoint is untouched."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` into ``<name>.tmp-<pid>`` in the target directory, fsync, then rename (``swap_in``).

    A kill at any moment leaves either the previous ``last.ckpt`` or the new one, never a truncated file
    under the real name, and a full disk is reported in one line with the old checkpoint still in place.
    Lightning's own ``_atomic_save`` serialises into an in-memory buffer first (a second copy of the whole
    state in host memory) and targets fsspec in general; we write straight to the local file.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        path = Path(path)
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            swap_in(tmp, path)  # over an earlier FSDP run's sharded directory of that name too
        except BaseException as err:
            _unlink_quietly(tmp)
            cause = _os_error(err) if isinstance(err, Exception) else None  # not a KeyboardInterrupt's context
            if cause is None:
                raise
            raise _write_error(path, _explain(cause)) from err

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        """Lightning's restore (``ckpt_path=``, validation of the best checkpoint) reads data only, like every other
        path here (llm/training/safe_load.py); ``allow_unsafe_checkpoint`` decides, not Lightning's default."""
        if is_sharded(path):  # saved under FSDP, resumed by one process or DDP: gathered whole (load_whole)
            return load_whole(path)
        if not Path(path).is_file():
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        return safe_load.torch_load(path)

    def remove_checkpoint(self, path: Any) -> None:
        path = Path(path)
        if path.is_dir():  # a sharded checkpoint (FSDP)
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


class AsyncCheckpointIO(AtomicCheckpointIO):
    """``checkpoint.async_save=true``: the training loop copies the state to host memory and goes on; one background
    thread writes it, atomically as :class:`AtomicCheckpointIO` does (temporary file, fsync, rename).

    This is what torch.distributed.checkpoint's ``async_save`` does for its sharded format (stage on the caller,
    write in a thread), for our single ``.ckpt`` file, which everything else here reads. The loop is blocked for
    the copy only (``bench/checkpoint.py`` measures it against a synchronous save): on a GPU a device-to-host copy
    at memory bandwidth instead of serialising and writing at disk speed. The copy is taken before returning, so
    the next optimizer steps cannot change what is written.

    Order and atomicity: writes and removals run one at a time, in the order Lightning asked for them (a
    ModelCheckpoint's removal of an old file cannot overtake the write that created it); a kill at any moment
    leaves the previous file or the new one, never a partial one. At most ``max_pending`` states are held in host
    memory: a save beyond that waits for the oldest write (the two of a validation, last and best, go together).
    A failed write (a full disk) is reported, in one line, at the next save or when training ends (``teardown``),
    with the previous checkpoint kept. Reading a checkpoint waits for pending writes first.
    """

    def __init__(self, max_pending: int = 2) -> None:
        super().__init__()
        self.max_pending = max_pending
        self._executor: ThreadPoolExecutor | None = None
        self._pending: list[Future] = []
        self._lock = threading.Lock()

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        self._raise_failed()
        self._wait(keep=self.max_pending - 1)  # bound the host memory held by staged states
        staged = apply_to_collection(checkpoint, torch.Tensor, _to_host)  # the blocking part: one copy of the state
        self._submit(AtomicCheckpointIO.save_checkpoint, self, staged, path)

    def remove_checkpoint(self, path: Any) -> None:
        self._submit(AtomicCheckpointIO.remove_checkpoint, self, path)  # after the writes queued before it

    def save_sharded(self, checkpoint: dict[str, Any], path: Path, tmp: Path, rank: int, group: Any) -> None:
        """An FSDP checkpoint (a directory of shards, as FSDP2Strategy writes it) with torch.distributed.checkpoint's
        ``async_save``: each rank's shards are copied to host memory here, DCP writes them into ``tmp`` in a thread,
        and once every rank's are on disk (DCP's own completion: rank 0 writes ``.metadata`` after all others)
        rank 0 adds ``meta.pt`` (the loops, schedules, callbacks) and swaps ``tmp`` in for ``path`` (``swap_in``).

        Collective: every rank calls it for the same save, with the same ``tmp``. ``group`` is a gloo group of
        its own: DCP's collectives run in its thread, beside the training's on the default group and beside the
        previous save's, if that one is still in flight (at most ``max_pending`` are; two groups). A kill before
        the swap leaves the previous checkpoint; a failed write is reported as for a file (the next save, or
        teardown), on every rank.
        """
        from torch.distributed.checkpoint import async_save

        self._raise_failed()
        self._wait(keep=self.max_pending - 1)
        shards = {"state_dict": checkpoint.pop("state_dict")}  # Lightning's layout (ModelParallelStrategy)
        shards.update({f"optimizer_{i}": state for i, state in enumerate(checkpoint.pop("optimizer_states", []))})
        meta = apply_to_collection(checkpoint, torch.Tensor, _to_host) if rank == 0 else None
        written = async_save(shards, checkpoint_id=tmp, process_group=group)  # returns once staged on the host
        self._submit(_finish_sharded, written, meta, tmp, path)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        self.wait()
        return super().load_checkpoint(path, map_location, weights_only)

    def wait(self) -> None:
        """Blocks until every queued write is on disk; raises the first failure (CheckpointWriteError)."""
        self._wait(keep=0)
        self._raise_failed()

    def teardown(self) -> None:
        """End of fit/validate: the last writes land before the run reads or reports anything."""
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None

    def _submit(self, fn: Any, *args: Any) -> None:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")
        with self._lock:
            self._pending.append(self._executor.submit(fn, *args))

    def _wait(self, keep: int) -> None:
        while True:
            with self._lock:
                running = [f for f in self._pending if not f.done()]
                if len(running) <= keep:
                    return
                oldest = running[0]
            oldest.exception()  # waits; the error, if any, stays in the future for _raise_failed

    def _raise_failed(self) -> None:
        with self._lock:
            done = [f for f in self._pending if f.done()]
            self._pending = [f for f in self._pending if not f.done()]
        for future in done:  # reported once: a failed future is dropped from the list above
            error = future.exception()
            if error is not None:
                raise error


def checkpoint_io(async_save: bool = False) -> AtomicCheckpointIO:
    """The CheckpointIO plugin for ``checkpoint.async_save``."""
    return AsyncCheckpointIO() if async_save else AtomicCheckpointIO()


def _finish_sharded(written: Future, meta: dict[str, Any] | None, tmp: Path, path: Path) -> None:
    """The writer thread's part of ``save_sharded``: wait for DCP, then (rank 0: ``meta`` given) complete and swap."""
    try:
        written.result()
        if meta is not None:
            torch.save(meta, tmp / "meta.pt")
            swap_in(tmp, path)
    except BaseException as err:  # DCP's CheckpointException is a BaseException
        if meta is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(err, Exception) and not hasattr(err, "failures"):
            raise  # a KeyboardInterrupt, SystemExit
        # DCP gathers every rank's failure, pickled (their causes lost): {rank: (exception, traceback summary)}
        failures = [f[0] if isinstance(f, tuple) else f for f in getattr(err, "failures", {}).values()] or [err]
        cause = next((c for c in map(_os_error, failures) if c is not None), None)
        if cause is not None:
            reason = _explain(cause)
        elif "unexpected pos" in str(failures[0]):  # torch's zip writer, when a write came up short
            reason = "a shard's write came up short (is the disk full?)"
        else:
            reason = f"{type(failures[0]).__name__}: {str(failures[0]).splitlines()[0]}"
        raise _write_error(path, reason) from err


def _explain(cause: OSError) -> str:
    return "the disk is full" if cause.errno == errno.ENOSPC else (cause.strerror or str(cause))


def _write_error(path: Any, reason: str) -> CheckpointWriteError:
    return CheckpointWriteError(f"could not write checkpoint {path}: {reason}; the previous one is kept")


def _to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A copy in host memory that later steps cannot change (on the CPU, a clone)."""
    return tensor.detach().to("cpu", copy=True)


def _os_error(err: BaseException) -> OSError | None:
    """The OSError behind ``err``: torch's zip writer, closing after a full disk, raises a RuntimeError ("unexpected
    pos ...") over the ENOSPC that caused it."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass  # a read-only directory: there is no temporary file to remove either
