"""The Transformer on a tiny debug shape: causality, shapes, weight tying, meta init, KV-cache generation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llm.core import model as model_lib
from llm.core.config import ModelConfig
from llm.core.model import KVCache, Transformer
from tests.conftest import debug_model


def debug_config(**overrides) -> ModelConfig:
    return debug_model(**{"ffn_dim": 96, "vocab_size": 128, **overrides})


def build(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(debug_config(**overrides)).eval()


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_shapes(n_kv_heads):
    model = build(n_kv_heads=n_kv_heads)
    tokens = torch.randint(0, 128, (3, 11))
    assert model(tokens).shape == (3, 11, 128)
    assert model.hidden(tokens).shape == (3, 11, 64)
    assert model.layers[0].attention.wk.weight.shape == (n_kv_heads * 16, 64)


@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_causal(n_kv_heads):
    model = build(n_kv_heads=n_kv_heads)
    tokens = torch.randint(0, 128, (2, 16))
    changed = tokens.clone()
    changed[:, 9] = (changed[:, 9] + 1) % 128
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :9], b[:, :9])
    assert not torch.allclose(a[:, 9:], b[:, 9:])


def test_tied_weights_are_one_parameter():
    model = build(tie_embeddings=True)
    assert model.output.weight is model.tok_embeddings.weight
    n_params = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        model.tok_embeddings.weight[3, 5] = 7.0
    assert model.output.weight[3, 5] == 7.0
    untied = build(tie_embeddings=False)
    assert untied.output.weight is not untied.tok_embeddings.weight
    assert sum(p.numel() for p in untied.parameters()) == n_params + 128 * 64


def test_dropout_zero_is_deterministic_in_train_mode():
    model = build(dropout=0.0).train()
    tokens = torch.randint(0, 128, (2, 12))
    torch.testing.assert_close(model(tokens), model(tokens), rtol=0, atol=0)


def test_dropout_is_active_in_train_mode_only():
    model = build(dropout=0.5)
    tokens = torch.randint(0, 128, (2, 12))
    torch.testing.assert_close(model(tokens), model(tokens))  # eval
    model.train()
    assert not torch.allclose(model(tokens), model(tokens))


def test_init_scales_residual_projections():
    model = build(n_layers=8, dim=256, n_heads=4, n_kv_heads=4, ffn_dim=512)
    attn, ff = model.layers[0].attention, model.layers[0].feed_forward
    assert attn.wq.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.tok_embeddings.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert attn.wo.weight.std().item() == pytest.approx(0.02 / 4, rel=0.05)  # 1 / sqrt(2 * 8)
    assert ff.w2.weight.std().item() == pytest.approx(0.02 / 4, rel=0.05)
    assert torch.equal(model.norm.weight, torch.ones(256))


@pytest.mark.parametrize("tie", [True, False])
def test_meta_build_then_materialise(tie):
    cfg = debug_config(tie_embeddings=tie, rope_theta=5e5, rope_scaling=_LLAMA3_SCALING)
    with torch.device("meta"):
        model = Transformer(cfg)
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    # What Lightning does: reset_parameters() on every module that holds tensors.
    for module in model.modules():
        if any(True for _ in [*module.parameters(recurse=False), *module.buffers(recurse=False)]):
            module.reset_parameters()
    assert (model.output.weight is model.tok_embeddings.weight) == tie

    torch.manual_seed(0)
    reference = Transformer(cfg).eval()
    torch.testing.assert_close(model.rope.cos, reference.rope.cos, rtol=0, atol=0)
    torch.testing.assert_close(model.rope.sin, reference.rope.sin, rtol=0, atol=0)
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters(), strict=True):
        assert p.std().item() == pytest.approx(q.std().item(), rel=0.2, abs=1e-6), name
    logits = model.eval()(torch.randint(0, 128, (2, 10)))
    assert torch.isfinite(logits).all()
    assert logits.std().item() == pytest.approx(reference(torch.randint(0, 128, (2, 10))).std().item(), rel=0.3)


def test_init_weights_reinitialises_everything():
    model = build(tie_embeddings=True)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(3.0)
        model.rope.cos.zero_()
    model.init_weights()
    assert model.output.weight is model.tok_embeddings.weight
    assert torch.equal(model.norm.weight, torch.ones(64))
    assert model.layers[1].attention.wq.weight.std().item() == pytest.approx(0.02, rel=0.2)
    assert model.rope.cos[0].eq(1).all()


_LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}


def greedy_with_cache(model: Transformer, prompts: torch.Tensor, valid: torch.Tensor, n_new: int) -> torch.Tensor:
    """Greedy decoding with a KVCache, exactly as the KVCache docstring says; returns the step logits (B, n, V)."""
    B, T0 = prompts.shape
    cache = model.new_kv_cache(B, max_len=T0 + n_new)
    pos = (valid.long().cumsum(-1) - 1).clamp(min=0)
    logits = model(prompts, input_pos=pos, mask=valid, kv_cache=cache)
    steps = [logits[:, -1]]
    for _ in range(n_new - 1):
        next_tok = logits[:, -1].argmax(-1, keepdim=True)
        valid = torch.cat([valid, valid.new_ones(B, 1)], dim=1)
        pos = pos[:, -1:] + 1
        logits = model(next_tok, input_pos=pos, mask=valid, kv_cache=cache)
        steps.append(logits[:, -1])
    assert cache.length == T0 + n_new - 1
    return torch.stack(steps, dim=1)


def greedy_by_recomputation(model: Transformer, prompt: torch.Tensor, n_new: int) -> torch.Tensor:
    """The same greedy decoding, re-running the whole sequence every step with no cache; prompt (T,)."""
    seq, steps = prompt[None], []
    for _ in range(n_new):
        last = model(seq)[:, -1]
        steps.append(last)
        seq = torch.cat([seq, last.argmax(-1, keepdim=True)], dim=1)
    return torch.cat(steps, dim=0)  # (n_new, V)


@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_kv_cache_matches_recomputation(n_kv_heads):
    model = build(n_kv_heads=n_kv_heads, rope_scaling=_LLAMA3_SCALING)
    prompt = torch.randint(0, 128, (7,))
    with torch.no_grad():
        cached = greedy_with_cache(model, prompt[None], torch.ones(1, 7, dtype=torch.bool), n_new=6)[0]
        full = greedy_by_recomputation(model, prompt, n_new=6)
    torch.testing.assert_close(cached, full)


def test_kv_cache_without_mask_or_positions():
    model = build()
    tokens = torch.randint(0, 128, (2, 9))
    cache = model.new_kv_cache(2)
    with torch.no_grad():
        full = model(tokens)
        prefill = model(tokens[:, :5], kv_cache=cache)
        steps = [model(tokens[:, t : t + 1], kv_cache=cache) for t in range(5, 9)]
    torch.testing.assert_close(torch.cat([prefill, *steps], dim=1), full)
    cache.reset()
    with torch.no_grad():
        torch.testing.assert_close(model(tokens, kv_cache=cache), full)


def test_left_padded_batch_matches_each_prompt_alone():
    model = build(n_kv_heads=2)
    long_prompt, short_prompt = torch.randint(0, 128, (8,)), torch.randint(0, 128, (5,))
    pad = 0
    prompts = torch.stack([long_prompt, torch.cat([torch.full((3,), pad), short_prompt])])
    valid = torch.ones(2, 8, dtype=torch.bool)
    valid[1, :3] = False
    with torch.no_grad():
        batched = greedy_with_cache(model, prompts, valid, n_new=5)
        alone = [greedy_by_recomputation(model, p, n_new=5) for p in (long_prompt, short_prompt)]
        alone_cached = greedy_with_cache(model, short_prompt[None], torch.ones(1, 5, dtype=torch.bool), 5)[0]
    torch.testing.assert_close(batched[0], alone[0])
    torch.testing.assert_close(batched[1], alone[1])
    torch.testing.assert_close(alone_cached, alone[1])


def test_padding_mask_without_cache():
    model = build()
    prompt = torch.randint(0, 128, (6,))
    tokens = torch.cat([torch.zeros(2, dtype=torch.long), prompt])[None]
    valid = torch.tensor([[False, False] + [True] * 6])
    with torch.no_grad():
        padded = model(tokens, input_pos=(valid.long().cumsum(-1) - 1).clamp(min=0), mask=valid)
        alone = model(prompt[None])
    assert torch.isfinite(padded).all()
    torch.testing.assert_close(padded[:, 2:], alone)


def test_kv_cache_errors():
    model = build()
    cache = model.new_kv_cache(1, max_len=4)
    with torch.no_grad():
        model(torch.zeros(1, 4, dtype=torch.long), kv_cache=cache)
        with pytest.raises(ValueError, match="full"):
            model(torch.zeros(1, 1, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match="max_seq_len"):
        KVCache(model.cfg, 1, max_len=65)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="vocab_size"):
        Transformer(debug_config(vocab_size=None))


def test_backward_reaches_every_parameter():
    model = build(tie_embeddings=True).train()
    tokens = torch.randint(0, 128, (2, 10))
    model(tokens).logsumexp(-1).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


# --------------------------------------------------------------------------------------------------------- QK-norm


def randomise_norms(model: Transformer) -> Transformer:
    """Norm gains start at ones; random ones make a skipped or misplaced gain show in the outputs."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def test_qk_norm_adds_one_gain_per_head_dim_and_changes_outputs():
    plain, normed = build(), build(qk_norm=True)  # one seed: the same projections (the gains draw nothing)
    shapes = {n: tuple(p.shape) for n, p in normed.named_parameters()}
    added = {n: s for n, s in shapes.items() if n not in dict(plain.named_parameters())}
    assert added == {f"layers.{i}.attention.{qk}_norm.weight": (16,) for i in range(2) for qk in "qk"}
    assert plain.layers[0].attention.q_norm is None
    missing = normed.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert set(missing) == set(added)
    tokens = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        assert (normed(tokens) - plain(tokens)).abs().max() > 1e-3


