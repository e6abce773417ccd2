"""Is a difference real? 95% intervals for results across seeds and for one held-out score, and the rule every
report applies: a comparison whose interval holds zero is "not distinguishable" (as bench's ≈1 for latency).

Across seeds the comparison is paired: every model of a seed starts from the same warm-up on the same task, so
the per-seed difference removes what the seed changes for all models alike.
"""

from __future__ import annotations

import math
import statistics

# two-sided 95% quantiles of Student's t for 1..30 degrees of freedom; the normal's 1.96 beyond
_T95 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
    2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip
NOT_DISTINGUISHABLE = "not distinguishable"


def t95(df: int) -> float:
    return _T95[df - 1] if 1 <= df <= len(_T95) else 1.96


def mean_interval(values: list[float]) -> tuple[float, float, float] | None:
    """(mean, low, high): the t interval of the mean; None for fewer than two values (no interval exists)."""
    if len(values) < 2:
        return None
    m = statistics.fmean(values)
    half = t95(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return m, m - half, m + half


def paired(a: dict[int, float], b: dict[int, float]) -> dict | None:
    """A − B over the seeds both have: mean difference, its 95% interval, and whether the interval excludes 0."""
    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds]
    iv = mean_interval(diffs)
    if iv is None:
        return None
    m, lo, hi = iv
    return {"mean": m, "ci95": [lo, hi], "seeds": len(seeds), "distinguishable": not lo <= 0.0 <= hi}


def proportion_interval(p: float, n: int) -> tuple[float, float]:
    """Wilson's 95% interval for a share `p` of `n` held-out samples (one seed's accuracy): how far another draw
    of the test set could move it."""
    if n <= 0:
        return 0.0, 1.0
    z = 1.96
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def difference_text(d: dict | None, digits: int = 4, short: bool = False) -> str:
    """`+0.5700 [+0.5400, +0.6000]`, or "not distinguishable (…)" around it when the interval holds 0 (`short`, for a
    narrow console: "≈ …", with a caption saying what ≈ means)."""
    if d is None:
        return "-"
    lo, hi = d["ci95"]
    text = f"{d['mean']:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]"
    if d["distinguishable"]:
        return text
    return f"≈ {text}" if short else f"{NOT_DISTINGUISHABLE} ({text})"
