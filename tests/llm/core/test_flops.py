"""Analytic parameter counts equal the built model's, for every named size; FLOPs follow the documented formula."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from llm.core.config import ModelConfig
from llm.core.flops import attention_flops_per_token, count_params, flops_per_token, matmul_params, norm_params
from llm.core.memory import Plan
from llm.core.model import Transformer

MODEL_CONF = Path(__file__).resolve().parents[3] / "conf" / "model"
SIZES = sorted(p.stem for p in MODEL_CONF.glob("*.yaml"))
EXPECTED = {"7b": 6_738_415_616, "13b": 13_015_864_320, "1b": 1_235_814_400}


def load_size(name: str) -> ModelConfig:
    node = OmegaConf.to_container(OmegaConf.load(MODEL_CONF / f"{name}.yaml"))
    node.pop("defaults", None)  # the Hydra schema entry, not a field
    assert node.pop("_target_") == "llm.core.config.ModelConfig"
    cfg = ModelConfig(**node)
    return cfg if cfg.vocab_size is not None else cfg.with_vocab(32000)


def test_every_size_is_tested():
    assert {"tiny", "small", "1b", "7b", "13b"} <= set(SIZES)


@pytest.mark.parametrize("name", SIZES)
def test_count_params_matches_model(name):
    cfg = load_size(name)
    with torch.device("meta"):
        model = Transformer(cfg)
    assert sum(p.numel() for p in model.parameters()) == count_params(cfg)
    if name in EXPECTED:
        assert count_params(cfg) == EXPECTED[name]
    non_embedding = sum(
        p.numel() for n, p in model.named_parameters() if not n.startswith(("tok_embeddings", "output"))
    )
    assert count_params(cfg, embedding=False) == non_embedding


def test_flops_per_token_formula():
    cfg = load_size("7b")
    n = count_params(cfg, embedding=False) + 32000 * 4096  # the output head is a matmul
    assert matmul_params(cfg) == n
    assert attention_flops_per_token(cfg, 4096) == 12 * 32 * 4096 * 4096
    assert flops_per_token(cfg, 4096) == 6 * n + 12 * 32 * 4096 * 4096
    # Tying does not change the work: the head matmul is done either way.
    tied = ModelConfig(**{**cfg.to_dict(), "tie_embeddings": True})
    assert flops_per_token(tied, 4096) == flops_per_token(cfg, 4096)
    assert count_params(tied) == count_params(cfg) - 32000 * 4096


def test_counts_need_a_vocab():
    with pytest.raises(ValueError, match="model.vocab_size"):
        count_params(ModelConfig(dim=64, n_layers=1, n_heads=4))


@pytest.mark.parametrize("name", SIZES)
def test_qk_norm_gains_are_counted(name):
    """qk_norm adds a gain of head_dim for queries and one for keys per block: the counts and the planner see them."""
    cfg = ModelConfig(**{**load_size(name).to_dict(), "qk_norm": True})
    with torch.device("meta"):
        model = Transformer(cfg)
    params = dict(model.named_parameters())
    assert sum(p.numel() for p in params.values()) == count_params(cfg) == Plan(model=cfg, seq_len=8).params
    assert count_params(cfg) == count_params(load_size(name)) + 2 * cfg.n_layers * cfg.head_dim
    assert norm_params(cfg) == sum(p.numel() for n, p in params.items() if n.endswith("norm.weight"))
    # autocast's 16-bit copies are of the matrices, never of a gain
    matrices = sum(
        p.numel() for n, p in params.items() if p.ndim == 2 and (cfg.tie_embeddings or n != "tok_embeddings.weight")
    )
    assert Plan(model=cfg, precision="bf16-mixed", seq_len=8).buffers == 2 * matrices
