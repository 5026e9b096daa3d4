"""The explicit attention weights (llm/core/attention_maps.py) are the ones the fused SDPA kernel attends with."""

from __future__ import annotations

import pytest
import torch

from llm.core import lora
from llm.core.attention_maps import attention_weights, capture
from llm.core.model import Transformer
from tests.conftest import debug_model

SHAPES = {  # the debug model is GQA (4 query heads, 2 key/value heads)
    "gqa": dict(),
    "gqa-qk_norm": dict(qk_norm=True),
    "mha-qk_norm": dict(n_kv_heads=4, qk_norm=True),
}


def model_of(seed: int = 0, **overrides) -> Transformer:
    """The debug model with every norm gain randomised (QK-norm's gains at 1 would hide a missing norm)."""
    torch.manual_seed(seed)
    model = Transformer(debug_model(**overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("shape", list(SHAPES))
def test_weights_times_values_through_wo_are_the_layers_output(shape):
    model = model_of(**SHAPES[shape])
    attn, T = model.layers[0].attention, 11
    x = torch.randn(2, T, model.cfg.dim)
    cos, sin = model.rope(start=0, length=T)
    weights = attention_weights(attn, x, cos, sin)  # (B, H, T, T)

    assert weights.shape == (2, model.cfg.n_heads, T, T) and weights.dtype == torch.float32
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, model.cfg.n_heads, T))
    assert (weights.triu(1) == 0).all()  # causal
    _, _, v = attn.qkv(x, cos, sin)  # (B, K, T, D)
    v = v.repeat_interleave(model.cfg.n_heads // v.shape[1], dim=1)  # (B, H, T, D)
    y = (weights @ v).transpose(1, 2).reshape(2 * T, -1)  # (B*T, H*D)
    torch.testing.assert_close(attn.wo(y).view(2, T, -1), attn(x, cos, sin), rtol=1e-5, atol=1e-6)


def test_capture_hooks_every_layer_of_the_real_forward_and_leaves_no_trace():
    model = model_of(qk_norm=True).train()
    tokens = torch.randint(0, model.cfg.vocab_size, (1, 9))
    maps = capture(model, tokens)

    assert len(maps) == model.cfg.n_layers and all(m.shape == (model.cfg.n_heads, 9, 9) for m in maps)
    # layer 1's input is layer 0's output: the hook saw the forward's own activations
    with torch.no_grad():
        cos, sin = model.rope(start=0, length=9)
        h = model.layers[0](model.tok_embeddings(tokens), cos, sin)
        expected = attention_weights(model.layers[1].attention, model.layers[1].attention_norm(h), cos, sin)[0]
    torch.testing.assert_close(maps[1], expected)
    assert model.training and not any(m._forward_hooks for m in model.modules())


def test_capture_runs_blocks_compiled_in_place_eagerly_and_keeps_their_compilation():
    model = model_of()
    for block in model.layers:
        block.compile()  # lazily: nothing is compiled unless a block is called through it
    impls = [block._compiled_call_impl for block in model.layers]
    tokens = torch.randint(0, model.cfg.vocab_size, (1, 5))
    plain = capture(model_of(), tokens)

    for a, b in zip(capture(model, tokens), plain):
        torch.testing.assert_close(a, b)
    assert [block._compiled_call_impl for block in model.layers] == impls


def test_lora_adapters_are_in_the_weights_as_merged_into_q_and_k():
    base = model_of()
    adapted = model_of()
    lora.apply(adapted, lora.LoRAConfig(rank=4, alpha=8.0, targets=("wq", "wk"), dropout=0.1))
    with torch.no_grad():
        for _, layer in lora.layers(adapted):
            layer.lora_b.normal_(0.0, 0.2)  # not zero: an adapter left out would change nothing otherwise
    merged = lora.merge_state(adapted.state_dict(), scale=2.0)
    base.load_state_dict(merged)
    tokens = torch.randint(0, base.cfg.vocab_size, (1, 7))

    for a, b in zip(capture(adapted.train(), tokens), capture(base, tokens)):  # train(): dropout must be off inside
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with lora.disabled(adapted):
        assert not torch.allclose(capture(adapted, tokens)[0], capture(base, tokens)[0], atol=1e-4)
