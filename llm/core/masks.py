"""Attention masks: left padding with a KV cache, packed sequences (dense, or a flex-attention BlockMask on CUDA).

Every mask here is boolean, True where a query may attend to a key; llm/core/model.py turns the dense ones into an
additive float mask once per forward. Shapes: B batch, T queries, S key slots (cached + new).
"""

from __future__ import annotations

import functools

import torch

from llm.core.config import ModelConfig

try:  # PyTorch >= 2.5; used for packed sequences on CUDA only (see FLEX_MIN_LEN)
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
    from torch.utils._triton import has_triton  # flex attention compiles to a Triton kernel
except ImportError:  # pragma: no cover - older torch: packed sequences take the SDPA-with-mask path
    BlockMask = create_block_mask = flex_attention = has_triton = None


def attention_mask(valid: torch.Tensor | None, start: int, T: int, device: torch.device) -> torch.Tensor:
    """Boolean mask (B or 1, 1, T, S=start+T): query at slot start+t sees key slot s if s <= start+t and s is valid.

    A query always sees its own slot, so padding queries (whose outputs are ignored) never get an all-False row,
    which would make softmax return NaN.
    """
    S = start + T
    q_slot = torch.arange(start, S, device=device)[:, None]  # (T, 1)
    k_slot = torch.arange(S, device=device)[None, :]  # (1, S)
    allowed = (k_slot <= q_slot)[None]  # (1, T, S)
    if valid is not None:
        allowed = (allowed & valid[:, None, :S]) | (k_slot == q_slot)  # (B, T, S)
    return allowed.unsqueeze(1)  # (B or 1, 1, T, S)


def segment_mask(segments: torch.Tensor) -> torch.Tensor:
    """Block-diagonal causal boolean mask (B, 1, T, T) of segment ids (B, T): query t sees key s iff s <= t and both
    carry the same id (packed examples, or documents). The diagonal is always True: no row is all-masked."""
    pos = torch.arange(segments.shape[1], device=segments.device)
    same = segments[:, :, None] == segments[:, None, :]  # (B, T, T)
    return ((pos[None, :] <= pos[:, None]) & same).unsqueeze(1)  # causal (T, T) & same -> (B, 1, T, T)


# Packed sequences on CUDA take flex attention from this length on. SDPA with a dense mask cannot use FlashAttention
# (only the memory-efficient and math kernels take a mask), reads a (B, T, T) mask in every layer and computes every
# block of scores; a BlockMask skips the 128 x 128 blocks masked whole, so with examples much shorter than T the work
# grows with the sum of squared example lengths, not T^2. Below ~8 blocks a side few blocks are skipped and the dense
# mask is small: not worth a compiled kernel. An estimate, not measured (no GPU here); the CPU always uses SDPA.
FLEX_MIN_LEN = 1024


def use_flex_attention(device: torch.device, T: int, cfg: ModelConfig, dropout_active: bool) -> bool:
    """Whether packed attention on ``device`` takes flex attention; anything it does not support falls back to SDPA."""
    if flex_attention is None or device.type != "cuda" or T < FLEX_MIN_LEN or dropout_active:  # flex: no dropout
        return False
    D = cfg.head_dim
    return has_triton() and D >= 16 and D & (D - 1) == 0  # the head sizes its kernel handles everywhere


@functools.cache
def compiled_flex_attention():
    """flex_attention compiled once per process (uncompiled, it materialises the full scores)."""
    return torch.compile(flex_attention)


def segment_block_mask(segments: torch.Tensor) -> BlockMask:
    """The flex-attention BlockMask of segment_mask (same rule), shared by every head and layer."""
    B, T = segments.shape

    def block_causal(b, h, q, k):
        return (k <= q) & (segments[b, q] == segments[b, k])

    return create_block_mask(block_causal, B, None, T, T, device=segments.device)
