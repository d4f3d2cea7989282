"""Means with Student-t confidence intervals and t-test p-values, for paired differences over
seeds, Holm's adjustment of the p-values of one report's verdict lines, and the power of those
paired t-tests (the smallest difference they detect at 80% power, the seeds that would decide one).

scipy is not a dependency: when it is installed its t quantile and noncentral t are used, otherwise
our own: the t quantile from the regularised incomplete beta function (Numerical Recipes' continued
fraction) inverted by bisection, the noncentral t's distribution function by Simpson's rule over the
chi distribution of the sample sd. The tests check ours against scipy and printed t-table values.
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
    sd: Optional[float] = None  # the values' sample standard deviation (None when n < 2)

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
    return Interval(n=n, mean=mean, lo=mean - half, hi=mean + half, level=level, p=p, sd=sd)


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


# --------------------------------------------------------------------------- power of the paired t-test

POWER = 0.8  # the power the report's detectable effects and seed counts are computed at


def nct_cdf_own(t: float, df: float, nc: float, intervals: int = 2000) -> float:
    """P(T <= t) for the noncentral t with `df` degrees of freedom and noncentrality `nc`:
    T = (Z + nc) / S with S = sqrt(V / df), V ~ chi2(df), so P(T <= t) = E_S[Phi(t S - nc)], integrated
    by Simpson's rule over S's density 2 (df/2)^(df/2) / Gamma(df/2) s^(df-1) exp(-df s^2 / 2)."""
    spread = 12.0 / math.sqrt(2.0 * df)  # S has mean ~1 and sd ~1/sqrt(2 df)
    lo, hi = max(0.0, 1.0 - spread), 1.0 + spread + (8.0 if df < 4 else 0.0)
    const = math.log(2.0) + (df / 2.0) * math.log(df / 2.0) - math.lgamma(df / 2.0)
    h = (hi - lo) / intervals
    total = 0.0
    for j in range(intervals + 1):
        s = lo + j * h
        if s <= 0.0:
            dens = math.exp(const) if df == 1 else 0.0
        else:
            dens = math.exp(const + (df - 1.0) * math.log(s) - df * s * s / 2.0)
        w = 1.0 if j in (0, intervals) else (4.0 if j % 2 else 2.0)
        total += w * dens * 0.5 * math.erfc(-(t * s - nc) / math.sqrt(2.0))
    return total * h / 3.0


def nct_cdf(t: float, df: float, nc: float) -> float:
    try:
        from scipy.stats import nct
    except ImportError:
        return nct_cdf_own(t, df, nc)
    got = float(nct.cdf(t, df, nc))  # scipy 1.17 returns nan far in the lower tail (e.g. t=-8.86, df=2, nc=8)
    return got if math.isfinite(got) else nct_cdf_own(t, df, nc)


def paired_power(effect: float, sd: float, n: int, alpha: float) -> float:
    """Power of the two-sided paired (one-sample) t-test at level `alpha` with n pairs whose
    differences have sd `sd`, when the true mean difference is `effect`."""
    df = n - 1
    crit = t_quantile(1.0 - alpha / 2.0, df)
    nc = abs(effect) * math.sqrt(n) / sd
    return 1.0 - nct_cdf(crit, df, nc) + nct_cdf(-crit, df, nc)


def detectable_effect(sd: float, n: int, alpha: float, power: float = POWER) -> float:
    """The smallest |mean difference| the paired t-test at `alpha` detects with probability `power`
    from n pairs with sd `sd` (same unit as sd): solved by bisection on the effect."""
    if n < 2 or not sd > 0:
        raise ValueError(f"detectable_effect needs n >= 2 and sd > 0 (got n={n}, sd={sd})")
    lo, hi = 0.0, sd
    while paired_power(hi, sd, n, alpha) < power:
        lo, hi = hi, 2.0 * hi
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if paired_power(mid, sd, n, alpha) < power else (lo, mid)
        if hi - lo <= 1e-10 * hi:
            break
    return 0.5 * (lo + hi)


def seeds_needed(effect: float, sd: float, alpha: float, power: float = POWER, most: int = 100_000) -> Optional[int]:
    """The fewest pairs (n >= 2) at which the paired t-test at `alpha` detects a true mean difference
    `effect` with probability `power`, given the differences' sd; None when even `most` do not."""
    if not sd > 0:
        return 2
    if effect == 0 or paired_power(effect, sd, most, alpha) < power:
        return None
    lo, hi = 1, 2  # power(lo) < power <= power(hi), lo = 1 standing for "too few"
    while paired_power(effect, sd, hi, alpha) < power:
        lo, hi = hi, min(2 * hi, most)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if paired_power(effect, sd, mid, alpha) < power else (lo, mid)
    return hi


def pooled_sd(groups: Sequence[tuple[int, float]]) -> Optional[float]:
    """sqrt(sum (n_i - 1) sd_i^2 / sum (n_i - 1)) over (n_i, sd_i) with n_i >= 2: the within-line sd
    of several lines of one kind, on their pooled degrees of freedom."""
    used = [(n, sd) for n, sd in groups if n >= 2 and sd is not None]
    dof = sum(n - 1 for n, _ in used)
    return math.sqrt(math.fsum((n - 1) * sd * sd for n, sd in used) / dof) if dof else None


def holm_levels(pvalues: Sequence[Optional[float]], alpha: float) -> list[Optional[float]]:
    """The level Holm's step-down procedure tests each p-value at: alpha / (m - rank), rank its
    0-based position among the m p-values sorted ascending (the smallest is tested at alpha / m)."""
    tested = sorted((p, i) for i, p in enumerate(pvalues) if p is not None)
    out: list[Optional[float]] = [None] * len(pvalues)
    for rank, (_, i) in enumerate(tested):
        out[i] = alpha / (len(tested) - rank)
    return out
