"""hld.study.stats: its own special functions (used where scipy is not installed) and the power calculations
built on them, against scipy at the arguments where their series, bisections and integration ranges are
stretched (large and fractional degrees of freedom, far tails, the continued fraction's switch point); the
intervals' and pooled sd's edge cases by hand. Each check names its independent computation: scipy.special /
scipy.stats, a brute-force scan, or arithmetic by hand. (test_study.py checks the same functions at the
points a report reads.)"""

from __future__ import annotations

import math
import sys

import pytest

from hld.study import stats

special = pytest.importorskip("scipy.special")
sst = pytest.importorskip("scipy.stats")

SHAPES = (0.5, 1.0, 2.5, 10.0, 300.0, 1e4, 1e6)


def _tails_close(got: float, want: float, rel: float) -> bool:
    """got ~ want relative to the smaller of want and 1 - want (a cdf's accuracy is in its nearer tail)."""
    return abs(got - want) <= rel * max(min(want, 1.0 - want), 1e-300)


def test_betainc_matches_scipy_over_shapes_and_at_the_continued_fraction_switch():
    """I_x(a, b) for a, b from 0.5 to 1e6 and x from 1e-12 to 1 - 1e-6, the point (a + 1) / (a + b + 2) where
    the continued fraction switches to I = 1 - I_{1-x}(b, a) and the float just below it, and the mean a / (a + b)."""
    bad = []
    for a in SHAPES:
        for b in SHAPES:
            switch = (a + 1.0) / (a + b + 2.0)
            for x in (
                1e-12,
                1e-4,
                0.05,
                0.3,
                0.5,
                0.7,
                0.95,
                1 - 1e-6,
                switch,
                math.nextafter(switch, 0.0),
                a / (a + b),
            ):
                got, want = stats.betainc(a, b, x), float(special.betainc(a, b, x))
                if not _tails_close(got, want, 1e-7):
                    bad.append((a, b, x, got, want))
    assert not bad


def test_betainc_at_and_beyond_the_ends_of_the_unit_interval():
    for a, b in ((0.5, 0.5), (3.0, 0.5), (2.0, 7.0)):
        assert stats.betainc(a, b, 0.0) == 0.0 and stats.betainc(a, b, -0.5) == 0.0
        assert stats.betainc(a, b, 1.0) == 1.0 and stats.betainc(a, b, 1.5) == 1.0


def test_t_cdf_matches_scipy_in_both_tails_and_at_zero():
    """Student's t cdf for df from 0.5 (heavier than Cauchy) to 1e6 and |t| from 0.05 to 40: the lower tail
    to 1e-8 of itself (down to 1e-300), the upper side its complement."""
    bad = []
    for df in (0.5, 1.0, 2.0, 3.5, 10.0, 100.0, 1e4, 1e6):
        assert stats.t_cdf(0.0, df) == pytest.approx(0.5, abs=1e-15)
        for t in (0.05, 0.5, 0.99, 1.0, 2.0, 5.0, 12.0, 40.0):
            tail, want = stats.t_cdf(-t, df), float(sst.t.cdf(-t, df))
            if abs(tail - want) > 1e-8 * want or stats.t_cdf(t, df) != 1.0 - tail:
                bad.append((df, t, tail, want))
    assert not bad


def test_t_quantile_own_matches_scipy_at_extreme_probabilities_and_df():
    """The bisection's bracket doubling (tails, df < 1) and the reflection p < 1/2 against scipy's ppf to 1e-9
    relative; and its stopping rule, relative to the bracket, at quantiles near 0 (p = 1/2 +- 1e-4, where the
    quantile is ~3e-4 and an absolute width of 1e-13 / 3e-4 would leave ~1e-7 of it)."""
    bad = []
    for df in (0.7, 1.0, 2.0, 5.0, 30.0, 1e3):
        for p in (1e-4, 0.025, 0.3, 0.6, 0.9, 0.975, 1 - 1e-4):
            got, want = stats.t_quantile_own(p, df), float(sst.t.ppf(p, df))
            if abs(got - want) > 1e-9 * abs(want):
                bad.append((df, p, got, want))
    for df in (0.7, 1.0, 2.0):
        for p in (0.5 + 1e-4, 0.5 - 1e-4):
            got, want = stats.t_quantile_own(p, df), float(sst.t.ppf(p, df))
            if abs(got - want) > 1e-8 * abs(want):
                bad.append((df, p, got, want))
    assert not bad
    for df in (1.0, 4.0, 1e5):
        assert stats.t_quantile_own(0.5, df) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("p,df", [(0.0, 3.0), (1.0, 3.0), (-0.1, 3.0), (1.5, 3.0), (0.5, 0.0), (0.5, -2.0)])
