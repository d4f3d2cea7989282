"""Means with Student-t confidence intervals and t-test p-values, for paired differences over
seeds, and Holm's adjustment of the p-values of one report's verdict lines.

scipy is not a dependency: when it is installed its t quantile is used, otherwise our own, computed
from the regularised incomplete beta function (Numerical Recipes' continued fraction) and inverted
by bisection. The tests check ours against scipy and against printed t-table values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))  # P(T > |t|)
    return 1.0 - tail if t > 0 else tail


def t_quantile_own(p: float, df: float) -> float:
    """Inverse of t_cdf by bisection (to ~1e-12 relative)."""
    if not 0.0 < p < 1.0 or df <= 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0 (got p={p}, df={df})")
    if p < 0.5:
        return -t_quantile_own(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
        if hi - lo <= 1e-13 * hi:
            break
    return 0.5 * (lo + hi)


def t_quantile(p: float, df: float) -> float:
    try:
        from scipy.stats import t as student_t
    except ImportError:
        return t_quantile_own(p, df)
    return float(student_t.ppf(p, df))


@dataclass(frozen=True)
class Interval:
    """Mean of n values with a two-sided `level` t-interval (lo, hi are None when n < 2)."""

    n: int
    mean: float
    lo: Optional[float] = None
    hi: Optional[float] = None
    level: float = 0.95
    p: Optional[float] = None  # two-sided p-value of a one-sample t-test of mean 0 (None when n < 2)

    @property
    def has_ci(self) -> bool:
        return self.lo is not None


def mean_interval(values: Sequence[float], level: float = 0.95) -> Interval:
    xs = [float(v) for v in values]
    n = len(xs)
    if n == 0:
        raise ValueError("mean_interval of no values")
    mean = math.fsum(xs) / n
    if n < 2:
        return Interval(n=n, mean=mean, level=level)
    sd = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
    se = sd / math.sqrt(n)
    half = t_quantile(0.5 + level / 2.0, n - 1) * se
    if se > 0:
        p = 2.0 * (1.0 - t_cdf(abs(mean) / se, n - 1))
    else:  # every difference equal: certain, unless they are all 0
        p = 1.0 if mean == 0 else 0.0
    return Interval(n=n, mean=mean, lo=mean - half, hi=mean + half, level=level, p=p)


def holm(pvalues: Sequence[Optional[float]]) -> list[Optional[float]]:
    """Holm's step-down adjusted p-values (family-wise error control over the given tests): sort
    the m p-values ascending, multiply the i-th (0-based) by m - i, take running maxima, clip at 1.
    A line is significant at level a when its adjusted p <= a. None entries (no test) stay None and
    do not count towards m."""
    tested = sorted((p, i) for i, p in enumerate(pvalues) if p is not None)
    out: list[Optional[float]] = [None] * len(pvalues)
    m, running = len(tested), 0.0
    for rank, (p, i) in enumerate(tested):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out
