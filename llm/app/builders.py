"""Turning composed config nodes into the objects ``train.py`` wires together."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig

from llm.errors import UserError
from llm.runtime.hardware import fastest_precision


def build(node: DictConfig, group: str, **kwargs: Any) -> Any:
    """``instantiate(node)``, with a wrong value reported on one line naming the group (``model: ...``).

    Hydra wraps what the target raised in an InstantiationException; a ValueError or TypeError from our
    own constructors is a user's value at fault, so it becomes a UserError; anything else is a bug and
    keeps its traceback.
    """
    try:
        return instantiate(node, _convert_="all", **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, (ValueError, TypeError)):
            raise UserError(f"{group}: {_last_line(cause)}") from err
        raise


def build_all(nodes: DictConfig | None) -> list:
    """Instantiate every ``_target_`` entry of a dict-of-objects group (callbacks, logger).

    An entry set to null is dropped, so `callbacks.samples=null` removes one callback; a periodic
    checkpoint whose interval is null is dropped too, as it would otherwise save at every validation.
    """
    objects = []
    for name, node in (nodes or {}).items():
        if node is None:
            continue
        if "every_n_train_steps" in node and node.every_n_train_steps is None:
            continue
        try:
            objects.append(instantiate(node, _convert_="all"))
        except Exception as err:  # Hydra wraps a bad keyword in InstantiationException: name the entry
            raise UserError(f"could not build `{name}` ({node.get('_target_')}): {_last_line(err)}") from err
    return objects


def _last_line(err: BaseException) -> str:
    while err.__cause__ is not None:
        err = err.__cause__
    return str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__


def resolve_precision(cfg: DictConfig) -> None:
    """Replace ``trainer.precision=auto`` with the fastest precision for the hardware present."""
    if cfg.trainer.get("precision") == "auto":
        cfg.trainer.precision = fastest_precision(str(cfg.trainer.get("accelerator", "auto")))


def world_size(trainer: DictConfig) -> int:
    """Processes of the run: devices per node (a number, a list, or auto/-1 for all GPUs) times nodes."""
    devices = trainer.get("devices", 1)
    accelerator = str(trainer.get("accelerator", "auto"))
    if devices in ("auto", -1, "-1"):
        on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
        devices = max(1, torch.cuda.device_count()) if on_gpu else 1
    elif not isinstance(devices, (int, str)):
        devices = len(devices)
    return int(devices) * int(trainer.get("num_nodes", 1) or 1)


def data_parallel_size(trainer: DictConfig) -> int:
    """Replicas that each read their own batches: the processes, less the tensor-parallel groups' sharing."""
    strategy = trainer.get("strategy")
    tp = int(strategy.get("tensor_parallel_size", 1) or 1) if isinstance(strategy, DictConfig) else 1
    return max(1, world_size(trainer) // tp)


def resolve_accumulation(cfg: DictConfig) -> None:
    """``data.global_batch_size`` (samples per optimizer step) sets ``trainer.accumulate_grad_batches``."""
    target = cfg.data.get("global_batch_size")
    if not target:
        return
    per_step = int(cfg.data.batch_size) * data_parallel_size(cfg.trainer)
    if target % per_step:
        raise UserError(
            f"data.global_batch_size={target} is not a multiple of data.batch_size x data-parallel replicas = {per_step}"
        )
    cfg.trainer.accumulate_grad_batches = target // per_step


def resolve_ckpt_path(ckpt_path: str | None, run_dir: str | Path) -> str | None:
    """``last`` means <run_dir>/checkpoints/last.ckpt; when there is none yet the run starts fresh."""
    if ckpt_path is None:
        return None
    if ckpt_path == "last":
        last = Path(run_dir) / "checkpoints" / "last.ckpt"
        if not last.exists():
            print(f"ckpt_path=last: no checkpoint at {last} yet, starting fresh")
            return None
        return str(last)
    if not (Path(ckpt_path).is_file() or (Path(ckpt_path) / "meta.pt").is_file()):  # a file, or a sharded dir
        raise UserError(f"ckpt_path: no checkpoint file at {ckpt_path}")
    return ckpt_path


def check_resume(ckpt_path: str | None, module: L.LightningModule) -> None:
    """Refuse, in one line, a checkpoint that cannot resume this run: unreadable, or of another model."""
    if ckpt_path is None:
        return
    from llm.convert import load_checkpoint

    meta = Path(ckpt_path) / "meta.pt"  # a sharded (FSDP) checkpoint: a directory with the metadata beside the shards
    if meta.is_file():
        ckpt = torch.load(meta, map_location="cpu", weights_only=False)
    else:
        ckpt = load_checkpoint(ckpt_path)  # memory-mapped: cheap even for large models; UserError if truncated
    saved = (ckpt.get("hyper_parameters") or {}).get("model")
    current = module.hparams.get("model")
    if saved is None or current is None:
        raise UserError(f"{ckpt_path}: not a checkpoint of this trainer (no model config inside)")
    diff = [
        f"{k}: checkpoint {saved.get(k)!r} vs config {current.get(k)!r}"
        for k in current
        if saved.get(k) != current.get(k)
    ]
    if diff:
        raise UserError(f"{ckpt_path}: the checkpoint is of another model ({'; '.join(diff[:4])})")
    if "loops" not in ckpt:
        raise UserError(f"{ckpt_path}: holds weights only and cannot resume a run; use init_from= instead")


def best_checkpoint(trainer: L.Trainer) -> str | None:
    """The best checkpoint by the monitored metric, or None (validate the current weights) when there is none.

    After a hard kill the best path restored from last.ckpt can name a file that a later, better checkpoint
    already replaced (the kill fell between the two writes), so a path that no longer exists is not returned.
    """
    from lightning.pytorch.callbacks import ModelCheckpoint

    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.monitor == "val/loss" and cb.best_model_path:
            if Path(cb.best_model_path).exists():
                return cb.best_model_path
    return None
