"""Logits parity with Hugging Face's LlamaForCausalLM on tiny random models (float32, CPU).

The weights are renamed with llm/convert.py's mapping, so this also checks that mapping.
"""

from __future__ import annotations

import pytest
import torch

from llm.convert import from_hf_name
from llm.core.config import ModelConfig
from llm.core.model import Transformer, rope_inv_freq
from tests.conftest import debug_model

transformers = pytest.importorskip("transformers")
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402


def hf_model(cfg: ModelConfig):
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        rope = {**cfg.rope_scaling, "rope_theta": cfg.rope_theta}
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.dim,
        intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        rope_parameters=rope,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(hf_cfg).eval()
    with torch.no_grad():  # HF initialises norms to ones; randomise them so the test sees them
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def load_from_hf(cfg: ModelConfig, hf) -> Transformer:
    torch.manual_seed(1)
    ours = Transformer(cfg).eval()
    state = {from_hf_name(k): v for k, v in hf.state_dict().items()}
    if cfg.tie_embeddings:
        state.pop("output.weight", None)
        assert hf.lm_head.weight is hf.model.embed_tokens.weight
    missing, unexpected = ours.load_state_dict(state, strict=False)
    assert not unexpected
    assert missing == (["output.weight"] if cfg.tie_embeddings else [])
    return ours


LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,  # small, so the test's positions cross every band
}
CASES = {
    "mha": dict(n_heads=4, n_kv_heads=4),
    "gqa": dict(n_heads=4, n_kv_heads=2),
    "mqa-tied": dict(n_heads=4, n_kv_heads=1, tie_embeddings=True),
    "untied-theta": dict(rope_theta=500000.0),
    "tied-theta": dict(rope_theta=1234.0, tie_embeddings=True),
    "llama3-scaling": dict(rope_theta=500000.0, rope_scaling=LLAMA3, n_kv_heads=2, tie_embeddings=True),
    "eps": dict(norm_eps=1e-6, n_heads=8, n_kv_heads=2),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("shape", [(1, 17), (3, 32)], ids=["odd-T", "batch"])
def test_logits_match_hf(case, shape):
    # multi-head attention unless the case asks for grouped queries; an odd ffn_dim and vocabulary
    cfg = debug_model(**{"n_kv_heads": None, "ffn_dim": 176, "vocab_size": 160, **CASES[case]})
    hf = hf_model(cfg)
    ours = load_from_hf(cfg, hf)
    tokens = torch.randint(0, cfg.vocab_size, shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = hf(tokens).logits
        actual = ours(tokens)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_rope_frequencies_match_hf_llama3():
    """Llama-3.2-1B's scaling (head_dim 64): every band of the interpolation is exercised."""
    scaling = {**LLAMA3, "factor": 32.0, "original_max_position_embeddings": 8192}
    hf_cfg = transformers.LlamaConfig(
        hidden_size=2048, num_attention_heads=32, rope_parameters={**scaling, "rope_theta": 500000.0}
    )
    hf_inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg)
    ours = rope_inv_freq(64, 500000.0, scaling)
    torch.testing.assert_close(ours, hf_inv_freq, rtol=0, atol=0)
    plain = rope_inv_freq(64, 500000.0)
    assert (ours == plain).any() and (ours == plain / 32).any() and ((ours != plain) & (ours != plain / 32)).any()
