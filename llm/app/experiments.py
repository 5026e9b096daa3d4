"""What each `experiment=` builds: the data and the LightningModule of the task, and what `init_from` brings.

- ``pretrain``: a CausalLM from scratch (or continued from ``init_from``) on a text corpus;
- ``finetune``: a CausalLM from ``init_from`` on instruction data (``data=sft``) or text;
- ``classify``: a SequenceClassifier whose backbone comes from ``init_from`` (or is new) on ``data=classify``;
- ``eval``: the module of ``init_from``'s kind (language model or classifier), measured by llm/app/evaluate.py.

With ``init_from`` the checkpoint decides the model's shape and the tokenizer: ``model.*`` keys that would change
the weights' meaning (dimensions, vocabulary, rotary base, ...) are taken from it, and one set explicitly on the
command line to another value is an error. Training settings (``model.dropout``, ``model.compile``) stay the
run's, and ``model.max_seq_len`` too when set explicitly (positions are computed, not learned).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from tokenizers import Tokenizer

from datamodules.classify import ClassifyDataModule
from datamodules.sft import SFTDataModule
from llm.app.builders import build
from llm.convert import load_checkpoint, model_config_of, model_state
from llm.core.config import ModelConfig
from llm.errors import UserError
from llm.training.module import CHECKPOINT_EXTRAS, CausalLM, SequenceClassifier, TransformerModule

TASKS = ("pretrain", "finetune", "classify", "eval")
# keys that must agree with the weights; the checkpoint's value is used
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
)
RUN_KEYS = ("dropout", "compile")  # training settings: always the run's


@dataclass
class Init:
    """What ``init_from`` holds: the model config (merged with the run's settings), weights, tokenizer, labels."""

    path: str
    model: ModelConfig
    state: dict[str, torch.Tensor]  # the Transformer's weights, by our names
    head: dict[str, torch.Tensor] = field(default_factory=dict)  # a classifier's head
    labels: list[str] | None = None  # a classifier's labels (None: a language model)
    tokenizer_json: str | None = None
    chat_format: str | None = None
    chat_template: str | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return "classifier" if self.labels is not None else "language model"


def setting(cfg: DictConfig, key: str, default: Any) -> Any:
    """A task setting of the experiment (``experiment.<key>``), or the default when the experiment has none."""
    value = OmegaConf.select(cfg, f"experiment.{key}", default=None)
    return default if value is None else value


# ------------------------------------------------------------------------------------------------- init_from


def load_init(cfg: DictConfig) -> Init | None:
    """Read ``init_from`` (None without one) and set ``cfg.model`` to the checkpoint's shape.

    Called first, so that the memory plan and everything after it see the model that will actually run.
    """
    if cfg.task not in TASKS:
        raise UserError(f"task={cfg.task!r} is not known ({', '.join(TASKS)})")
    if cfg.init_from is None:
        if cfg.task in ("finetune", "eval"):
            raise UserError(
                f"experiment={cfg.task} needs init_from=CKPT: a .ckpt of pretraining, finetuning or classification,"
                " or one written by `python -m llm.convert from-hf`"
            )
        return None
    path = str(cfg.init_from)
    ckpt = load_checkpoint(path)
    saved = model_config_of(ckpt, path)
    state = model_state(ckpt, saved, path)  # names and shapes checked against the saved config
    hparams = ckpt.get("hyper_parameters") or {}
    labels = hparams.get("labels")
    model = merge_model(cfg.model, saved, explicit_model_keys(), path)
    with open_dict(cfg):
        for key, value in model.to_dict().items():
            cfg.model[key] = value
    return Init(
        path=path,
        model=model,
        state=state,
        head={k.removeprefix("head."): v for k, v in ckpt["state_dict"].items() if k.startswith("head.")},
        labels=None if labels is None else [str(label) for label in labels],
        tokenizer_json=ckpt.get("tokenizer"),
        chat_format=ckpt.get("chat_format"),
        chat_template=ckpt.get("chat_template"),
        extras={k: ckpt[k] for k in CHECKPOINT_EXTRAS if k in ckpt},
    )


def explicit_model_keys() -> dict[str, str]:
    """``model.*`` keys set on the command line, each with the override that set it (``model=X`` sets them all).

    Read from Hydra's record of the command line; empty when the config was composed otherwise (tests).
    """
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    keys: dict[str, str] = {}
    for override in HydraConfig.get().overrides.task:
        name = override.split("=", 1)[0].lstrip("+~")
        if name == "model":
            keys.update(dict.fromkeys((*SHAPE_KEYS, "max_seq_len"), override))
        elif name.startswith("model."):
            keys[name.split(".")[1]] = override
    return keys


def _same(asked: Any, saved: Any) -> bool:
    if isinstance(asked, Mapping) or isinstance(saved, Mapping):
        return dict(asked or {}) == dict(saved or {})
    if isinstance(asked, float) or isinstance(saved, float):
        return math.isclose(float(asked), float(saved), rel_tol=1e-9)
    return asked == saved


def merge_model(asked: Mapping[str, Any], saved: ModelConfig, explicit: Mapping[str, str], path: str) -> ModelConfig:
    """The checkpoint's model with the run's training settings; an explicit contradicting shape key is an error.

    ``asked``: the run's ``model`` node; ``explicit``: the keys set on the command line (see explicit_model_keys).
    A key set to null (``model.vocab_size=null``: derive it) contradicts nothing.
    """
    for key in SHAPE_KEYS:
        value = asked.get(key)
        if key in explicit and value is not None and not _same(value, getattr(saved, key)):
            via = explicit[key] if explicit[key].split("=", 1)[0].lstrip("+~") == "model" else f"model.{key}={value}"
            raise UserError(
                f"{via} contradicts init_from={path}, whose model.{key}={getattr(saved, key)}: with init_from the"
                " model's shape comes from the checkpoint; drop the override"
            )
    changes = {k: asked[k] for k in RUN_KEYS if asked.get(k) is not None}
    if "max_seq_len" in explicit and asked.get("max_seq_len") is not None:
        changes["max_seq_len"] = int(asked["max_seq_len"])
    try:
        return dataclasses.replace(saved, **changes)
    except ValueError as err:
        raise UserError(f"model: {err}") from err


def write_tokenizer(tokenizer_json: str, run_dir: str | Path) -> Path:
    """``<run_dir>/tokenizer.json`` from the checkpoint's string, written atomically (ranks may race)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "tokenizer.json"
    tmp = run_dir / f".tokenizer.{os.getpid()}.json"
    tmp.write_text(tokenizer_json, encoding="utf-8")
    tmp.replace(path)
    return path


# ------------------------------------------------------------------------------------------------------- data


def build_datamodule(cfg: DictConfig, init: Init | None) -> L.LightningDataModule:
    """The data group's DataModule; with ``init_from`` its tokenizer (and a classifier's labels) come from there.

    For ``eval``, an example set given as ``data.paths`` alone is evaluated whole (it becomes the val split).
    """
    data = cfg.data
    given: dict[str, Any] = {}
    if init is not None and data.get("tokenizer") is None:
        if init.tokenizer_json is None:
            raise UserError(
                f"init_from={init.path} holds no tokenizer: give the model's tokenizer as data.tokenizer=PATH"
            )
        given["tokenizer"] = str(write_tokenizer(init.tokenizer_json, cfg.run_dir))
    if init is not None and init.chat_format is not None and "chat_template" in data and data.chat_template is None:
        given["chat_template"] = init.chat_format  # evaluate / continue with the template the model learnt
    if cfg.task == "eval":
        if "val_paths" in data and data.get("val_paths") is None and data.get("paths") is not None:
            given["val_paths"] = data.paths
        if init.labels is not None and "labels" in data:
            given["labels"] = init.labels
    return build(data, "data", **given)


# ----------------------------------------------------------------------------------------------------- module


def model_config(cfg: DictConfig, datamodule: L.LightningDataModule, init: Init | None) -> ModelConfig:
    """The model to build: the checkpoint's (``init``) or the config's, its vocabulary fitting the tokenizer."""
    n_tokens = datamodule.vocab_size
    if init is None:
        try:
            model = build(cfg.model, "model").with_vocab(n_tokens)
        except ValueError as err:
            raise UserError(f"model: {err}") from err
    else:
        model = init.model
        if n_tokens > model.vocab_size:
            raise UserError(
                f"data.tokenizer={cfg.data.get('tokenizer')} has {n_tokens} tokens, more than the {model.vocab_size}"
                f" embedding rows of init_from={init.path}: use the checkpoint's own tokenizer (data.tokenizer=null)"
            )
    if datamodule.seq_len > model.max_seq_len:
        raise UserError(f"data.seq_len={datamodule.seq_len} exceeds model.max_seq_len={model.max_seq_len}")
    return model


def build_module(cfg: DictConfig, datamodule: L.LightningDataModule, init: Init | None = None) -> L.LightningModule:
    """The module for ``cfg.task``, with ``init_from``'s weights loaded."""
    task = cfg.task
    is_classify_data = isinstance(datamodule, ClassifyDataModule)
    classifier = task == "classify" or (task == "eval" and init.labels is not None)
    if classifier and not is_classify_data:
        if task == "eval":
            raise UserError(f"init_from={init.path} is a classifier: evaluate it on labelled data (data=classify)")
        raise UserError("experiment=classify needs labelled data: data=classify (data.paths=[...])")
    if is_classify_data and not classifier:
        if task == "eval":
            raise UserError(
                f"init_from={init.path} is a language model: evaluate it on data=corpus, text or sft, or train a"
                " classifier from it first (experiment=classify)"
            )
        raise UserError(f"experiment={task} trains a language model; data=classify is for experiment=classify")
    strategy = str(OmegaConf.select(cfg, "trainer.strategy._target_", default="")).lower()
    if classifier and task == "classify" and "fsdp" in strategy:
        raise UserError("experiment=classify does not run under trainer=fsdp yet (its head is not sharded): use ddp")

    model = model_config(cfg, datamodule, init)
    training = task != "eval"
    optimizer = instantiate(cfg.optim) if training else None
    scheduler = instantiate(cfg.sched) if training else None
    module: TransformerModule
    if classifier:
        try:
            module = SequenceClassifier(
                model.to_dict(),
                labels=datamodule.labels,
                label_smoothing=float(setting(cfg, "label_smoothing", 0.0)),
                optimizer=optimizer,
                scheduler=scheduler,
            )
        except ValueError as err:
            raise UserError(f"experiment: {err}") from err
    else:
        module = CausalLM(model.to_dict(), optimizer=optimizer, scheduler=scheduler)

    from_checkpoint = init is not None and cfg.data.get("tokenizer") is None
    module.tokenizer_json = init.tokenizer_json if from_checkpoint else datamodule.tokenizer.to_str()
    if init is not None and init.tokenizer_json and not from_checkpoint:
        if Tokenizer.from_str(init.tokenizer_json).get_vocab() != datamodule.tokenizer.get_vocab():
            print("warning: data.tokenizer is not init_from's tokenizer: token ids may mean other things")
    if isinstance(datamodule, SFTDataModule):
        module.chat_format, module.chat_template = datamodule.template.template, datamodule.template.jinja()
    elif init is not None:
        module.chat_format, module.chat_template = init.chat_format, init.chat_template
    if init is not None:
        module.checkpoint_extras = dict(init.extras)
        module.load_weights(init.state)
        if classifier and init.labels == module.labels and init.head:
            module.load_head(init.head)
        elif classifier and init.labels is not None:
            print(f"init_from={init.path}: its labels differ from the data's; the classifier head starts anew")
    return module