def test_qk_norm_makes_attention_blind_to_the_scale_of_wq_and_wk():
    """Why it is there: each head's query and key are normalised, so scaling wq and wk leaves the logits as they are
    (eps is tiny here so that it does not count), where the plain model's attention sharpens."""
    tokens = torch.randint(0, 128, (2, 12))
    for qk_norm in (True, False):
        model = build(qk_norm=qk_norm, norm_eps=1e-10)
        with torch.no_grad():
            before = model(tokens)
            for layer in model.layers:
                layer.attention.wq.weight.mul_(30.0)
                layer.attention.wk.weight.mul_(3.0)
            after = model(tokens)
        if qk_norm:
            torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)
        else:
            assert (after - before).abs().max() > 1e-2


def test_qk_norm_kv_cache_and_left_padding_match_recomputation():
    model = randomise_norms(build(qk_norm=True, n_kv_heads=2, rope_scaling=_LLAMA3_SCALING))
    long_prompt, short_prompt = torch.randint(0, 128, (8,)), torch.randint(0, 128, (5,))
    prompts = torch.stack([long_prompt, torch.cat([torch.zeros(3, dtype=torch.long), short_prompt])])
    valid = torch.ones(2, 8, dtype=torch.bool)
    valid[1, :3] = False
    with torch.no_grad():
        batched = greedy_with_cache(model, prompts, valid, n_new=6)
        alone = [greedy_by_recomputation(model, p, n_new=6) for p in (long_prompt, short_prompt)]
    torch.testing.assert_close(batched[0], alone[0])
    torch.testing.assert_close(batched[1], alone[1])


