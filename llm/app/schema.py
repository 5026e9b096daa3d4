"""Structured-config schemas, so that a misspelt key fails when Hydra composes, not at run time.

Each config group option (``conf/model/tiny.yaml`` ...) starts with ``defaults: [schema, _self_]``; the
``schema`` node is a dataclass registered here in Hydra's ConfigStore. With a schema underneath, OmegaConf
rejects keys the target does not accept ("Key 'dmi' not in 'ModelSchema'") and values of the wrong type,
with Hydra's own message, before anything is built.

The schemas are *derived* from the ``_target_`` they instantiate (its signature or dataclass fields), so a
new argument of ``ModelConfig`` or of Lightning's ``Trainer`` is accepted without editing a second list.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import types
import typing
from typing import Any

from hydra.core.config_store import ConfigStore

_SCALARS = (int, float, str, bool)


def _import(path: str) -> Any:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _field_type(hint: Any) -> Any:
    """Map a Python annotation onto what OmegaConf can validate: Optional scalar, or Any."""
    if hint in _SCALARS:
        return hint | None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1 and args[0] in _SCALARS:
            return args[0] | None
    return Any


def _hints(fn: Any) -> dict[str, Any]:
    try:
        return typing.get_type_hints(fn)
    except Exception:  # unresolvable forward references: fall back to untyped fields
        return {}


def schema_for(target: str, *, partial: bool = False, skip: tuple[str, ...] = ()) -> type:
    """A dataclass whose fields are ``_target_`` plus every keyword ``target`` accepts."""
    obj = _import(target)
    fn = obj.__init__ if inspect.isclass(obj) else obj
    hints = _hints(fn)
    fields: list[tuple[str, Any, Any]] = [("_target_", str, dataclasses.field(default=target))]
    if partial:
        fields.append(("_partial_", bool, dataclasses.field(default=True)))
    if dataclasses.is_dataclass(obj):
        params = [
            (f.name, f.default if f.default is not dataclasses.MISSING else None)
            for f in dataclasses.fields(obj)
            if f.init
        ]
    else:
        params = [
            (p.name, None if p.default is inspect.Parameter.empty else p.default)
            for p in inspect.signature(fn).parameters.values()
            if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        ]
    for name, default in params:
        if name in skip:
            continue
        ftype = _field_type(hints.get(name, Any))
        if not isinstance(default, (*_SCALARS, type(None))):
            default, ftype = None, Any  # containers and objects: untyped, filled by the YAML
        fields.append((name, ftype, dataclasses.field(default=default)))
    name = target.rpartition(".")[2] + "Schema"
    return dataclasses.make_dataclass(name, fields)


@dataclasses.dataclass
class CheckpointSchema:
    every_n_steps: int | None = None  # periodic checkpoints besides last and best; null: none
    keep_last: int = 2  # how many periodic checkpoints to keep


@dataclasses.dataclass
class PlanSchema:
    check: bool = True  # pre-flight memory check before building the model
    device_memory_gb: float | None = None  # null: read from the device


@dataclasses.dataclass
class RootSchema:
    """Top-level keys of ``conf/config.yaml``; the group nodes are typed by their own schemas."""

    task: str = "pretrain"
    seed: int = 1234
    run_dir: str = "."
    ckpt_path: str | None = None
    init_from: str | None = None
    checkpoint: CheckpointSchema = dataclasses.field(default_factory=CheckpointSchema)
    plan: PlanSchema = dataclasses.field(default_factory=PlanSchema)
    samples: Any = None
    model: Any = None
    data: Any = None
    trainer: Any = None
    optim: Any = None
    sched: Any = None
    callbacks: Any = None
    logger: Any = None
    experiment: Any = None
    hparams_search: Any = None


# group -> (target, partial, arguments that train.py passes in code rather than from YAML)
GROUP_TARGETS: dict[str, tuple[str, bool, tuple[str, ...]]] = {
    "model": ("llm.core.config.ModelConfig", False, ()),
    "trainer": ("lightning.pytorch.Trainer", False, ("callbacks", "logger", "plugins")),
    "optim": ("torch.optim.AdamW", True, ("params",)),
    "sched": ("llm.core.schedule.WarmupCosine", True, ("optimizer", "max_steps")),
}
DATA_TARGETS = (
    "datamodules.pretrain.PretrainDataModule",
    "datamodules.sft.SFTDataModule",
    "datamodules.classify.ClassifyDataModule",
)


def register() -> None:
    """Register every schema in Hydra's ConfigStore (idempotent; called before composing)."""
    from llm.runtime.launch import register_resolvers

    register_resolvers()
    cs = ConfigStore.instance()
    cs.store(name="root_schema", node=RootSchema)
    for group, (target, partial, skip) in GROUP_TARGETS.items():
        cs.store(group=group, name="schema", node=schema_for(target, partial=partial, skip=skip))
    for target in DATA_TARGETS:
        short = target.rpartition(".")[2]
        cs.store(group="data", name=f"schema_{short}", node=schema_for(target))