def test_t_quantile_own_refuses_what_has_no_quantile(p, df):
    with pytest.raises(ValueError, match=rf"t_quantile needs 0 < p < 1 and df > 0 \(got p={p}, df={df}\)"):
        stats.t_quantile_own(p, df)


def test_t_quantile_and_nct_cdf_are_scipys_and_without_scipy_their_own(monkeypatch):
    """With scipy installed t_quantile and nct_cdf are its ppf and cdf; without it (an import that fails) they
    are t_quantile_own and nct_cdf_own, still within 1e-9 of scipy's values."""
    points = [(0.975, 3.0, 2.1), (0.01, 1.0, 0.3), (0.6, 7.0, 1.5)]
    want = [(float(sst.t.ppf(p, df)), float(sst.nct.cdf(p * 4, df, nc))) for p, df, nc in points]
    for (p, df, nc), (q, c) in zip(points, want):
        assert stats.t_quantile(p, df) == q and stats.nct_cdf(p * 4, df, nc) == c
    monkeypatch.setitem(sys.modules, "scipy.stats", None)  # `from scipy.stats import ...` raises ImportError
    for (p, df, nc), (q, c) in zip(points, want):
        assert stats.t_quantile(p, df) == stats.t_quantile_own(p, df) == pytest.approx(q, rel=1e-9)
        assert stats.nct_cdf(p * 4, df, nc) == stats.nct_cdf_own(p * 4, df, nc) == pytest.approx(c, abs=1e-9)


def test_own_noncentral_t_matches_scipy_over_df_nc_and_t():
    """Simpson's rule over the chi density of S: its range (a wider one for df < 4, S near 0 at df = 1), the
    density's constant and the weights 1, 4, 2, ..., 4, 1, against scipy's nct.cdf to 1e-7."""
    bad = []
    for df in (1.0, 2.0, 3.0, 3.9, 4.0, 6.0, 30.0, 500.0):
        for nc in (0.0, 0.7, 3.0, 8.0):
            for t in (-3.0, -0.5, 0.0, 1.0, 2.5, 6.0, 15.0):
                want = float(sst.nct.cdf(t, df, nc))
                if not math.isfinite(want):
                    continue
                got = stats.nct_cdf_own(t, df, nc)
                if abs(got - want) > 1e-7:
                    bad.append((t, df, nc, got, want))
    assert not bad


def test_nct_cdf_falls_back_to_its_own_where_scipy_gives_nan(monkeypatch):
    assert stats.nct_cdf(1.3, 5.0, 0.4) == float(sst.nct.cdf(1.3, 5.0, 0.4))
    monkeypatch.setattr(sst.nct, "cdf", lambda *a: float("nan"))
    assert stats.nct_cdf(1.3, 5.0, 0.4) == stats.nct_cdf_own(1.3, 5.0, 0.4)


def _power(effect: float, sd: float, n: int, alpha: float) -> float:
    """The two-sided one-sample t-test's power by scipy: P(|T| > t_{1-alpha/2}), T ~ nct(n - 1, effect sqrt(n) / sd)."""
    crit = float(sst.t.ppf(1 - alpha / 2, n - 1))
    nc = abs(effect) * math.sqrt(n) / sd
    lower = float(sst.nct.cdf(-crit, n - 1, nc))  # nan where scipy fails far in the tail: there it is < 1e-15
    return float(sst.nct.sf(crit, n - 1, nc)) + (lower if math.isfinite(lower) else 0.0)


def test_paired_power_is_scipys_two_sided_power():
    for effect, sd, n, alpha in ((0.5, 1.0, 34, 0.05), (-0.5, 1.0, 34, 0.05), (0.1, 0.3, 5, 0.01), (2.0, 1.0, 3, 0.2)):
        assert stats.paired_power(effect, sd, n, alpha) == pytest.approx(_power(effect, sd, n, alpha), abs=1e-9)
    assert stats.paired_power(0.0, 1.0, 10, 0.05) == pytest.approx(0.05, abs=1e-12)  # no effect: the test's level


@pytest.mark.parametrize(
    "sd,n,alpha,power",
    [(1.0, 2, 0.05, 0.8), (0.05, 3, 0.05, 0.8), (3.0, 40, 0.01, 0.9), (1.0, 6, 0.2, 0.5), (1e-3, 40, 0.05, 0.8)],
)
def test_detectable_effect_has_the_asked_power_to_1e_9(sd, n, alpha, power):
    """The effect at which scipy's power is `power` (an effect of sd / 2 at n = 40 needs no doubling; one of ~40 sd
    at n = 2 needs five), to 1e-9 relative: its bisection stops on a relative width, not an absolute one."""
    got = stats.detectable_effect(sd, n, alpha, power)
    assert _power(got, sd, n, alpha) == pytest.approx(power, abs=1e-8)
    lo, hi = got * (1 - 1e-7), got * (1 + 1e-7)
    assert _power(lo, sd, n, alpha) < power < _power(hi, sd, n, alpha)


