"""Learning-rate schedule: linear warmup, then cosine decay to a floor."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from llm.errors import UserError


class WarmupCosine(LambdaLR):
    """Linear warmup from 0 over ``warmup_steps``, then cosine decay to ``min_lr`` at ``max_steps``.

    ``min_lr`` is absolute (as in ``sched.min_lr``); each parameter group decays to it from its own base lr.
    Built from ``conf/sched/*.yaml`` as a ``_partial_``; the module supplies ``optimizer`` and ``max_steps``
    (the Trainer's estimated stepping batches), so the length of the run is stated once, in ``trainer``.
    """

    def __init__(self, optimizer: Optimizer, max_steps: int, warmup_steps: int = 100, min_lr: float = 0.0) -> None:
        if warmup_steps < 0:
            raise UserError(f"sched.warmup_steps must be >= 0, got {warmup_steps}")
        if max_steps <= 0:
            raise UserError(f"the schedule needs a finite number of steps (trainer.max_steps), got {max_steps}")
        self.warmup_steps = warmup_steps
        self.max_steps = max_steps
        self.min_lr = min_lr
        floors = [min(min_lr / g["lr"], 1.0) if g["lr"] > 0 else 0.0 for g in optimizer.param_groups]
        super().__init__(optimizer, [self._factor(floor) for floor in floors])

    def _factor(self, floor: float):
        warmup, total = self.warmup_steps, self.max_steps

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

        return factor
