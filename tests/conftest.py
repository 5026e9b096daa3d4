"""Shared fixtures: compose the real config from conf/ with CPU-sized overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict

from llm.app import schema
from llm.core.config import ModelConfig

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
CORPORA = ROOT.parent / "shared" / "corpora"

# The debug model (torchtitan's habit): the one small shape the tests share. A test that needs another shape names
# the fields that differ: debug_model(tie_embeddings=True), debug_model(vocab_size=320).
DEBUG_MODEL = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=256, max_seq_len=64)
ARCHITECTURE = ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim")  # what TINY sets; the vocabulary follows data


def debug_model(**overrides) -> ModelConfig:
    return ModelConfig(**{**DEBUG_MODEL, **overrides})


# A run that takes seconds: the debug model's architecture, short sequences, a handful of steps.
TINY = [
    *(f"model.{key}={DEBUG_MODEL[key]}" for key in ARCHITECTURE),
    "data.seq_len=32",
    "data.batch_size=4",
    "data.vocab_size=512",
    "trainer.accelerator=cpu",
    "trainer.max_steps=6",
    "trainer.val_check_interval=3",
    "trainer.limit_val_batches=2",
    "trainer.log_every_n_steps=1",
    "sched.warmup_steps=2",
    "callbacks.progress_bar=null",
    "callbacks.samples.max_new_tokens=4",
    # the recipe the tests were written for (AdamW, cosine, today's defaults), pinned: its float32 sums make 2
    # processes equal 1 to 1e-4 (Muon's bfloat16 orthogonalisation does not: tests/test_muon.py)
    "optim=adamw",
    "sched=cosine",
    "model.qk_norm=false",
]


def compose_config(overrides: list[str], run_dir: Path | None = None, cache_dir: Path | None = None) -> DictConfig:
    """The config `python train.py *overrides` would get, with run_dir (and the data cache) set."""
    schema.register()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    with open_dict(cfg):
        if run_dir is not None:
            cfg.run_dir = str(run_dir)
        if cache_dir is not None and "cache_dir" in cfg.data:
            cfg.data.cache_dir = str(cache_dir)
    return cfg


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    """One data cache for the session: the embedded corpus is prepared once, then reused."""
    return tmp_path_factory.mktemp("data-cache")


@pytest.fixture
def tiny_cfg(tmp_path, data_cache):
    def make(*extra: str) -> DictConfig:
        return compose_config([*TINY, *extra], run_dir=tmp_path / "run", cache_dir=data_cache)

    return make


@pytest.fixture(scope="session")
def chat_checkpoint(tmp_path_factory, data_cache) -> Path:
    """A finetuned (SFT) tiny model with its chat template, tokenizer and run directory: what chat, serve and
    human evaluation are given. A few steps of pretraining, then a few of finetuning on the embedded SFT set."""
    import train

    root = tmp_path_factory.mktemp("chat-model")
    train.train(compose_config(TINY, run_dir=root / "pretrain", cache_dir=data_cache))
    run = [o for o in TINY if not o.startswith(("model.", "data."))]
    pretrained = root / "pretrain" / "checkpoints" / "last.ckpt"
    overrides = ["experiment=finetune", f"init_from={pretrained}", *run, "data.seq_len=128", "data.batch_size=4"]
    train.train(compose_config(overrides, run_dir=root / "sft", cache_dir=data_cache))
    return root / "sft" / "checkpoints" / "last.ckpt"
