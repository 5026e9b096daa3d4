"""What a study's ratings say: A's win rate with a bootstrap interval, Bradley-Terry strengths, rater agreement.

- **Win rate** of A: (A's wins + half the ties) / ratings. Every rating counts once (two raters on an item: two).
- **95% interval**: percentile bootstrap, seeded, resampling *items* with all their ratings (a cluster bootstrap): the
  ratings of one item by several raters are not independent, and resampling them apart would narrow the interval.
- **Bradley-Terry** with ties as half a win to each side: P(A beats B) = s_A / (s_A + s_B). With two players the
  maximum-likelihood fit is the win rate itself, so the log-strength of A (B's fixed at 0) is logit(win rate), and its
  interval is the logit of the win rate's (a monotone map keeps percentiles). On the Elo scale: 400 log10 of the odds.
  A side that never lost has no finite strength (null).
- **Agreement**: Cohen's kappa of each pair of raters over the items both rated, on the categories A / B / tie (what
  they chose, not the side it was on, which differs between raters). Undefined (null) when chance agreement is 1.
- **Position bias**: the share of non-tie choices that went to the left answer (0.5 when the page is unbiased).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from itertools import combinations
from typing import Any

import numpy as np

WINNERS = ("a", "b", "tie")
POINTS = {"a": 1.0, "b": 0.0, "tie": 0.5}  # A's points: a tie is half a win


def win_rate(winners: Sequence[str]) -> float | None:
    return None if not winners else sum(POINTS[w] for w in winners) / len(winners)


def bootstrap_interval(
    by_item: Sequence[Sequence[str]], resamples: int = 10_000, seed: int = 0, level: float = 0.95
) -> tuple[float, float] | None:
    """Percentile interval of A's win rate, resampling items (each a list of its ratings' winners) with replacement."""
    by_item = [w for w in by_item if w]
    if not by_item:
        return None
    points = np.array([sum(POINTS[w] for w in ws) for ws in by_item])  # A's points per item
    counts = np.array([len(ws) for ws in by_item], dtype=float)
    rng = np.random.default_rng(seed)
    n, rates = len(by_item), []
    chunk = max(1, 4_000_000 // n)  # resamples per draw: bounded memory for large studies
    for start in range(0, resamples, chunk):
        idx = rng.integers(0, n, size=(min(chunk, resamples - start), n))
        rates.append(points[idx].sum(1) / counts[idx].sum(1))
    lo, hi = np.quantile(np.concatenate(rates), [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def logit(p: float | None) -> float | None:
    """log(p / (1 - p)); None at 0 and 1 (and for None)."""
    return None if p is None or p <= 0 or p >= 1 else math.log(p / (1 - p))


def bradley_terry(winners: Sequence[str], interval: tuple[float, float] | None = None) -> dict[str, Any]:
    """A and B's Bradley-Terry fit (ties half a win): P(A beats B), log-strengths (B = 0), Elo difference."""
    p = win_rate(winners)
    strength = logit(p)
    return {
        "p_a_beats_b": p,
        "log_strength_a": strength,
        "log_strength_b": 0.0,
        "log_strength_a_ci95": None if interval is None else [logit(interval[0]), logit(interval[1])],
        "elo_difference": None if strength is None else 400 * strength / math.log(10),
    }


def cohen_kappa(x: Sequence[str], y: Sequence[str], categories: Sequence[str] = WINNERS) -> float | None:
    """(p_o - p_e) / (1 - p_e) of two raters' labels of the same items; None when p_e is 1 (undefined)."""
    if len(x) != len(y) or not x:
        raise ValueError("kappa needs two equally long, non-empty label lists")
    n = len(x)
    observed = sum(a == b for a, b in zip(x, y)) / n
    cx, cy = Counter(x), Counter(y)
    expected = sum(cx[c] * cy[c] for c in categories) / n**2
    return None if expected >= 1 else (observed - expected) / (1 - expected)


