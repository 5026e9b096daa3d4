"""What each `experiment=` builds: the LightningModule for the task, from the config and the prepared data."""

from __future__ import annotations

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig

from llm.builders import build
from llm.errors import UserError
from llm.module import CausalLM


def build_module(cfg: DictConfig, datamodule: L.LightningDataModule) -> L.LightningModule:
    """The module for ``cfg.task``; its vocabulary follows the prepared tokenizer."""
    if cfg.task != "pretrain":
        raise UserError(f"task={cfg.task!r} is not known (pretrain)")
    model_cfg = build(cfg.model, "model").with_vocab(datamodule.vocab_size)
    if datamodule.seq_len > model_cfg.max_seq_len:
        raise UserError(f"data.seq_len={datamodule.seq_len} exceeds model.max_seq_len={model_cfg.max_seq_len}")
    module = CausalLM(model_cfg.to_dict(), optimizer=instantiate(cfg.optim), scheduler=instantiate(cfg.sched))
    module.tokenizer_json = datamodule.tokenizer.to_str()
    return module