@pytest.mark.parametrize("n,sd", [(1, 1.0), (0, 1.0), (2, 0.0), (5, -1.0)])
def test_detectable_effect_refuses_too_few_pairs_or_no_spread(n, sd):
    with pytest.raises(ValueError, match=rf"detectable_effect needs n >= 2 and sd > 0 \(got n={n}, sd={sd}\)"):
        stats.detectable_effect(sd, n, 0.05)


@pytest.mark.parametrize(
    "effect,sd,alpha,power",
    [
        (0.5, 1.0, 0.05, 0.8),
        (1.0, 1.0, 0.05, 0.8),
        (3.0, 1.0, 0.05, 0.8),
        (10.0, 1.0, 0.2, 0.8),
        (0.2, 1.0, 0.05, 0.9),
        (-0.7, 0.5, 0.01, 0.8),
    ],
)
def test_seeds_needed_is_the_first_n_with_the_power_by_a_scan(effect, sd, alpha, power):
    """A linear scan n = 2, 3, ... of scipy's power: the first n that reaches `power` (2 for a huge effect)."""
    n = 2
    while _power(effect, sd, n, alpha) < power:
        n += 1
    assert stats.seeds_needed(effect, sd, alpha, power) == n


def test_seeds_needed_edges():
    assert stats.seeds_needed(0.5, 0.0, 0.05) == 2  # no spread: any two pairs decide
    assert stats.seeds_needed(0.0, 1.0, 0.05) is None  # no effect: no number of pairs
    assert stats.seeds_needed(0.01, 1.0, 0.05, most=1000) is None  # 0.01 sd needs ~78,000 pairs
    n = stats.seeds_needed(0.01, 1.0, 0.05)
    assert _power(0.01, 1.0, n, 0.05) >= 0.8 > _power(0.01, 1.0, n - 1, 0.05)
    assert stats.seeds_needed(0.2, 1.0, 0.05, most=199) == 199  # the last n, found at the cap


def test_seeds_needed_stops_at_100_000_pairs_by_default():
    """An effect that 100,001 pairs detect at 80% power and 100,000 do not (scipy's power on both sides)."""
    effect = stats.detectable_effect(1.0, 100_001, 0.05) * (1 + 1e-8)
    assert _power(effect, 1.0, 100_000, 0.05) < 0.8 <= _power(effect, 1.0, 100_001, 0.05)
    assert stats.seeds_needed(effect, 1.0, 0.05) is None
    assert stats.seeds_needed(effect, 1.0, 0.05, most=100_001) == 100_001


def test_mean_interval_edges_by_hand():
    """No values: an error; one: its mean and no interval (the level kept); values all equal: a zero-width
    interval whose p-value is 0 (certain) unless they are all 0 (then 1)."""
    with pytest.raises(ValueError, match="^mean_interval of no values$"):
        stats.mean_interval([])
    one = stats.mean_interval([0.2], level=0.9)
    assert (one.n, one.mean, one.level, one.lo, one.hi, one.p, one.sd) == (1, 0.2, 0.9, None, None, None, None)
    for v, p in ((1.0, 0.0), (-0.25, 0.0), (0.0, 1.0)):
        flat = stats.mean_interval([v, v, v], level=0.8)
        assert (flat.n, flat.mean, flat.lo, flat.hi, flat.level, flat.p, flat.sd) == (3, v, v, v, 0.8, p, 0.0)
    xs = [0.03, -0.01, 0.02, 0.05]
    got = stats.mean_interval(xs, level=0.9)
    m = sum(xs) / 4
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / 3)
    half = float(sst.t.ppf(0.95, 3)) * sd / 2
    assert (got.level, got.sd, got.lo, got.hi) == (
        0.9,
        pytest.approx(sd),
        pytest.approx(m - half),
        pytest.approx(m + half),
    )


def test_pooled_sd_counts_only_lines_with_two_or_more_values_by_hand():
    assert stats.pooled_sd([(2, 0.3), (1, 0.5), (4, 0.1), (2, None)]) == pytest.approx(
        math.sqrt((1 * 0.09 + 3 * 0.01) / 4)
    )
    assert stats.pooled_sd([(1, 0.5), (0, 0.2), (2, None)]) is None
    assert stats.pooled_sd([]) is None
