"""Reading checkpoints without running code from them.

A ``.ckpt`` file is a pickle, and unpickling can call any Python function the file names (``os.system`` among
them): a checkpoint downloaded to finetune or to serve would run whatever it carries. So every checkpoint is read
with ``torch.load(weights_only=True)`` (PyTorch's restricted unpickler: tensors, containers and plain values;
everything this project stores is of those types), and a file that asks for anything else is refused in one
line naming the file and what it asked for.

A sharded checkpoint directory (torch.distributed.checkpoint) has two more pickles that PyTorch itself reads
unrestricted: ``.metadata`` (plain ``pickle.load``) and the non-tensor entries ("bytes", read with
``weights_only=False`` by the default planner). ``check_sharded`` reads both the restricted way first, so a
directory is handed to the loaders (Lightning's, the consolidation's) only once nothing in it can run code.

``allow_unsafe_checkpoint=true`` (``allow_unsafe(True)``) is the only way back to plain pickle, with a warning.
"""

from __future__ import annotations

import dataclasses
import enum
import io
import logging
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from llm.errors import UserError

log = logging.getLogger(__name__)

_UNSAFE = False
HOW_TO_TRUST = "if you trust this file, allow_unsafe_checkpoint=true reads it with plain pickle"
CLI_FLAG = "--allow-unsafe-checkpoint"  # the same switch for the commands that take --flags
CLI_HELP = "read checkpoints with plain pickle, which runs any code they hold (trusted files only)"


def allow_unsafe(flag: bool) -> None:
    """Read checkpoints with plain pickle from now on (``allow_unsafe_checkpoint=true``): warned, never default."""
    global _UNSAFE
    _UNSAFE = bool(flag)
    if _UNSAFE:
        log.warning(
            "allow_unsafe_checkpoint=true: checkpoints are read with plain pickle, which runs any code a file "
            "holds; use it only for files you made or trust"
        )


def unsafe_allowed() -> bool:
    return _UNSAFE


def lightning_kwargs() -> dict[str, Any]:
    """``weights_only=`` for ``Trainer.fit`` / ``validate`` where Lightning takes it (2.5+): its strategies that
    read a checkpoint themselves (ModelParallelStrategy's ``torch.load``) then read data only too."""
    import inspect

    import lightning as L

    return {"weights_only": not _UNSAFE} if "weights_only" in inspect.signature(L.Trainer.fit).parameters else {}


def refusal(path: Path | str, err: BaseException) -> UserError:
    """The one-line error of a file whose pickle asks for something that is not plain data."""
    text = str(err)
    asked = re.search(r"GLOBAL ([\w.]+)", text) or re.search(r"global '?([\w.]+)", text)
    what = asked.group(1) if asked else text.strip().splitlines()[-1][:200]
    return UserError(f"{path}: refused: reading it would call {what} (a checkpoint holds only data); {HOW_TO_TRUST}")


def torch_load(path: Path | str, *, mmap: bool = False) -> Any:
    """``torch.load`` of a checkpoint file on the CPU, restricted to data unless ``allow_unsafe`` was given.

    Other failures (a truncated or foreign file) are left to the caller, which knows what the file was for.
    """
    try:
        return torch.load(path, map_location="cpu", mmap=mmap, weights_only=not _UNSAFE)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" in str(err):
            raise refusal(path, err) from err
        raise


# ---------------------------------------------------------------------------------- sharded checkpoint metadata


def _dcp_metadata_type(module: str, name: str) -> Any:
    """The one kind of global a DCP ``.metadata`` may name: a dataclass or enum of torch.distributed.checkpoint,
    a dtype, ``torch.Size``, a layout or a path. Calling any of these with any arguments only builds a value."""
    if module.startswith("torch.distributed.checkpoint."):
        import importlib

        obj = getattr(importlib.import_module(module), name, None)
        if isinstance(obj, type) and (dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum)):
            return obj
    elif module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
        return getattr(torch, name)
    elif (module, name) == ("torch.serialization", "_get_layout"):
        return torch.serialization._get_layout
    elif module == "pathlib" and name in ("Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"):
        import pathlib

        return getattr(pathlib, name)
    elif (module, name) == ("collections", "OrderedDict"):
        import collections

        return collections.OrderedDict
    return None


class _MetadataUnpickler(pickle.Unpickler):
    # Restricting globals is the standard library's own recipe for untrusted pickles ("Restricting Globals").
    def find_class(self, module: str, name: str) -> Any:
        obj = _dcp_metadata_type(module, name)
        if obj is None:
            raise pickle.UnpicklingError(f"Weights only load failed: global '{module}.{name}' is not allowed")
        return obj


def read_dcp_metadata(ckpt_dir: Path) -> Any:
    """A sharded directory's ``.metadata`` (torch.distributed.checkpoint.metadata.Metadata), restricted."""
    path = ckpt_dir / ".metadata"
    try:
        with path.open("rb") as f:
            return _MetadataUnpickler(f).load()
    except pickle.UnpicklingError as err:
        if "Weights only load failed" in str(err):
            raise refusal(path, err) from err
        raise UserError(f"{path}: not readable sharded-checkpoint metadata ({err})") from err
    except (OSError, EOFError, AttributeError, TypeError, ValueError) as err:
        raise UserError(f"{path}: not readable sharded-checkpoint metadata ({type(err).__name__}: {err})") from err


def check_sharded(ckpt_dir: Path | str) -> None:
    """Raise a one-line UserError unless nothing in a sharded checkpoint directory can run code when read.

    Reads ``meta.pt`` and ``.metadata`` restricted, then every non-tensor ("bytes") entry of the shards with
    ``torch.load(weights_only=True)``: the entries the default planner would unpickle unrestricted. Tensor
    entries PyTorch already reads with ``weights_only=True``. Nothing to do under ``allow_unsafe``.
    """
    if _UNSAFE:
        return
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

    ckpt_dir = Path(ckpt_dir)
    torch_load(ckpt_dir / "meta.pt")
    metadata = read_dcp_metadata(ckpt_dir)
    storage = getattr(metadata, "storage_data", None) or {}
    for fqn, item in (getattr(metadata, "state_dict_metadata", None) or {}).items():
        if not isinstance(item, BytesStorageMetadata):
            continue
        info = storage.get(MetadataIndex(fqn))
        if info is None:
            raise UserError(f"{ckpt_dir}: entry {fqn} is listed in .metadata but stored nowhere")
        if getattr(info, "transform_descriptors", None):
            raise UserError(f"{ckpt_dir}: entry {fqn} is stored transformed ({info.transform_descriptors}); not read")
        shard = ckpt_dir / str(info.relative_path)
        if shard.resolve().parent != ckpt_dir.resolve():  # a path in the metadata must not leave the directory
            raise UserError(f"{ckpt_dir}: entry {fqn} points outside the directory ({info.relative_path})")
        with shard.open("rb") as f:
            f.seek(int(info.offset))
            data = f.read(int(info.length))
        try:
            torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            if "Weights only load failed" in str(err):
                raise refusal(f"{shard} (entry {fqn})", err) from err
            raise UserError(f"{shard}: entry {fqn} is not readable ({err})") from err
