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
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from llm.errors import UserError

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


def schema_for(
    target: str, *, partial: bool = False, skip: tuple[str, ...] = (), extra: tuple[tuple[str, Any, Any], ...] = ()
) -> type:
    """A dataclass whose fields are ``_target_`` plus every keyword ``target`` accepts (and ``extra`` fields: keys
    of the group that the run reads rather than the target, as (name, type, default))."""
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
    known = {f[0] for f in fields}
    fields += [(n, ftype, dataclasses.field(default=default)) for n, ftype, default in extra if n not in known]
    name = target.rpartition(".")[2] + "Schema"
    return dataclasses.make_dataclass(name, fields)


@dataclasses.dataclass
class CheckpointSchema:
    every_n_steps: int | None = None  # periodic checkpoints besides last and best; null: none
    keep_last: int = 2  # how many periodic checkpoints to keep
    async_save: bool = False  # write checkpoints in a background thread (llm/training/checkpoint_io.py)


@dataclasses.dataclass
class PlanSchema:
    check: bool = True  # pre-flight memory check before building the model
    device_memory_gb: float | None = None  # null: read from the device


@dataclasses.dataclass
class ExperimentSettings:
    """``experiment.*``: the settings of a task beyond the groups; each experiment file sets the ones it uses."""

    label_smoothing: float = 0.0  # classify: of the training loss (val/loss is plain cross-entropy)
    max_new_tokens: int = 64  # eval with data=sft: tokens per generated answer
    max_samples: int | None = 500  # eval with data=sft: answers generated (the first of the eval set); null: all

    def __post_init__(self) -> None:
        from llm.errors import UserError

        if not 0.0 <= self.label_smoothing < 1.0:
            raise UserError(f"experiment.label_smoothing={self.label_smoothing} must be in [0, 1)")
        if self.max_new_tokens < 0:
            raise UserError(f"experiment.max_new_tokens={self.max_new_tokens} must be >= 0")
        if self.max_samples is not None and self.max_samples < 0:
            raise UserError(f"experiment.max_samples={self.max_samples} must be >= 0 (or null: all)")


@dataclasses.dataclass
class DPOSchema:
    """``dpo.*``: preference tuning (experiment=dpo; experiment=eval with data=preference), llm/training/dpo.py."""

    beta: float = 0.1  # the pull towards the reference policy (the weight of the KL penalty)
    label_smoothing: float = 0.0  # > 0: conservative DPO, the fraction of preferences assumed flipped (sigmoid)
    loss: str = "sigmoid"  # sigmoid (DPO) | ipo
    reference: str | None = None  # the reference's checkpoint; null: init_from's weights (or, in eval, the stored one)

    def __post_init__(self) -> None:
        from llm.training.dpo import check_settings

        check_settings(self.beta, self.label_smoothing, self.loss)


@dataclasses.dataclass
class RootSchema:
    """Top-level keys of ``conf/config.yaml``; the group nodes are typed by their own schemas."""

    task: str = "pretrain"
    seed: int = 1234
    run_dir: str = "."
    ckpt_path: str | None = None
    init_from: str | None = None
    allow_unsafe_checkpoint: bool = False
    checkpoint: CheckpointSchema = dataclasses.field(default_factory=CheckpointSchema)
    plan: PlanSchema = dataclasses.field(default_factory=PlanSchema)
    model: Any = None
    data: Any = None
    trainer: Any = None
    optim: Any = None
    sched: Any = None
    callbacks: Any = None
    logger: Any = None
    experiment: ExperimentSettings = dataclasses.field(default_factory=ExperimentSettings)
    dpo: DPOSchema = dataclasses.field(default_factory=DPOSchema)
    hparams_search: Any = None
    adapter: Any = None  # conf/adapter: null (full training), lora or qlora


