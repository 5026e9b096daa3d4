"""Learning-rate schedules, each a warm-up then a decay to a floor over the run's optimizer steps.

- ``WarmupCosine`` (``sched=cosine``, the default): cosine decay from the peak to ``min_lr`` at the last step;
- ``WarmupLinear`` (``sched=linear``): linear decay to ``min_lr`` at the last step;
- ``WarmupStableDecay`` (``sched=wsd``): the peak held until the last ``decay_steps`` (or ``decay_fraction`` of the
  run), then a decay of the chosen shape to ``min_lr``. Because the peak does not depend on the run's length, a
  stable-phase checkpoint can be continued by its decay alone ("annealing"): resume it with a larger
  ``trainer.max_steps`` and ``sched.decay_steps`` equal to the difference (README: sched=).

``min_lr`` is absolute (as in ``sched.min_lr``); each parameter group decays to it from its own base lr. Built from
``conf/sched/*.yaml`` as a ``_partial_``; the module supplies ``optimizer`` and ``max_steps`` (the Trainer's
estimated stepping batches), so the length of the run is stated once, in ``trainer``. Warm-up is linear and starts
above 0: step s of the warm-up uses ``(s + 1) / (warmup_steps + 1)`` of the peak, so no step is wasted at lr 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from llm.errors import UserError

DECAY_SHAPES = ("linear", "cosine", "1-sqrt")


def decay(shape: str, progress: float) -> float:
    """The fraction of the way from the peak (1) to the floor (0) left at ``progress`` in [0, 1] of a decay."""
    if shape == "linear":
        return 1.0 - progress
    if shape == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if shape == "1-sqrt":  # Hägele et al. 2024: keeps the lr high longer, then drops
        return 1.0 - math.sqrt(progress)
    raise UserError(f"sched.decay_shape={shape!r} is not one of {', '.join(DECAY_SHAPES)}")


class _WarmupThenDecay(LambdaLR):
    """Linear warm-up over ``warmup_steps``, then ``_after_warmup(step)`` (1 at the peak, 0 at the floor)."""

    def __init__(self, optimizer: Optimizer, max_steps: int, warmup_steps: int, min_lr: float) -> None:
        if warmup_steps < 0:
            raise UserError(f"sched.warmup_steps must be >= 0, got {warmup_steps}")
        if max_steps <= 0:
            raise UserError(f"the schedule needs a finite number of steps (trainer.max_steps), got {max_steps}")
        if min_lr < 0:
            raise UserError(f"sched.min_lr must be >= 0, got {min_lr}")
        self.warmup_steps = warmup_steps
        self.max_steps = max_steps
        self.min_lr = min_lr
        floors = [min(min_lr / g["lr"], 1.0) if g["lr"] > 0 else 0.0 for g in optimizer.param_groups]
        super().__init__(optimizer, [self._factor(floor) for floor in floors])

    def _after_warmup(self, step: int) -> float:
        raise NotImplementedError

    # the schedule's shape is the run's configuration, not its state: a resumed run follows its config from the step
    # it resumes at (the same config gives the same schedule; a new one, e.g. a decay added to a stable phase, wins)
    SETTINGS = ("warmup_steps", "max_steps", "min_lr", "decay_steps", "decay_shape")

    def state_dict(self) -> dict:
        return {k: v for k, v in super().state_dict().items() if k not in self.SETTINGS}

    def _factor(self, floor: float) -> Callable[[int], float]:
        def factor(step: int) -> float:
            if step < self.warmup_steps:
                return (step + 1) / (self.warmup_steps + 1)
            return floor + (1.0 - floor) * self._after_warmup(step)

        return factor


class WarmupCosine(_WarmupThenDecay):
    """Linear warmup from 0 over ``warmup_steps``, then cosine decay to ``min_lr`` at ``max_steps``."""

    def __init__(self, optimizer: Optimizer, max_steps: int, warmup_steps: int = 100, min_lr: float = 0.0) -> None:
        super().__init__(optimizer, max_steps, warmup_steps, min_lr)

    def _after_warmup(self, step: int) -> float:
        return decay("cosine", min(1.0, (step - self.warmup_steps) / max(1, self.max_steps - self.warmup_steps)))


class WarmupLinear(_WarmupThenDecay):
    """Linear warmup over ``warmup_steps``, then linear decay to ``min_lr`` at ``max_steps``."""

    def __init__(self, optimizer: Optimizer, max_steps: int, warmup_steps: int = 100, min_lr: float = 0.0) -> None:
        super().__init__(optimizer, max_steps, warmup_steps, min_lr)

    def _after_warmup(self, step: int) -> float:
        return decay("linear", min(1.0, (step - self.warmup_steps) / max(1, self.max_steps - self.warmup_steps)))


class WarmupStableDecay(_WarmupThenDecay):
    """Warm-up, the peak held (stable), then a decay over the last steps of the run to ``min_lr``.

    The decay lasts ``decay_steps`` when given, else ``decay_fraction`` of ``max_steps``; ``decay_shape`` is
    ``linear``, ``cosine`` or ``1-sqrt``. The stable phase is what remains between warm-up and decay.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        max_steps: int,
        warmup_steps: int = 100,
        min_lr: float = 0.0,
        decay_fraction: float = 0.2,
        decay_steps: int | None = None,
        decay_shape: str = "linear",
    ) -> None:
        if decay_steps is None:
            if not 0.0 <= decay_fraction <= 1.0:
                raise UserError(f"sched.decay_fraction={decay_fraction} must be in [0, 1]")
            # a warm-up longer than the run leaves no room: the decay then takes what is left
            decay_steps = min(round(decay_fraction * max_steps), max(0, max_steps - warmup_steps))
        elif not 0 <= decay_steps <= max_steps - warmup_steps:
            raise UserError(
                f"sched.decay_steps={decay_steps} must be in [0, trainer.max_steps - sched.warmup_steps ="
                f" {max_steps - warmup_steps}]"
            )
        decay(decay_shape, 0.0)  # a wrong shape fails here, not at the first decay step
        self.decay_steps = int(decay_steps)
        self.decay_shape = decay_shape
        super().__init__(optimizer, max_steps, warmup_steps, min_lr)

    def _after_warmup(self, step: int) -> float:
        start = self.max_steps - self.decay_steps
        if step < start:
            return 1.0
        return decay(self.decay_shape, min(1.0, (step - start) / max(1, self.decay_steps)))
