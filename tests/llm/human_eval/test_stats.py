"""The summary's statistics against values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from llm.human_eval import stats


def rating(item: str, rater: str, winner: str, choice: str | None = None, score: int | None = None) -> dict:
    choice = choice or {"a": "left", "b": "right", "tie": "tie"}[winner]
    return {"item": item, "rater": rater, "winner": winner, "choice": choice, "score": score}


def test_win_rate_counts_a_tie_as_half():
    assert stats.win_rate(["a", "b", "tie", "a"]) == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    assert stats.win_rate(["tie", "tie"]) == 0.5
    assert stats.win_rate([]) is None


def test_bootstrap_interval():
    # two items, one won, one lost: a resample has 0, 1 or 2 wins with probability 1/4, 1/2, 1/4, so the 2.5% and
    # 97.5% quantiles of the resampled win rate are 0 and 1
    assert stats.bootstrap_interval([["a"], ["b"]]) == (0.0, 1.0)
    assert stats.bootstrap_interval([["tie"]] * 5) == (0.5, 0.5)
    assert stats.bootstrap_interval([["a"]] * 7) == (1.0, 1.0)
    assert stats.bootstrap_interval([]) is None
    # 60 wins in 100 items: the normal approximation 0.6 +- 1.96 sqrt(0.6 * 0.4 / 100) = [0.504, 0.696]
    lo, hi = stats.bootstrap_interval([["a"]] * 60 + [["b"]] * 40)
    assert lo == pytest.approx(0.504, abs=0.015) and hi == pytest.approx(0.696, abs=0.015)
    # seeded: the same interval every time, another with another seed
    items = [["a"], ["b", "a"], ["tie"], ["b"], ["a", "a"]] * 20
    assert stats.bootstrap_interval(items, 500, seed=3) == stats.bootstrap_interval(items, 500, seed=3)
    assert stats.bootstrap_interval(items, 500, seed=3) != stats.bootstrap_interval(items, 500, seed=4)


def test_bootstrap_resamples_items_with_all_their_ratings():
    # two items rated by 3 raters each, unanimously: resampling items gives win rates 0, 1/2, 1 (as for 2 ratings);
    # resampling the 6 ratings apart would give a narrower interval
    lo, hi = stats.bootstrap_interval([["a"] * 3, ["b"] * 3])
    assert (lo, hi) == (0.0, 1.0)


def test_bradley_terry_with_ties_as_half_wins():
    bt = stats.bradley_terry(["a", "a", "a", "b"])
    assert bt["p_a_beats_b"] == 0.75
    assert bt["log_strength_a"] == pytest.approx(math.log(3)) and bt["log_strength_b"] == 0.0
    assert bt["elo_difference"] == pytest.approx(400 * math.log10(3))
    # a tie is half a win each: 1 win + 1 tie = 1.5 of 2
    assert stats.bradley_terry(["a", "tie"])["p_a_beats_b"] == 0.75
    # the fit is the maximum of the Bradley-Terry likelihood W log p + L log(1 - p), p = sigmoid(s_A - s_B)
    winners = ["a"] * 5 + ["b"] * 2 + ["tie"] * 3
    w = sum(stats.POINTS[x] for x in winners)
    grid = np.linspace(-3, 3, 60001)
    p = 1 / (1 + np.exp(-grid))
    best = grid[np.argmax(w * np.log(p) + (len(winners) - w) * np.log(1 - p))]
    assert stats.bradley_terry(winners)["log_strength_a"] == pytest.approx(best, abs=1e-3)
    never_lost = stats.bradley_terry(["a", "a"], interval=(1.0, 1.0))
    assert never_lost["log_strength_a"] is None and never_lost["log_strength_a_ci95"] == [None, None]
    assert stats.bradley_terry(["a", "b"], interval=(0.25, 0.75))["log_strength_a_ci95"] == pytest.approx(
        [-math.log(3), math.log(3)]
    )


def test_cohen_kappa():
    # p_o = 4/5; marginals x: a .4 b .4 tie .2, y: a .2 b .6 tie .2 -> p_e = .08 + .24 + .04 = .36
    x, y = ["a", "a", "b", "b", "tie"], ["a", "b", "b", "b", "tie"]
    assert stats.cohen_kappa(x, y) == pytest.approx((0.8 - 0.36) / (1 - 0.36))
    assert stats.cohen_kappa(x, x) == pytest.approx(1.0)
    assert stats.cohen_kappa(["a", "b"], ["b", "a"]) == pytest.approx(-1.0)  # p_o 0, p_e 1/2
    assert stats.cohen_kappa(["a", "a"], ["a", "a"]) is None  # chance agreement 1: undefined


def test_agreement_is_pairwise_over_the_items_both_rated():
    ratings = [
        rating("1", "ann", "a"), rating("2", "ann", "b"), rating("3", "ann", "tie"),
        rating("1", "bob", "a"), rating("2", "bob", "a"), rating("4", "bob", "b"),
        rating("9", "cid", "a"),
    ]  # fmt: skip
    (pair,) = stats.agreement(ratings)  # cid shares no item with anyone
    # ann & bob on items 1, 2: (a, a), (b, a): p_o = 1/2; marginals ann a .5 b .5, bob a 1 -> p_e = .5, kappa 0
    assert pair == {"raters": ["ann", "bob"], "items": 2, "agreement": 0.5, "kappa": pytest.approx(0.0)}


def test_summarize():
    ratings = [
        rating("1", "ann", "a", "left", score=4),
        rating("2", "ann", "b", "left", score=2),
        rating("3", "ann", "tie"),
        rating("1", "bob", "a", "right", score=5),
    ]
    s = stats.summarize(ratings, resamples=2000)
    assert (s["ratings"], s["items_rated"], s["raters"]) == (4, 3, 2)
    assert (s["a_wins"], s["b_wins"], s["ties"], s["tie_rate"]) == (2, 1, 1, 0.25)
    assert s["win_rate_a"] == pytest.approx(2.5 / 4) and s["ties_count_as"] == "half a win for each side"
    lo, hi = s["win_rate_a_ci95"]
    assert 0 <= lo <= s["win_rate_a"] <= hi <= 1
    assert s["bradley_terry"]["p_a_beats_b"] == s["win_rate_a"]
    assert s["left_chosen"] == pytest.approx(2 / 3)
    assert s["mean_score"] == {"when_a": 4.5, "when_b": 2.0, "when_tie": None}
    assert s["per_rater"] == {
        "ann": {"ratings": 3, "a": 1, "b": 1, "tie": 1},
        "bob": {"ratings": 1, "a": 1, "b": 0, "tie": 0},
    }
    assert s["agreement"] == [{"raters": ["ann", "bob"], "items": 1, "agreement": 1.0, "kappa": None}]
    assert "Cohen's kappa n/a" in stats.report(s) and "a tie counts as half a win" in stats.report(s)
    empty = stats.summarize([])
    assert empty["win_rate_a"] is None and empty["win_rate_a_ci95"] is None and "no ratings yet" in stats.report(empty)
