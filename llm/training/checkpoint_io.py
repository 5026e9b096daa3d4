"""Writing checkpoints atomically: Lightning's CheckpointIO that never leaves a truncated file under the real name.

Apart from llm/training/checkpoint.py (the format and reading) because it needs Lightning, which the inference
commands (generate, chat, serve) do not import.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from llm.errors import LLMError
from llm.training import safe_load


class CheckpointWriteError(LLMError):
    """Saving a checkpoint failed (full disk, no permission); the previous checkpoint is untouched."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` into ``<name>.tmp-<pid>`` in the target directory, fsync, then ``os.replace``.

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
            os.replace(tmp, path)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            reason = "the disk is full" if err.errno == errno.ENOSPC else (err.strerror or str(err))
            raise CheckpointWriteError(
                f"could not write checkpoint {path}: {reason}; the previous one is kept"
            ) from err
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        """Lightning's restore (``ckpt_path=``, validation of the best checkpoint) reads data only, like every other
        path here (llm/training/safe_load.py); ``allow_unsafe_checkpoint`` decides, not Lightning's default."""
        if not Path(path).is_file():
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        return safe_load.torch_load(path)

    def remove_checkpoint(self, path: Any) -> None:
        Path(path).unlink(missing_ok=True)
