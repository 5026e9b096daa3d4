"""Gradient, parameter and update norms, per block and in total, every ``every_n_steps`` optimizer steps.

Tags (TensorBoard, at the step of the batch, as ``train/loss``):
- ``norms/grad_total``, ``norms/grad/<block>``: the gradient before clipping (after unscaling under 16-mixed);
- ``norms/param_total``, ``norms/param/<block>``: the weights the batch was computed with;
- ``norms/update_total``, ``norms/update/<block>``: how far the optimizer step moved them, ||W_after - W_before||.
A block is ``layers.<i>`` for a Transformer block, else the top-level module (``tok_embeddings``, ``norm``,
``output`` when untied, ``head`` of the classifier). The ratio update / param is the effective step size; a block
whose gradient norm grows apart from the others is where a run starts to diverge.

Cost: nothing on the other steps. On a measured step, one norm per tensor and one host synchronisation, plus a
copy of the weights kept from before the optimizer step to after it (one extra weight-sized buffer, on the device,
for the duration of the step; under FSDP each rank copies its own shard). Under FSDP the norms of sharded tensors
are reduced over the ranks, so every rank runs the callback; rank 0 writes.
"""

from __future__ import annotations

import re
from typing import Any

import lightning as L
import torch

from llm.errors import UserError

_WRAPPERS = re.compile(r"(^|\.)(_orig_mod|_checkpoint_wrapped_module|_fsdp_wrapped_module)(?=\.|$)")


def block_of(name: str) -> str:
    """The block a parameter belongs to: 'model.layers.3.attention.wq.weight' -> 'layers.3', 'model.norm.weight'
    -> 'norm'. Wrapper prefixes (torch.compile, activation checkpointing) are ignored."""
    parts = _WRAPPERS.sub("", name).lstrip(".").split(".")
    if parts[0] == "model" and len(parts) > 1:
        parts = parts[1:]
    if len(parts) > 2 and parts[1].isdigit():
        return f"{parts[0]}.{parts[1]}"
    return parts[0]


def _norm(t: torch.Tensor) -> torch.Tensor:
    """The 2-norm of ``t`` in float32, reduced over the ranks when ``t`` is a sharded DTensor."""
    n = torch.linalg.vector_norm(t, dtype=torch.float32)
    return n.full_tensor() if hasattr(n, "full_tensor") else n


def group_norms(tensors: list[tuple[str, torch.Tensor]]) -> dict[str, float]:
    """{block: norm} and {"total": norm} of named tensors, with one host synchronisation."""
    squares: dict[str, list[torch.Tensor]] = {}
    for name, t in tensors:
        squares.setdefault(block_of(name), []).append(_norm(t.detach()).square())
    if not squares:
        return {}
    blocks = list(squares)
    per_block = torch.stack([torch.stack(sq).sum() for sq in squares.values()])
    values = torch.cat([per_block.sqrt(), per_block.sum().sqrt().reshape(1)]).tolist()
    return dict(zip([*blocks, "total"], values))


class Norms(L.Callback):
    """Logs gradient, parameter and update norms per block every ``every_n_steps`` optimizer steps (see module doc).

    Args:
        every_n_steps: measure the steps whose index (the step of train/loss) is a multiple of this, from step 0.
        per_block: also log each block (else the totals only).
        updates: measure the update norms (needs the copy of the weights described in the module doc).
    """

    def __init__(self, every_n_steps: int = 25, per_block: bool = True, updates: bool = True) -> None:
        if every_n_steps < 1:
            raise UserError(f"callbacks.norms.every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.per_block = per_block
        self.updates = updates
        self._before: list[tuple[str, torch.Tensor]] | None = None
        self._step: int | None = None

    def _params(self, pl_module: L.LightningModule) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in pl_module.named_parameters() if p.requires_grad]

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        # called once per optimizer step, after the last micro-batch's backward and before clipping
        step = trainer.global_step
        if step % self.every_n_steps:
            return
        params = self._params(pl_module)
        metrics = self._tagged("grad", group_norms([(n, p.grad) for n, p in params if p.grad is not None]))
        metrics.update(self._tagged("param", group_norms(params)))
        self._log(trainer, metrics, step)
        if self.updates:
            self._before = [(n, p.detach().clone()) for n, p in params]
            self._step = step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self._before is None or trainer.global_step == self._step:  # accumulating: the step has not happened yet
            return
        current = dict(self._params(pl_module))
        deltas = [(n, current[n].detach() - before) for n, before in self._before if n in current]
        self._before = None
        self._log(trainer, self._tagged("update", group_norms(deltas)), self._step)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._before = None

    def _tagged(self, kind: str, norms: dict[str, float]) -> dict[str, float]:
        out = {f"norms/{kind}_total": norms.pop("total")} if norms else {}
        if self.per_block:
            out.update({f"norms/{kind}/{block}": value for block, value in norms.items()})
        return out

    @staticmethod
    def _log(trainer: L.Trainer, metrics: dict[str, float], step: int) -> None:
        if not metrics:
            return
        for logger in trainer.loggers:  # each logger writes on rank 0 only
            logger.log_metrics(metrics, step=step)