# keys of the data group that the run reads (llm/app/spec.py), not the DataModule
DATA_RUN_KEYS = (("global_batch_size", int | None, None),)  # samples per optimizer step: sets the accumulation
# keys of the optim group that the module reads, not the optimizer
OPTIM_RUN_KEYS = (("z_loss", float, 0.0),)  # weight of the squared log-partition term (PaLM's z-loss) in the loss
# group -> (target, partial, arguments that train.py passes in code rather than from YAML)
GROUP_TARGETS: dict[str, tuple[str, bool, tuple[str, ...]]] = {
    "model": ("llm.core.config.ModelConfig", False, ()),
    "trainer": ("lightning.pytorch.Trainer", False, ("callbacks", "logger", "plugins")),
    "optim": ("torch.optim.AdamW", True, ("params",)),
    "sched": ("llm.core.schedule.WarmupCosine", True, ("optimizer", "max_steps")),
    "adapter": ("llm.core.lora.LoRAConfig", False, ()),
}
SCHED_TARGETS = ("llm.core.schedule.WarmupLinear", "llm.core.schedule.WarmupStableDecay")
OPTIM_TARGETS = ("llm.training.muon.MuonAdamW",)  # the other optimizers (AdamW is the group's `schema`)
DATA_TARGETS = (
    "datamodules.pretrain.PretrainDataModule",
    "datamodules.sft.SFTDataModule",
    "datamodules.classify.ClassifyDataModule",
    "datamodules.preference.PreferenceDataModule",
    "datamodules.mixture.MixtureDataModule",  # its sources are typed by datamodules.mixture.SourceSpec when built
)


def register() -> None:
    """Register every schema in Hydra's ConfigStore (idempotent; called before composing)."""
    from llm.runtime.launch import register_resolvers

    register_resolvers()
    cs = ConfigStore.instance()
    cs.store(name="root_schema", node=RootSchema)
    for group, (target, partial, skip) in GROUP_TARGETS.items():
        extra = OPTIM_RUN_KEYS if group == "optim" else ()
        cs.store(group=group, name="schema", node=schema_for(target, partial=partial, skip=skip, extra=extra))
    for target in DATA_TARGETS:
        short = target.rpartition(".")[2]
        cs.store(group="data", name=f"schema_{short}", node=schema_for(target, extra=DATA_RUN_KEYS))
    for target in OPTIM_TARGETS:
        short = target.rpartition(".")[2]
        node = schema_for(target, partial=True, skip=("params",), extra=OPTIM_RUN_KEYS)
        cs.store(group="optim", name=f"schema_{short}", node=node)
    for target in SCHED_TARGETS:  # the other schedules (cosine is the group's `schema`)
        short = target.rpartition(".")[2]
        node = schema_for(target, partial=True, skip=("optimizer", "max_steps"))
        cs.store(group="sched", name=f"schema_{short}", node=node)


CONF_DIR = Path(__file__).resolve().parents[2] / "conf"  # the repository's conf/, as train.py composes it


def compose(overrides: list[str]) -> DictConfig:
    """The config `python train.py *overrides` composes; Hydra's errors become one-line UserErrors."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    register()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = hydra_compose(config_name="config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as err:
        raise UserError(_one_line(err)) from err
    finally:
        GlobalHydra.instance().clear()
    return cfg


def _one_line(err: BaseException) -> str:
    """Hydra's multi-line message in one line: its first line, the options it lists, the underlying cause."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    message = lines[0] if lines else type(err).__name__
    if any(line.startswith("Available options") for line in lines):
        start = next(i for i, line in enumerate(lines) if line.startswith("Available options")) + 1
        end = next((i for i, line in enumerate(lines) if line.startswith("Config search path")), len(lines))
        options = [o for o in lines[start:end] if o != "schema" and not o.startswith("schema_")]
        message += f" (available: {', '.join(options)})"
    cause = err.__cause__
    if cause is not None and str(cause).strip():
        message = message.rstrip(".") + f": {str(cause).strip().splitlines()[0]}"
    return message
