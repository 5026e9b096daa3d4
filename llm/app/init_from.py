"""``init_from=CKPT``: what a checkpoint brings to a new run (weights, the model's shape, tokenizer, labels).

With ``init_from`` the checkpoint decides the model's shape and the tokenizer: ``model.*`` keys that would change
the weights' meaning (llm.training.checkpoint.SHAPE_KEYS) are taken from it, and one set explicitly on the command
line to another value is an error. Training settings (``model.dropout``, ``model.compile``) stay the run's, and
``model.max_seq_len`` too when set explicitly (positions are computed, not learned).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llm.core.config import ModelConfig
from llm.errors import UserError
from llm.training import checkpoint
from llm.training.checkpoint import SHAPE_KEYS, same_value

RUN_KEYS = ("dropout", "compile")  # training settings: always the run's


@dataclass(frozen=True)
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
    def is_classifier(self) -> bool:
        return self.labels is not None


def load_init(path: str, asked: Mapping[str, Any], explicit: Mapping[str, str]) -> Init:
    """Read ``init_from=path``; ``asked`` is the run's ``model`` node, ``explicit`` the ``model.*`` keys set on the
    command line (see ``explicit_model_keys``)."""
    ckpt = checkpoint.load(path)
    saved = checkpoint.model_config_of(ckpt, path)
    return Init(
        path=path,
        model=merge_model(asked, saved, explicit, path),
        state=checkpoint.model_state(ckpt, saved, path),  # names and shapes checked against the saved config
        head=checkpoint.head_state(ckpt),
        labels=checkpoint.labels_of(ckpt),
        tokenizer_json=ckpt.get("tokenizer"),
        chat_format=ckpt.get("chat_format"),
        chat_template=ckpt.get("chat_template"),
        extras={k: ckpt[k] for k in checkpoint.EXTRAS if k in ckpt},
    )


def explicit_model_keys(overrides: Iterable[str]) -> dict[str, str]:
    """``model.*`` keys set by command-line ``overrides``, each with the override that set it (``model=X`` sets
    every shape key and ``max_seq_len``)."""
    keys: dict[str, str] = {}
    for override in overrides:
        name = override.split("=", 1)[0].lstrip("+~")
        if name == "model":
            keys.update(dict.fromkeys((*SHAPE_KEYS, "max_seq_len"), override))
        elif name.startswith("model."):
            keys[name.split(".")[1]] = override
    return keys


def merge_model(asked: Mapping[str, Any], saved: ModelConfig, explicit: Mapping[str, str], path: str) -> ModelConfig:
    """The checkpoint's model with the run's training settings; an explicit contradicting shape key is an error.

    A key set to null (``model.vocab_size=null``: derive it) contradicts nothing.
    """
    for key in SHAPE_KEYS:
        value = asked.get(key)
        if key in explicit and value is not None and not same_value(value, getattr(saved, key)):
            via = explicit[key] if explicit[key].split("=", 1)[0].lstrip("+~") == "model" else f"model.{key}={value}"
            raise UserError(
                f"{via} contradicts init_from={path}, whose model.{key}={getattr(saved, key)}: with init_from the"
                " model's shape comes from the checkpoint; drop the override"
            )
    changes = {k: asked[k] for k in RUN_KEYS if asked.get(k) is not None}
    if "max_seq_len" in explicit and asked.get("max_seq_len") is not None:
        changes["max_seq_len"] = int(asked["max_seq_len"])
    return dataclasses.replace(saved, **changes)  # ModelConfig checks the new values (UserError)


def write_tokenizer(tokenizer_json: str, run_dir: str | Path) -> Path:
    """``<run_dir>/tokenizer.json`` from the checkpoint's string, written atomically (ranks may race)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "tokenizer.json"
    tmp = run_dir / f".tokenizer.{os.getpid()}.json"
    tmp.write_text(tokenizer_json, encoding="utf-8")
    tmp.replace(path)
    return path
