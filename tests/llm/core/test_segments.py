"""Packed sequences (`segments`): block-diagonal causal attention makes each example's outputs, and gradients, those
of the example run alone; padding gets a segment of its own; flex attention (CUDA) agrees with SDPA-with-mask."""

from __future__ import annotations

import pytest
import torch

from llm.core import masks
from llm.core.masks import segment_mask
from llm.core.model import Transformer
from tests.conftest import debug_model

LENGTHS = [[7, 12, 3, 9], [20, 5]]  # two packed rows; the second ends with 6 padding tokens (T = 31)


def build(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(debug_model(**overrides)).eval()


def packed_batch(lengths: list[list[int]], vocab: int = 256, pad_id: int = 0, seed: int = 1):
    """Examples (token tensors) and the packed (B, T) tokens, positions and segments, padding its own segment."""
    g = torch.Generator().manual_seed(seed)
    T = max(sum(row) for row in lengths)
    examples = [[torch.randint(1, vocab, (n,), generator=g) for n in row] for row in lengths]
    tokens = torch.full((len(lengths), T), pad_id)
    positions = torch.zeros(len(lengths), T, dtype=torch.long)
    segments = torch.zeros(len(lengths), T, dtype=torch.long)
    for b, row in enumerate(examples):
        at = 0
        for s, ex in enumerate(row):
            tokens[b, at : at + len(ex)], positions[b, at : at + len(ex)] = ex, torch.arange(len(ex))
            segments[b, at : at + len(ex)] = s
            at += len(ex)
        segments[b, at:] = len(row)
    return examples, tokens, positions, segments


def spans(lengths: list[list[int]]):
    """(row, start, end) of each example, in order."""
    for b, row in enumerate(lengths):
        at = 0
        for n in row:
            yield b, at, at + n
            at += n


SHAPES = {"mha": dict(n_kv_heads=4), "gqa": dict(n_kv_heads=2), "gqa-qk-norm": dict(n_kv_heads=2, qk_norm=True)}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_packed_forward_equals_each_example_alone(shape):
    model = build(**SHAPES[shape])
    examples, tokens, positions, segments = packed_batch(LENGTHS)
    with torch.no_grad():
        packed = model(tokens, input_pos=positions, segments=segments)  # (B, T, V)
        alone = [model(ex[None])[0] for row in examples for ex in row]
    for (b, start, end), expected in zip(spans(LENGTHS), alone, strict=True):
        torch.testing.assert_close(packed[b, start:end], expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_packed_gradients_equal_the_sum_over_examples(shape):
    """A loss summed over the packed batch has the gradients of the same loss summed over the examples run alone."""
    examples, tokens, positions, segments = packed_batch(LENGTHS)
    weights = torch.randn(tokens.shape + (256,), generator=torch.Generator().manual_seed(2))

    packed_model, alone_model = build(**SHAPES[shape]), build(**SHAPES[shape])
    out = packed_model(tokens, input_pos=positions, segments=segments)
    real = torch.zeros(tokens.shape, dtype=torch.bool)
    for b, start, end in spans(LENGTHS):
        real[b, start:end] = True
    (out * weights)[real].sum().backward()
    total = sum(
        (alone_model(ex[None])[0] * weights[b, start:end]).sum()
        for (b, start, end), ex in zip(spans(LENGTHS), [ex for row in examples for ex in row], strict=True)
    )
    total.backward()
    for (name, p), q in zip(packed_model.named_parameters(), alone_model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_padding_sees_only_padding_and_nothing_is_nan():
    model = build()
    examples, tokens, positions, segments = packed_batch(LENGTHS)
    changed = tokens.clone()
    changed[1, :25] = (changed[1, :25] + 1) % 256  # every real token of row 1
    with torch.no_grad():
        a = model(tokens, input_pos=positions, segments=segments)
        b = model(changed, input_pos=positions, segments=segments)
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a[1, 25:], b[1, 25:], rtol=0, atol=0)  # the padding's outputs: unchanged
    mask = segment_mask(segments)
    assert mask.shape == (2, 1, 31, 31) and mask.diagonal(dim1=-2, dim2=-1).all()  # a query always sees itself


def test_segments_refuse_cache_mask_and_bad_shapes():
    model = build()
    _, tokens, positions, segments = packed_batch(LENGTHS)
    with pytest.raises(ValueError, match="kv_cache or mask"):
        model(tokens, segments=segments, kv_cache=model.new_kv_cache(2))
    with pytest.raises(ValueError, match="kv_cache or mask"):
        model(tokens, segments=segments, mask=torch.ones(tokens.shape, dtype=torch.bool))
    with pytest.raises(ValueError, match="integer ids"):
        model(tokens, segments=segments[:, :-1])
    with pytest.raises(ValueError, match="integer ids"):
        model(tokens, segments=segments.float())


def test_one_segment_is_plain_causal_attention():
    model = build()
    tokens = torch.randint(0, 256, (2, 17))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens, segments=torch.zeros_like(tokens)), model(tokens), rtol=0, atol=1e-5)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_block_mask_matches_the_dense_mask_on_cpu(monkeypatch):
    """The BlockMask branch, forced on the CPU with eager flex attention (forward only: it has no CPU backward)."""
    if masks.flex_attention is None:
        pytest.skip("no flex attention in this torch")
    model = build(n_kv_heads=2)
    _, tokens, positions, segments = packed_batch(LENGTHS)
    with torch.no_grad():
        dense = model(tokens, input_pos=positions, segments=segments)
        monkeypatch.setattr(masks, "use_flex_attention", lambda *args, **kwargs: True)
        monkeypatch.setattr(masks, "compiled_flex_attention", lambda: masks.flex_attention)
        flex = model(tokens, input_pos=positions, segments=segments)
    torch.testing.assert_close(flex, dense, rtol=0, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flex attention's kernel needs CUDA")
def test_flex_attention_matches_sdpa_on_cuda(monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # float32 matmuls on both sides
    model = build(n_kv_heads=2, max_seq_len=masks.FLEX_MIN_LEN).cuda().train()
    lengths = [[300, 100, 500, 124], [1000, 24]]  # T = FLEX_MIN_LEN = 1024
    _, tokens, positions, segments = (t.cuda() if torch.is_tensor(t) else t for t in packed_batch(lengths))
    assert masks.use_flex_attention(tokens.device, tokens.shape[1], model.cfg, dropout_active=False)

    def run():
        model.zero_grad()
        out = model(tokens, input_pos=positions, segments=segments)
        out.float().square().mean().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()]

    flex_out, flex_grads = run()
    monkeypatch.setattr(masks, "use_flex_attention", lambda *args, **kwargs: False)
    sdpa_out, sdpa_grads = run()
    torch.testing.assert_close(flex_out, sdpa_out, rtol=1e-4, atol=1e-4)
    for a, b in zip(flex_grads, sdpa_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
