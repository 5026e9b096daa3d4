"""How the optimizer is set up for a Transformer: which weights decay, and when the fused kernel is used."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

from llm.training.muon import MUON_KEY, MuonAdamW, block_matrices


def param_groups(model: torch.nn.Module, weight_decay: float, split_matrices: bool = False) -> list[dict[str, Any]]:
    """AdamW groups: decay on the weight matrices of attention and MLP only.

    Norm gains and biases are not decayed (pulling a gain towards 0 changes what the layer computes, not
    its complexity). The token embedding is not decayed either: decoupled decay shrinks every row at every
    step, while a rare token's row only receives gradient when the token occurs, so decay would steadily
    erase rare tokens (OLMo 2 drops embedding decay for the same reason). With tied embeddings the output
    head is that same tensor and follows the same choice. Frozen parameters are left out.

    ``split_matrices`` (for :class:`llm.training.muon.MuonAdamW`) puts the blocks' weight matrices in a group
    of their own, first, flagged ``muon=True``; the other two groups follow unchanged.
    """
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.ndim >= 2 and id(p) not in embedding_ids else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if split_matrices:
        matrices = block_matrices(model)
        groups[0]["params"] = [p for p in decay if id(p) not in matrices]
        muon = {"params": [p for p in decay if id(p) in matrices], "weight_decay": weight_decay, MUON_KEY: True}
        groups.insert(0, muon)
        for group, name in zip(groups, ("muon", "adamw", "adamw_no_decay")):  # lr-MuonAdamW/<name> in the logs
            group["name"] = name
    return groups


def splits_matrices(factory: Callable[..., torch.optim.Optimizer]) -> bool:
    """Whether the optimizer wants the blocks' matrices apart (``MuonAdamW``)."""
    func = getattr(factory, "func", factory)
    return isinstance(func, type) and issubclass(func, MuonAdamW)


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
