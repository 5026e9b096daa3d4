"""Muon for the weight matrices of the Transformer blocks, AdamW for everything else, as one optimizer.

Muon (momentum, then each update matrix orthogonalised by a Newton-Schulz iteration) is defined for 2-D
hidden-layer weights only; the speedrun recipes (modded-nanogpt, nanochat) and torchtitan keep AdamW for the
token embedding, the output head and the norm gains. Lightning drives one optimizer per LightningModule unless
the loop is written by hand, so :class:`MuonAdamW` is a single ``torch.optim.Optimizer`` whose parameter groups
are either Muon's or AdamW's: one ``state_dict`` in the standard layout (which is what Lightning's checkpoints
and torch.distributed.checkpoint's FSDP2 state dicts read and write), one set of groups for the schedulers, the
gradient clipping and the learning-rate monitor. The steps themselves are PyTorch's ``torch.optim.Muon`` and
``torch.optim.AdamW``, run on the groups of their kind.

Under FSDP2 the parameters and gradients are DTensors sharded on their first dimension. PyTorch's Muon step runs
on them as it is: the orthogonalisation's matrix products are DTensor operations, which gather what each product
needs, so every rank computes the update of the whole matrix and keeps its shard (the "gather" scheme; Megatron
and torchtitan also distribute whole matrices over ranks to avoid the repeated work, which pays off at widths
where the Newton-Schulz products cost as much as the forward pass).
tests/llm/training/test_muon.py and tests/test_muon.py check it against one process.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from llm.core.model import Block
from llm.errors import UserError

MUON_KEY = "muon"  # the parameter-group flag: True for Muon's matrices


def block_matrices(model: nn.Module) -> set[int]:
    """ids of the trainable weight matrices of the Linear layers inside the Transformer blocks (attention and
    MLP). A LoRA layer's frozen weight is not among them, nor are its low-rank factors: those two small matrices
    are not hidden-layer weights whose update Muon orthogonalises, so they train with AdamW."""
    ids = set()
    for block in (m for m in model.modules() if isinstance(m, Block)):
        for layer in block.modules():
            if isinstance(layer, nn.Linear) and layer.weight.requires_grad:
                ids.add(id(layer.weight))
    return ids


class MuonAdamW(torch.optim.Optimizer):
    """Muon on the parameter groups flagged ``muon=True``, AdamW on the others.

    Args:
        params: parameter groups (``llm.training.optim.param_groups(..., split_matrices=True)``); a group's
            ``weight_decay`` is kept, its learning rate is ``lr`` for Muon's groups and ``adamw_lr`` for AdamW's.
            Plain parameters make one AdamW group: only a group flagged ``muon=True`` gets Muon.
        lr: Muon's learning rate, before ``adjust_lr_fn``.
        momentum, nesterov, ns_steps: Muon's momentum, Nesterov's variant, Newton-Schulz iterations.
        adjust_lr_fn: Muon's per-matrix scaling of ``lr``: "original" (sqrt(max(1, rows/cols)), Keller Jordan's)
            or "match_rms_adamw" (0.2 sqrt(max(rows, cols)), Moonshot's: updates of AdamW's size, so ``lr`` and
            ``weight_decay`` can be AdamW's).
        adamw_lr, betas, eps: AdamW's, for the embedding, the output head and the gains.
        weight_decay: the default decay of a group that does not set its own.
        fused: AdamW's fused kernel (see llm.training.optim.fused_default); Muon has none.
    """

    def __init__(
        self,
        params: Iterable[dict[str, Any]],
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        adjust_lr_fn: str = "original",
        adamw_lr: float = 3e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        fused: bool | None = None,
    ) -> None:
        if not hasattr(torch.optim, "Muon"):
            raise UserError(
                f"optim=muon needs torch.optim.Muon (PyTorch 2.9 or newer); this is torch {torch.__version__}"
            )
        params = list(params)
        if params and isinstance(params[0], torch.Tensor):  # plain parameters: one group, AdamW's (no Muon flag)
            params = [{"params": params}]
        groups = [dict(g) for g in params]
        for g in groups:
            g.setdefault(MUON_KEY, False)
            g["lr"] = lr if g[MUON_KEY] else adamw_lr
            g.setdefault("weight_decay", weight_decay)
        groups = [g for g in groups if g["params"]]  # a run with adapters has no Muon matrices
        super().__init__(groups, {"lr": lr, "weight_decay": weight_decay})
        muon = [g for g in self.param_groups if g[MUON_KEY]]
        adamw = [g for g in self.param_groups if not g[MUON_KEY]]
        # the inner optimizers are built on these same group dicts, so they fill in their own defaults (betas,
        # momentum, ...) and the state_dict of this optimizer holds every setting of every group
        self._inner: dict[bool, torch.optim.Optimizer] = {}
        if muon:
            self._inner[True] = torch.optim.Muon(
                muon, lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn
            )
        if adamw:
            self._inner[False] = torch.optim.AdamW(adamw, lr=adamw_lr, betas=betas, eps=eps, fused=fused)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for kind, inner in self._inner.items():
            # load_state_dict replaces the group dicts and the state: the inner optimizers always see the current
            # ones, and keep their per-parameter state (momentum, moments) in this optimizer's state
            inner.param_groups = [g for g in self.param_groups if bool(g[MUON_KEY]) == kind]
            inner.state = self.state
            inner.step()
        return loss
