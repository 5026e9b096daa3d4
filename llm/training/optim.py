"""How the optimizer is set up for a Transformer: which weights decay, and when the fused kernel is used."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on the weight matrices of attention and MLP only.

    Norm gains and biases are not decayed (pulling a gain towards 0 changes what the layer computes, not
    its complexity). The token embedding is not decayed either: decoupled decay shrinks every row at every
    step, while a rare token's row only receives gradient when the token occurs, so decay would steadily
    erase rare tokens (OLMo 2 drops embedding decay for the same reason). With tied embeddings the output
    head is that same tensor and follows the same choice. Frozen parameters are left out.
    """
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.ndim >= 2 and id(p) not in embedding_ids else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def loss_scaled(plugin: Any) -> bool:
    """Whether the precision plugin scales the loss (16-mixed's GradScaler): then gradients need unscaling."""
    return getattr(plugin, "scaler", None) is not None


def fused_default(factory: Callable[..., torch.optim.Optimizer], params) -> dict[str, bool]:
    """``{"fused": True}`` when ``optim.fused`` is left null and PyTorch has a fused kernel for this optimizer and
    these parameters (Adam/AdamW on CUDA or CPU), else ``{}``: the fused step is the fastest (README's performance
    table: fused / foreach AdamW) and it can skip a non-finite step on the device, which keeps
    callbacks.resilience.NonFiniteGuard free of host-device synchronisations."""
    from torch.optim.optimizer import _get_fused_kernels_supported_devices

    keywords = getattr(factory, "keywords", {})
    func = getattr(factory, "func", factory)
    if (
        keywords.get("fused") is not None
        or keywords.get("foreach")
        or "fused" not in inspect.signature(func).parameters
    ):
        return {}
    devices = set(_get_fused_kernels_supported_devices())
    if all(p.is_floating_point() and p.device.type in devices for p in params):
        return {"fused": True}
    return {}
