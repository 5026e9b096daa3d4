"""The learning rate at exact steps: linear warm-up, cosine decay, the floor, one floor for every group."""

from __future__ import annotations

import math

import pytest
import torch

from llm.core.schedule import WarmupCosine, WarmupLinear, WarmupStableDecay
from llm.errors import UserError


def lrs(max_steps: int, warmup_steps: int, min_lr: float, base_lrs=(1.0,), steps: int = 20) -> list[list[float]]:
    """The lr of each group at steps 0..steps-1, as the optimizer sees it when it takes that step."""
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in base_lrs]
    optimizer = torch.optim.SGD([{"params": [p], "lr": lr} for p, lr in zip(params, base_lrs)])
    schedule = WarmupCosine(optimizer, max_steps=max_steps, warmup_steps=warmup_steps, min_lr=min_lr)
    seen = []
    for _ in range(steps):
        seen.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        schedule.step()
    return seen


def test_warmup_then_cosine_at_exact_steps():
    lr = [group[0] for group in lrs(max_steps=14, warmup_steps=4, min_lr=0.1)]
    # warm-up: step s uses (s + 1) / (warmup + 1), so step 0 already moves and step 4 reaches the peak
    assert lr[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    # cosine from the peak at step 4 to the floor at step 14: halfway (step 9) is the mean of peak and floor
    assert lr[9] == pytest.approx(0.55)
    assert lr[6] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 2 / 10)))
    assert lr[14] == pytest.approx(0.1)
    assert lr[19] == pytest.approx(0.1)  # past max_steps: stays at the floor
    assert all(a >= b for a, b in zip(lr[4:], lr[5:]))  # never rises after the warm-up


def test_min_lr_is_absolute_for_every_group():
    last = lrs(max_steps=10, warmup_steps=0, min_lr=0.05, base_lrs=(1.0, 0.5, 0.01), steps=11)[-1]
    # each group decays from its own base lr to the same absolute floor; a group below the floor stays where it is
    assert last == pytest.approx([0.05, 0.05, 0.01])


def test_no_warmup_starts_at_the_peak():
    assert lrs(max_steps=10, warmup_steps=0, min_lr=0.0, steps=1)[0] == [1.0]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"warmup_steps": -1}, "sched.warmup_steps must be >= 0"), ({"max_steps": 0}, "trainer.max_steps")],
)
def test_bad_settings_are_named(kwargs, message):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(UserError, match=message):
        WarmupCosine(optimizer, **{"max_steps": 10, **kwargs})


def lrs_of(schedule_cls, steps: int = 20, **kwargs) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = schedule_cls(optimizer, **kwargs)
    seen = []
    for _ in range(steps):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return seen


def test_linear_decay_at_exact_steps():
    lr = lrs_of(WarmupLinear, max_steps=12, warmup_steps=2, min_lr=0.0)
    assert lr[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert lr[7] == pytest.approx(0.5) and lr[12] == pytest.approx(0.0)  # halfway from step 2 to step 12


@pytest.mark.parametrize(
    ("shape", "halfway"), [("linear", 0.5), ("cosine", 0.5), ("1-sqrt", 1 - math.sqrt(0.5))], ids=str
)
def test_wsd_holds_the_peak_then_decays(shape, halfway):
    # 20 steps: warm-up 2, stable until step 16, decay over the last 4 (decay_fraction 0.2) to the floor 0.1
    lr = lrs_of(WarmupStableDecay, steps=21, max_steps=20, warmup_steps=2, min_lr=0.1, decay_shape=shape)
    assert lr[:2] == pytest.approx([1 / 3, 2 / 3])
    assert lr[2:17] == pytest.approx([1.0] * 15)  # the stable phase: the peak, whatever the run's length
    assert lr[18] == pytest.approx(0.1 + 0.9 * halfway)
    assert lr[20] == pytest.approx(0.1)


def test_wsd_decay_steps_win_over_the_fraction_and_are_checked():
    lr = lrs_of(WarmupStableDecay, max_steps=10, warmup_steps=0, decay_steps=2, decay_fraction=0.9)
    # the decay starts at step 8 (10 - 2) from the peak and reaches the floor at step 10
    assert lr[:10] == pytest.approx([1.0] * 9 + [0.5]) and lr[10] == pytest.approx(0.0)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(UserError, match="sched.decay_steps=11 must be in"):
        WarmupStableDecay(optimizer, max_steps=10, warmup_steps=0, decay_steps=11)
    with pytest.raises(UserError, match="sched.decay_shape='exp' is not one of linear, cosine, 1-sqrt"):
        WarmupStableDecay(optimizer, max_steps=10, decay_shape="exp")