def test_qk_norm_compiles_into_one_graph_with_the_same_outputs_and_gradients():
    """model.compile compiles each block (llm/training/parallelize.py); aot_eager traces forward and backward as
    inductor would, without generating code (seconds, not a minute, on the CPU)."""
    eager = randomise_norms(build(qk_norm=True)).train()
    compiled = randomise_norms(build(qk_norm=True)).train()
    for block in compiled.layers:
        block.compile(backend="aot_eager", fullgraph=True)
    tokens = torch.randint(0, 128, (2, 12))
    for model in (eager, compiled):
        model(tokens).logsumexp(-1).mean().backward()
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)
    assert compiled.layers[0].attention.q_norm.weight.grad.abs().sum() > 0


def test_cpu_bf16_attention_computes_in_float32_but_decoding_keeps_bf16(monkeypatch):
    """Under CPU bf16 autocast SDPA gets float32 q, k, v (autocast paused), except with a KV cache; packed
    sequences' mask follows; the output returns in bf16 either way."""
    assert model_lib.attention_dtype("cpu", torch.bfloat16, cached=False) == torch.float32
    assert model_lib.attention_dtype("cpu", torch.bfloat16, cached=True) == torch.bfloat16
    assert model_lib.attention_dtype("cuda", torch.bfloat16, cached=False) == torch.bfloat16
    assert model_lib.attention_dtype("cpu", torch.float32, cached=False) == torch.float32
    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        seen.append((q.dtype, None if attn_mask is None else attn_mask.dtype))
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(model_lib.F, "scaled_dot_product_attention", spy)
    m = build(n_layers=1)
    tokens = torch.randint(0, m.cfg.vocab_size, (2, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(tokens)
        m(tokens, segments=torch.tensor([[0] * 4 + [1] * 4] * 2))
        cache = KVCache(m.cfg, batch_size=2, max_len=9, dtype=torch.bfloat16)
        m(tokens, kv_cache=cache)
    assert seen == [(torch.float32, None), (torch.float32, torch.float32), (torch.bfloat16, None)]
    assert out.dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the same values as float32 SDPA on bf16 inputs
        torch.testing.assert_close(out.float(), m(tokens).float())