def agreement(ratings: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each pair of raters with items in common: how many, the share of equal choices, Cohen's kappa."""
    by_rater: dict[str, dict[str, str]] = defaultdict(dict)
    for r in ratings:
        by_rater[r["rater"]][r["item"]] = r["winner"]
    out = []
    for r1, r2 in combinations(sorted(by_rater), 2):
        common = sorted(set(by_rater[r1]) & set(by_rater[r2]))
        if not common:
            continue
        x, y = [by_rater[r1][i] for i in common], [by_rater[r2][i] for i in common]
        out.append(
            {
                "raters": [r1, r2],
                "items": len(common),
                "agreement": sum(a == b for a, b in zip(x, y)) / len(common),
                "kappa": cohen_kappa(x, y),
            }
        )
    return out


def summarize(ratings: Sequence[dict[str, Any]], resamples: int = 10_000, seed: int = 0) -> dict[str, Any]:
    """Everything ``summary`` reports, from the ratings (first per rater and item: ratings.read_ratings)."""
    winners = [r["winner"] for r in ratings]
    by_item: dict[str, list[str]] = defaultdict(list)
    for r in ratings:
        by_item[r["item"]].append(r["winner"])
    interval = bootstrap_interval(list(by_item.values()), resamples, seed)
    counts = Counter(winners)
    sided = [r["choice"] for r in ratings if r["choice"] != "tie"]
    per_rater: dict[str, dict[str, int]] = {}
    for r in sorted(ratings, key=lambda r: r["rater"]):
        c = per_rater.setdefault(r["rater"], {"ratings": 0, "a": 0, "b": 0, "tie": 0})
        c["ratings"] += 1
        c[r["winner"]] += 1
    scores: dict[str, list[int]] = {w: [] for w in WINNERS}
    for r in ratings:
        if r.get("score") is not None:
            scores[r["winner"]].append(r["score"])
    return {
        "ratings": len(ratings),
        "items_rated": len(by_item),
        "raters": len(per_rater),
        "a_wins": counts["a"],
        "b_wins": counts["b"],
        "ties": counts["tie"],
        "tie_rate": None if not ratings else counts["tie"] / len(ratings),
        "win_rate_a": win_rate(winners),
        "win_rate_a_ci95": None if interval is None else list(interval),
        "ties_count_as": "half a win for each side",
        "bootstrap": {"resamples": resamples, "seed": seed, "unit": "item", "method": "percentile"},
        "bradley_terry": bradley_terry(winners, interval),
        "left_chosen": None if not sided else sided.count("left") / len(sided),
        "mean_score": {f"when_{w}": (sum(s) / len(s) if s else None) for w, s in scores.items()},
        "per_rater": per_rater,
        "agreement": agreement(ratings),
    }


def report(summary: dict[str, Any]) -> str:
    """The summary as a few lines of text."""

    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{100 * x:.1f}%"

    def num(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.3f}"

    s = summary
    lines = [f"ratings: {s['ratings']} ({s['items_rated']} items, {s['raters']} raters)"]
    if not s["ratings"]:
        return "\n".join([*lines, "no ratings yet"])
    ci, bt, boot = s["win_rate_a_ci95"], s["bradley_terry"], s["bootstrap"]
    lines += [
        f"A wins {s['a_wins']}, B wins {s['b_wins']}, ties {s['ties']} ({pct(s['tie_rate'])})",
        f"A's win rate: {num(s['win_rate_a'])} [{num(ci[0])}, {num(ci[1])}] (95% percentile bootstrap over items, "
        f"{boot['resamples']} resamples, seed {boot['seed']}; a tie counts as half a win)",
        f"Bradley-Terry: P(A beats B) = {num(bt['p_a_beats_b'])}, log-strength A - B = {num(bt['log_strength_a'])}"
        + ("" if bt["elo_difference"] is None else f" (Elo {bt['elo_difference']:+.0f})"),
        f"left answer chosen in {pct(s['left_chosen'])} of non-tie choices",
    ]
    for name, c in s["per_rater"].items():
        lines.append(f"rater {name!r}: {c['ratings']} (A {c['a']}, B {c['b']}, tie {c['tie']})")
    for a in s["agreement"]:
        kappa = "n/a (chance agreement is 1)" if a["kappa"] is None else f"{a['kappa']:.3f}"
        lines.append(
            f"agreement {a['raters'][0]!r} & {a['raters'][1]!r}: {a['items']} items, {pct(a['agreement'])} equal, "
            f"Cohen's kappa {kappa}"
        )
    return "\n".join(lines)
