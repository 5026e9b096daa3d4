"""The checkpoint: what a file holds, how it is read and written, and when two checkpoints are the same model.

A checkpoint is Lightning's: one ``.ckpt`` file, or under ``trainer=fsdp`` a *directory* (``last.ckpt/``) in
which every rank wrote its shards (``*.distcp`` and ``.metadata``) beside ``meta.pt``, the trainer state. What
we add to Lightning's layout, so that a checkpoint alone can be resumed, converted, generated from or finetuned:

    {"state_dict": {"model.<our name>": tensor, "head.<name>": tensor (a classifier)},
     "hyper_parameters": {"model": ModelConfig.to_dict(), "labels": [...] (a classifier)},
     "tokenizer": tokenizer.json as a string, "chat_format" / "chat_template" (a finetuned model),
     "special_tokens" / "hf_tokenizer_config" (a model converted from Hugging Face), "loops" (resumable)}

"Same model" means the same weight shapes (``SHAPE_KEYS``): a resumed run may change dropout, compilation or
precision, and ``init_from`` takes the shape from the checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from llm.core import lora
from llm.core.config import ModelConfig
from llm.errors import LLMError, UserError
from llm.training import adapters, safe_load

if TYPE_CHECKING:  # lightning is not imported here: inference commands start without it
    import lightning as L

PREFIX = "model."  # the LightningModule holds the Transformer as `model`
HEAD = "head."  # and a classifier its head as `head`
_COMPILED = "_orig_mod."  # torch.compile's wrapper inserts this into parameter names
ROLES = ("bos", "eos", "pad")
# the ModelConfig keys that fix the weights' shapes and meaning; the others (dropout, compile, max_seq_len, init_std)
# are training settings a run may change
SHAPE_KEYS = (
    "dim",
    "n_layers",
    "n_heads",
    "n_kv_heads",
    "ffn_dim",
    "vocab_size",
    "tie_embeddings",
    "rope_theta",
    "rope_scaling",
    "norm_eps",
    "qk_norm",
)
EXTRAS = ("special_tokens", "hf_tokenizer_config")  # a converted checkpoint's, carried along by training


# ------------------------------------------------------------------------------------------------------ reading


def is_sharded(path: str | Path) -> bool:
    """Whether ``path`` is a sharded (FSDP) checkpoint directory."""
    return (Path(path) / "meta.pt").is_file() and (Path(path) / ".metadata").is_file()


def load(path: str | Path, base: str | Path | None = None) -> dict[str, Any]:
    """A checkpoint file, memory-mapped (a tensor is read from disk when touched), with a one-line error.

    An adapter checkpoint (llm/training/adapters.py) comes back whole: its base's tensors (read from the path it
    records, or ``base``, and checked against the recorded hash) with the adapters' beside them.
    """
    ckpt = _load_file(Path(path))
    if "adapter" in ckpt:
        ckpt = _with_base(ckpt, Path(path), base)
    return ckpt


def _load_file(path: Path) -> dict[str, Any]:
    if path.is_dir():
        raise UserError(f"{path}: is a directory; give a single .ckpt file (a sharded checkpoint must be consolidated)")
    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint file")
    try:
        ckpt = safe_load.torch_load(path, mmap=True)  # data only: a pickle that would run code is refused
    except UserError:
        raise
    except Exception as err:  # truncated zip, not a torch file, a pickle of something else, ...
        raise UserError(f"{path}: not a readable checkpoint ({type(err).__name__}: {err})") from err
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise UserError(f"{path}: not a training checkpoint (no state_dict)")
    return ckpt


def _with_base(ckpt: dict[str, Any], path: Path, base: str | Path | None) -> dict[str, Any]:
    recorded = ckpt["adapter"].get("base") or {}
    base_path = Path(base if base is not None else recorded.get("path", ""))
    if not base_path.is_file():
        raise UserError(
            f"{path}: holds LoRA adapters whose base checkpoint {base_path} is not there"
            " (give it with --base PATH, or put it back)"
        )
    if recorded.get("sha256") and digest(base_path) != recorded["sha256"]:
        raise UserError(
            f"{path}: its adapters were trained on a base with sha256 {recorded['sha256'][:12]}, but {base_path}"
            " has other contents"
        )
    whole = load(base_path)
    state = {k: v for k, v in whole["state_dict"].items() if k.startswith(PREFIX)}
    if "adapter" in whole:  # adapters trained on an adapted model: its own adapters are part of their base
        scale = lora.LoRAConfig.from_dict(whole["adapter"]["config"]).scale
        inner = lora.merge_state({k[len(PREFIX) :]: v for k, v in state.items()}, scale)
        state = {PREFIX + k: v for k, v in inner.items()}
    state.update(ckpt["state_dict"])  # the adapters, and a classifier's head
    merged = {k: v for k, v in whole.items() if k not in ("state_dict", "loops", "optimizer_states")}
    merged.update(ckpt)
    merged["state_dict"] = state
    return merged


_DIGESTS: dict[tuple[str, int, int], str] = {}


def digest(path: str | Path) -> str:
    """sha256 of a checkpoint's bytes (a directory: of its files' names and bytes, in order), cached per process
    by path, size and modification time: a 7B checkpoint takes seconds to hash."""
    path = Path(path).resolve()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    stat = [f.stat() for f in files]
    key = (str(path), sum(s.st_size for s in stat), max((s.st_mtime_ns for s in stat), default=0))
    if key not in _DIGESTS:
        h = hashlib.sha256()
        for f in files:
            if path.is_dir():
                h.update(str(f.relative_to(path)).encode())
            with f.open("rb") as fh:
                while chunk := fh.read(1 << 24):
                    h.update(chunk)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def load_meta(path: str | Path) -> dict[str, Any]:
    """Everything but the weights' values: a sharded directory's ``meta.pt``, or the (memory-mapped) file."""
    if is_sharded(path):
        safe_load.check_sharded(path)
        return safe_load.torch_load(Path(path) / "meta.pt")
    return _load_file(Path(path))


def model_config_of(ckpt: Mapping[str, Any], path: str | Path) -> ModelConfig:
    try:
        return ModelConfig.from_dict(ckpt["hyper_parameters"]["model"])
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(f"{path}: no usable model config in hyper_parameters.model ({err})") from err


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Our parameter names and shapes for ``cfg`` (a model built on the meta device: no memory, no init)."""
    from llm.core.model import Transformer

    with torch.device("meta"):
        model = Transformer(cfg)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def model_state(
    ckpt: Mapping[str, Any], cfg: ModelConfig, path: str | Path, merge: bool = True
) -> dict[str, torch.Tensor]:
    """The Transformer's tensors by our names (module prefix and metric states dropped), checked against ``cfg``.

    With tied embeddings ``output.weight`` may be absent (it is the embedding). LoRA adapters are folded into
    the weights they adapt (``merge``), or kept as ``<layer>.lora_a`` / ``.lora_b`` tensors."""
    state = {k[len(PREFIX) :].replace(_COMPILED, ""): v for k, v in ckpt["state_dict"].items() if k.startswith(PREFIX)}
    adapters = {k: v for k, v in state.items() if lora.is_adapter_key(k)}
    if adapters and merge:
        state = lora.merge_state(state, lora.LoRAConfig.from_dict(ckpt["adapter"]["config"]).scale)
    elif adapters:
        state = {k: v for k, v in state.items() if k not in adapters}
    expected = expected_shapes(cfg)
    unexpected = sorted(set(state) - set(expected))
    missing = sorted(set(expected) - set(state) - ({"output.weight"} if cfg.tie_embeddings else set()))
    if unexpected or missing:
        raise UserError(
            f"{path}: weights do not match hyper_parameters.model"
            f" (missing: {', '.join(missing[:3]) or '-'}; unexpected: {', '.join(unexpected[:3]) or '-'})"
        )
    for name, t in state.items():
        if tuple(t.shape) != expected[name]:
            raise UserError(f"{path}: {name} has shape {tuple(t.shape)}, the config implies {expected[name]}")
    if adapters and not merge:
        state.update(adapters)
    return state


