"""ModelConfig: derived fields, validation errors that name the field, vocab padding, dict round trip."""

from __future__ import annotations

import pytest

from llm.core.config import ModelConfig, pad_vocab


def test_derived_fields():
    cfg = ModelConfig(dim=4096, n_layers=32, n_heads=32)
    assert cfg.n_kv_heads == 32
    assert cfg.head_dim == 128
    assert cfg.ffn_dim == 11008  # Llama-2-7B: int(2 * 4 * 4096 / 3) = 10922 rounded up to 256
    assert ModelConfig(dim=4096, n_layers=1, n_heads=32, ffn_dim_multiplier=1.3, multiple_of=1024).ffn_dim == 14336
    assert ModelConfig(dim=64, n_layers=1, n_heads=4, ffn_dim=100).ffn_dim == 100


@pytest.mark.parametrize(
    ("fields", "names"),
    [
        ({"dim": 65, "n_heads": 4}, "model.dim"),
        ({"dim": 64, "n_heads": 4, "n_kv_heads": 3}, "model.n_kv_heads"),
        ({"dim": 12, "n_heads": 4}, "head_dim"),
        ({"dim": 0}, "model.dim"),
        ({"n_layers": 0}, "model.n_layers"),
        ({"n_heads": -1}, "model.n_heads"),
        ({"ffn_dim": 0}, "model.ffn_dim"),
        ({"vocab_size": 0}, "model.vocab_size"),
        ({"max_seq_len": 0}, "model.max_seq_len"),
        ({"dropout": 1.0}, "model.dropout"),
        ({"dropout": -0.1}, "model.dropout"),
        ({"rope_theta": 0.0}, "model.rope_theta"),
        ({"norm_eps": 0.0}, "model.norm_eps"),
        ({"qk_norm": "yes"}, "model.qk_norm"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "model.rope_scaling"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "model.rope_scaling.*missing.*low_freq_factor"),
    ],
)
def test_validation_names_the_field(fields, names):
    base = {"dim": 64, "n_layers": 2, "n_heads": 4}
    with pytest.raises(ValueError, match=names):
        ModelConfig(**{**base, **fields})


def test_rope_scaling_accepts_old_key_and_mappings():
    scaling = {"type": "llama3", "factor": 8, "low_freq_factor": 1, "high_freq_factor": 4}
    scaling["original_max_position_embeddings"] = 8192
    cfg = ModelConfig(dim=64, n_layers=1, n_heads=4, rope_scaling=scaling)
    assert type(cfg.rope_scaling) is dict and cfg.rope_scaling["factor"] == 8
    with pytest.raises(ValueError, match="unknown keys: beta"):
        ModelConfig(dim=64, n_layers=1, n_heads=4, rope_scaling={**scaling, "beta": 1})


def test_pad_vocab():
    assert pad_vocab(50257) == 50304
    assert pad_vocab(64) == 64
    assert pad_vocab(1, multiple=8) == 8


def test_with_vocab():
    cfg = ModelConfig(dim=64, n_layers=1, n_heads=4)
    sized = cfg.with_vocab(1000)
    assert sized.vocab_size == 1024 and cfg.vocab_size is None
    assert sized.with_vocab(1024).vocab_size == 1024  # a set vocab is kept, not re-padded
    with pytest.raises(ValueError, match="model.vocab_size"):
        sized.with_vocab(1025)


def test_dict_round_trip_and_unknown_keys():
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, tie_embeddings=True)
    cfg.rope_scaling = None
    d = cfg.to_dict()
    assert ModelConfig.from_dict(d) == cfg
    with pytest.raises(ValueError, match="dmi, n_layer"):
        ModelConfig.from_dict({**d, "dmi": 3, "n_layer": 2})


def test_qk_norm_is_off_by_default_and_in_the_dict():
    """A checkpoint saved before qk_norm existed has no such key: it reads as the Llama it was."""
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, vocab_size=128, qk_norm=True)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg and cfg.to_dict()["qk_norm"] is True
    old = {k: v for k, v in cfg.to_dict().items() if k != "qk_norm"}
    assert ModelConfig.from_dict(old).qk_norm is False
