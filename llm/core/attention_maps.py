"""Attention weights made visible: softmax(q k^T / sqrt(D)) of every head of every layer, for one short prompt.

Training and generation use the fused SDPA kernel, which never materialises the weights. Here the model runs its
ordinary forward on the prompt while a forward hook on each Attention recomputes, from that layer's own input, the
q and k it attended with (``Attention.qkv``: the projections with any LoRA adapters in them, QK-norm, RoPE) and
from them the weights, explicitly. Running the real forward, rather than a copy of the block loop, keeps every
wrapper working: FSDP2 gathers each block's weights in its pre-forward hook as usual (so under FSDP every rank
must call :func:`capture`), activation checkpointing and DDP change nothing, and a block compiled in place is run
eagerly for this one call (its graph is neither traced with the hooks nor recompiled).

Shapes: H query heads, K key/value heads, T prompt tokens, D head_dim.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn as nn

from llm.core.model import Attention


def weights_from(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """q (B, H, T, D), k (B, K, T, D) -> causal attention weights (B, H, T, T) in float32, each row summing to 1.

    Query head h reads key head h // (H / K) (grouped-query attention, as SDPA's enable_gqa and HF's repeat_kv)."""
    H, K, T, D = q.shape[1], k.shape[1], q.shape[2], q.shape[3]
    k = k.repeat_interleave(H // K, dim=1)  # (B, H, T, D)
    scores = q.float() @ k.float().transpose(-1, -2) / math.sqrt(D)  # (B, H, T, T)
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)  # a query sees its own and earlier tokens
    return scores.masked_fill(future, float("-inf")).softmax(dim=-1)


def attention_weights(attn: Attention, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The weights (B, H, T, T) of ``attn`` on its input x (B, T, C) (after the block's attention_norm)."""
    q, k, _ = attn.qkv(x, cos, sin)
    return weights_from(q, k)


@contextmanager
def _eager(model: nn.Module) -> Iterator[None]:
    """Modules compiled in place (``module.compile()``, llm/training/parallelize.py) run uncompiled inside."""
    compiled = [(m, m._compiled_call_impl) for m in model.modules() if getattr(m, "_compiled_call_impl", None)]
    for m, _ in compiled:
        m._compiled_call_impl = None
    try:
        yield
    finally:
        for m, impl in compiled:
            m._compiled_call_impl = impl


@torch.no_grad()
def capture(model: nn.Module, tokens: torch.Tensor) -> list[torch.Tensor]:
    """tokens (1, T) on the model's device -> the weights (H, T, T) of each layer, in order, float32 on the CPU.

    Runs ``model(tokens)`` once in eval mode (no dropout; the mode is restored). Under FSDP every rank must call it
    (the forward gathers weights); under tensor parallelism each rank sees its own heads only."""
    attentions = [m for m in model.modules() if isinstance(m, Attention)]
    found: list[torch.Tensor | None] = [None] * len(attentions)

    def hook(i: int):
        def record(module: Attention, args: tuple, kwargs: dict[str, Any], output: torch.Tensor) -> None:
            # Block calls attention(x, cos, sin, mask, cache, start): the layer's input as it computed with it
            x, cos, sin = (args[j] if j < len(args) else kwargs[name] for j, name in enumerate(("x", "cos", "sin")))
            found[i] = attention_weights(module, x, cos, sin)[0].cpu()

        return record

    handles = [m.register_forward_hook(hook(i), with_kwargs=True) for i, m in enumerate(attentions)]
    was_training = model.training
    model.eval()
    try:
        with _eager(model):
            model(tokens)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return [w for w in found if w is not None]