def head_state(ckpt: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """A classifier's head tensors (empty for a language model)."""
    return {k[len(HEAD) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(HEAD)}


def labels_of(ckpt: Mapping[str, Any]) -> list[str] | None:
    """A classifier's labels, None for a language model."""
    labels = (ckpt.get("hyper_parameters") or {}).get("labels")
    return None if labels is None else [str(label) for label in labels]


def special_ids(ckpt: Mapping[str, Any]) -> dict[str, Any]:
    """{"bos", "eos", "pad": id or None, "eos_ids": [ids]} of a checkpoint.

    A converted checkpoint stores them; a training checkpoint has only its tokenizer, whose roles are found as the
    DataModule finds them (``<|bos|>``/``<s>``/..., BOS and PAD falling back to EOS).
    """
    stored = ckpt.get("special_tokens")
    if stored:
        ids = {role: stored.get(role) for role in ROLES}
        ids["eos_ids"] = list(stored.get("eos_ids") or ([] if ids["eos"] is None else [ids["eos"]]))
        return ids
    ids: dict[str, Any] = dict.fromkeys(ROLES)
    if ckpt.get("tokenizer"):
        from tokenizers import Tokenizer

        from datamodules.tokenizer import special_ids as tokenizer_roles

        try:
            ids["bos"], ids["eos"], ids["pad"] = tokenizer_roles(Tokenizer.from_str(ckpt["tokenizer"]))
        except LLMError:  # no end-of-sequence token: leave the roles unset
            pass
    ids["eos_ids"] = [] if ids["eos"] is None else [ids["eos"]]
    return ids


# --------------------------------------------------------------------------------------------------- same model


def shape_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``key: saved vs current`` for each shape key on which two model configs (as dicts) disagree; a key that an
    older checkpoint lacks (``qk_norm``) has its default."""
    default = {f.name: f.default for f in dataclasses.fields(ModelConfig) if f.default is not dataclasses.MISSING}
    saved, current = {**default, **saved}, {**default, **current}
    return [
        f"{k}: checkpoint {saved.get(k)!r} vs config {current.get(k)!r}"
        for k in SHAPE_KEYS
        if not same_value(saved.get(k), current.get(k))
    ]


def same_value(a: Any, b: Any) -> bool:
    """Whether two config values mean the same: numbers compared as floats (10000 == 10000.0, to 1e-9 relative),
    dicts key by key (an OmegaConf node equals its plain dict)."""
    if isinstance(a, Mapping) or isinstance(b, Mapping):
        a, b = dict(a or {}), dict(b or {})
        return a.keys() == b.keys() and all(same_value(a[k], b[k]) for k in a)
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool) and not isinstance(b, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9)
    return a == b


def resolve_ckpt_path(ckpt_path: str | None, run_dir: str | Path) -> str | None:
    """``last`` means <run_dir>/checkpoints/last.ckpt; when there is none yet the run starts fresh.

    A kill between the two renames of ``swap_in`` leaves the previous checkpoint as ``last.ckpt.old`` alone: it is
    the last good one, and resumed from."""
    if ckpt_path is None:
        return None
    if ckpt_path == "last":
        last = Path(run_dir) / "checkpoints" / "last.ckpt"
        old = _old(last)
        if not last.exists() and (old.is_file() or is_sharded(old)):
            print(f"ckpt_path=last: {last} was being replaced when the run ended; resuming from {old}")
            return str(old)
        if not last.exists():
            print(f"ckpt_path=last: no checkpoint at {last} yet, starting fresh")
            return None
        return str(last)
    if not (Path(ckpt_path).is_file() or is_sharded(ckpt_path)):
        raise UserError(f"ckpt_path: no checkpoint file at {ckpt_path}")
    return ckpt_path


def _old(path: Path) -> Path:
    return path.with_name(path.name + ".old")


def swap_in(new: str | Path, path: str | Path) -> None:
    """Put ``new`` (a file or a sharded directory, complete) in place of ``path``, whatever ``path`` is now.

    A file over a file is one ``os.replace``. Otherwise (a directory over anything, a file over the directory of an
    earlier FSDP run) ``path`` first becomes ``<path>.old``, removed once ``new`` is in place; a kill between the
    two renames leaves ``<path>.old`` alone, which ``resolve_ckpt_path`` resumes from. A ``<path>.old`` found with
    no ``path`` is that last good checkpoint, so it is kept until ``new`` is in place."""
    new, path = Path(new), Path(path)
    old = _old(path)
    if new.is_file() and not path.is_dir():
        os.replace(new, path)
    else:
        if path.exists():
            _remove(old)
            path.rename(old)
        new.rename(path)
    _remove(old)  # the one just moved aside, or one left by a kill: ``path`` is the newer now


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def check_resume(
    ckpt_path: str | None,
    model: ModelConfig,
    adapter: lora.LoRAConfig | None = None,
    base: dict[str, str] | None = None,
) -> None:
    """Refuse, in one line, a checkpoint that cannot resume a run of ``model``: unreadable, of another model, or
    with other adapters than ``adapter`` (trained on another ``base``) (llm/training/adapters.py)."""
    if ckpt_path is None:
        return
    ckpt = load_meta(ckpt_path)  # memory-mapped: cheap even for large models; UserError if truncated
    saved = (ckpt.get("hyper_parameters") or {}).get("model")
    if saved is None:
        raise UserError(f"{ckpt_path}: not a checkpoint of this trainer (no model config inside)")
    diff = shape_differences(saved, model.to_dict())
    if diff:
        raise UserError(f"{ckpt_path}: the checkpoint is of another model ({'; '.join(diff[:4])})")
    if "loops" not in ckpt:
        raise UserError(f"{ckpt_path}: holds weights only and cannot resume a run; use init_from= instead")
    adapters.check_checkpoint(ckpt, adapter, base, ckpt_path)


def best_checkpoint(trainer: L.Trainer) -> str | None:
    """The best checkpoint by val/loss, or None (validate the current weights) when there is none.

    After a hard kill the best path restored from last.ckpt can name a file that a later, better checkpoint
    already replaced (the kill fell between the two writes), so a path that no longer exists is not returned.
    The first process decides for all: with asynchronous sharded saves it is the one that puts the directory in
    place, and the others would ask before it has (then some would load a checkpoint and some not, and hang).
    """
    from lightning.pytorch.callbacks import ModelCheckpoint

    best = None
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.monitor == "val/loss" and cb.best_model_path:
            if Path(cb.best_model_path).exists():
                best = cb.best_model_path
                break
    return trainer.strategy.broadcast(best)


def consolidate(ckpt_dir: str | Path, out: str | Path | None = None) -> dict[str, Any]:
    """The sharded checkpoint at ``ckpt_dir`` as one in-memory checkpoint (written to ``out`` if given).

    The result has the layout of a single-device checkpoint, weights only (no optimizer and loop state), so
    ``init_from=``, ``llm.convert`` and ``llm.generate`` accept it. It runs in one process without a process group.
    """
    meta, full = _read_sharded(Path(ckpt_dir))
    ckpt = {k: v for k, v in meta.items() if k not in ("loops", "optimizer_states", "lr_schedulers")}
    ckpt["state_dict"] = full["state_dict"]
    if out is not None:
        out = Path(out)
        tmp_out = out.with_name(out.name + ".tmp")
        torch.save(ckpt, tmp_out)
        tmp_out.replace(out)
    return ckpt


def load_whole(ckpt_dir: str | Path) -> dict[str, Any]:
    """The sharded checkpoint at ``ckpt_dir`` as the checkpoint a single-device or DDP run writes: full weights,
    the optimizer states (each keyed by parameter index, as ``Optimizer.state_dict`` keys them), schedules, loops
    and data position. So a run saved under FSDP with N processes resumes without FSDP, on any number of them.

    Every process that reads it holds the whole state in host memory (as it does with a DDP checkpoint).
    """
    ckpt_dir = Path(ckpt_dir)
    meta, full = _read_sharded(ckpt_dir)
    ckpt = dict(meta)
    ckpt["state_dict"] = full.pop("state_dict")
    ckpt["optimizer_states"] = []
    for i in range(len([k for k in full if k.startswith("optimizer_")])):
        if f"optimizer_{i}" not in full:
            raise UserError(f"{ckpt_dir}: optimizer_{i} is missing from the shards")
        ckpt["optimizer_states"].append(_by_index(full[f"optimizer_{i}"], ckpt_dir))
    return ckpt


def _read_sharded(ckpt_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(``meta.pt``, the shards gathered into whole tensors: ``{"state_dict": ..., "optimizer_<i>": ...}``), read
    in this one process (DCP's no-process-group load), data only."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    if not is_sharded(ckpt_dir):
        raise UserError(f"{ckpt_dir}: not a sharded checkpoint directory (no meta.pt and .metadata)")
    safe_load.check_sharded(ckpt_dir)  # before dcp_to_torch_save, which unpickles .metadata unrestricted
    meta = safe_load.torch_load(ckpt_dir / "meta.pt")
    with tempfile.TemporaryDirectory() as tmp:
        flat = Path(tmp) / "full.pt"
        dcp_to_torch_save(ckpt_dir, flat)
        full = safe_load.torch_load(flat)  # read back restricted: what came out of the shards is data only
    return meta, full


def _by_index(optim: Mapping[str, Any], ckpt_dir: Path) -> dict[str, Any]:
    """An optimizer state keyed by parameter name (torch.distributed.checkpoint's ``get_optimizer_state_dict``)
    keyed by index instead: ``Optimizer.state_dict`` numbers the parameters group after group, in the order the
    groups list them, which is the order the names are listed in here."""
    groups = optim.get("param_groups") or []
    names = [name for group in groups for name in group["params"]]
    index = {name: i for i, name in enumerate(names)}
    unknown = sorted(set(optim.get("state") or {}) - set(index))
    if unknown:
        raise UserError(f"{ckpt_dir}: optimizer state for {unknown[0]}, which no parameter group lists")
    return {
        "state": {index[name]: value for name, value in (optim.get("state") or {}).items()},
        "param_groups": [{**group, "params": [index[n] for n in group["params"]]} for group in groups],
    }


def by_name(optim: Mapping[str, Any], names: list[str], path: str | Path) -> dict[str, Any]:
    """An optimizer state keyed by index (``Optimizer.state_dict``) keyed by the names of ``names``: the parameters
    in the order the optimizer numbers them (group after group)."""
    groups = optim.get("param_groups") or []
    count = sum(len(group["params"]) for group in groups)
    if count != len(names):
        raise UserError(f"{path}: its optimizer state has {count} parameters, this model {len(names)}")
    return {
        "state": {names[int(i)]: value for i, value in (optim.get("state") or {}).items()},
        "param_groups": [{**group, "params": [names[int(i)] for i in group["params"]]} for group in groups],
    }
