"""Paired differences of a study's rows and the report's verdict lines (the rows: hld.study.results).

Paired differences are `val_loss(arm) - val_loss(baseline)` in nats, matched on configuration and
seed: negative means the arm is better; exp(difference) is the perplexity ratio. The same for each
downstream task's headline metric (downstream.json, written by the study): accuracy(arm) −
accuracy(baseline), positive meaning the arm is better. Per configuration
the mean over seeds (t-interval when > 1 seed); across configurations the mean of the per-
configuration means with a t-interval over configurations, and a count of configurations won.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from hld.study.signals import PAIRS, label
from hld.study.spec import ARMS
from hld.study.stats import (
    POWER,
    Interval,
    detectable_effect,
    holm,
    holm_levels,
    mean_interval,
    paired_power,
    pooled_sd,
    seeds_needed,
)

COMPARISONS = (("hld-joint", "kd"), ("hld-first", "kd"), ("kd", "ce"))


def higher_is_better(metric: str) -> bool:
    """val_loss and perplexities: lower is better; accuracies and the like: higher."""
    name = metric.rsplit(":", 1)[-1]
    return not (name == "val_loss" or "perplexity" in name or name == "bits_per_byte")


@dataclass
class Comparison:
    arm: str
    baseline: str
    per_config: dict[str, Interval]  # configuration (the `match` id) -> mean difference over seeds
    overall: Optional[Interval]  # over configurations (over seeds when there is one configuration)
    over: str  # "configurations" or "seeds"
    wins: int  # configurations where the arm is better (Δ < 0 for a loss, > 0 for an accuracy)
    metric: str = "val_loss"  # or "<task>:<metric>"
    view: str = "budget"  # "budget": the study's budgets as given; "flops": ce at the matched FLOPs
    accounting: str = "equal budget"  # how the two arms' compute compares, in words
    flops_ratio: Optional[float] = None  # mean FLOPs of the arm / of the baseline, over the pairs
    config_flops_ratio: dict = field(default_factory=dict)  # the same per configuration
    seed_wins: dict = field(default_factory=dict)  # configuration -> seeds where the arm is better
    diffs: dict = field(default_factory=dict)  # configuration -> the per-seed differences

    @property
    def n(self) -> int:
        return len(self.per_config)


@dataclass
class Verdict:
    """One line of a report: a comparison per configuration over its seeds (the replicates), or
    pooled over configurations when they have one seed each (labelled: not independent)."""

    comparison: Comparison
    configuration: str  # a configuration, or ALL (pooled)
    interval: Interval
    over: str  # "seeds" or "configurations"
    wins: int
    p_holm: Optional[float] = None  # Holm-adjusted over every line of the report
    power: Optional[LinePower] = None  # None for a line without an interval (n < 2) or sd 0


@dataclass(frozen=True)
class LinePower:
    """A line's power at POWER (80%), from its own n and sd (the per-pair differences' sd): the
    smallest |Δ| its two-sided paired t-test detects, at the unadjusted `alpha` and at the Holm level
    the line is tested at (alpha / (m - rank) among the report's m lines); the pairs that would decide
    the observed Δ at each; and, when the report has several lines of this kind (comparison, metric,
    accounting), the detectable effect from their pooled sd."""

    alpha: float
    holm_level: float
    mde: float
    mde_holm: float
    seeds: Optional[int]  # None: no number of pairs would (Δ = 0)
    seeds_holm: Optional[int]
    observed_power_holm: float  # the power at the Holm level if the true Δ were the observed one
    pooled_sd: Optional[float] = None
    pooled_lines: int = 0
    mde_pooled: Optional[float] = None  # at the unadjusted alpha
    mde_pooled_holm: Optional[float] = None
    underpowered: bool = False  # |Δ| < mde_holm: the line cannot tell a difference of its own size


ALL = "ALL"


def _accounting(rows: list[dict], view: str) -> str:
    if view == "flops":
        return "equal FLOPs, teacher counted"
    budgets = {r.get("budget", "") for r in rows}
    if budgets and all("tokens=" in b and "flops=" not in b for b in budgets):
        return "equal student tokens"
    if budgets and all("flops=" in b for b in budgets):
        return "equal FLOPs" + (", teacher counted" if all(r.get("budget.count_teacher", True) for r in rows) else "")
    return "equal budget"


def _view_values(rows: list[dict], view: str, metric: str) -> dict:
    """(match, seed, arm) -> (value, flops, cell, its own configuration) in a view: the budget cells; in
    the flops view each flops-matched arm's flops cells alone (a configuration whose match got none has no
    such pair: its budget cell spent other FLOPs), and the other arms' budget cells (a distilled arm spends
    its own FLOPs). A cell shared by several configurations (`serves`: grid keys its arm ignores) stands in
    each of them."""
    out = {}
    flops_arms = {r["arm"] for r in rows if r.get("accounting") == "flops"} if view == "flops" else set()
    for accounting in ("budget",) if view == "budget" else ("budget", "flops"):
        for r in rows:
            v = r.get(metric)
            if accounting == "budget" and r["arm"] in flops_arms:
                continue
            if r.get("accounting", "budget") == accounting and v is not None and math.isfinite(float(v)):
                own = r.get("match") or r["configuration"]
                for conf in [own, *(r.get("serves") or [])]:
                    out[(conf, r["seed"], r["arm"])] = (float(v), r.get("flops"), r.get("cell") or id(r), own)
    return out


def paired(rows: list[dict], comparisons=COMPARISONS, metrics: tuple[str, ...] = ("val_loss",)) -> list[Comparison]:
    """Comparisons whose two arms both ran in at least one (configuration, seed), per metric and view:
    Δ = metric(arm) − metric(baseline). The flops view (when the study ran flops-matched cells) adds
    only the comparisons whose cells differ from the budget view's."""
    views = ["budget"] + (["flops"] if any(r.get("accounting") == "flops" for r in rows) else [])
    flops_arms = {r["arm"] for r in rows if r.get("accounting") == "flops"}
    out = []
    for view in views:
        for metric in metrics:
            value = _view_values(rows, view, metric)
            for arm, base in comparisons:
                if view == "flops" and not ({arm, base} & flops_arms):
                    continue  # the same cells as in the budget view
                diffs: dict[str, list[float]] = {}
                ratios: dict[str, list[float]] = {}
                seen: set[tuple[str, str]] = set()  # (cell, baseline cell): a pair counts once
                for (conf, seed, a), (v, fl, cell, own) in sorted(value.items()):
                    if a == arm and (conf, seed, base) in value:
                        bv, bfl, bcell, _ = value[(conf, seed, base)]
                        if (cell, bcell) in seen:  # both cells shared by this configuration and another
                            continue
                        seen.add((cell, bcell))
                        # a pair is named by the arm's cell (a lens cell serving three normalisations is
                        # "loss=lens", not the first of them); a baseline serving many does not rename it
                        diffs.setdefault(own, []).append(v - bv)
                        if fl and bfl:
                            ratios.setdefault(own, []).append(fl / bfl)
                if not diffs:
                    continue
                used = [r for r in rows if r["arm"] in (arm, base) and r.get("accounting", "budget") == "budget"]
                out.append(make_comparison(arm, base, diffs, ratios, metric=metric, view=view, used=used))
    return out


def make_comparison(
    arm: str,
    baseline: str,
    diffs: dict[str, list[float]],
    ratios: dict[str, list[float]],
    *,
    metric: str,
    view: str,
    used: list[dict],
) -> Comparison:
    """A Comparison from its per-configuration paired differences (and FLOP ratios): the mean over
    seeds per configuration, over configurations (over seeds when there is one), wins. `used`: the
    budget rows of its two sides, which name the accounting."""
    better = (lambda d: d > 0) if higher_is_better(metric) else (lambda d: d < 0)
    per = {conf: mean_interval(d) for conf, d in diffs.items()}
    if len(per) > 1:
        overall, over = mean_interval([i.mean for i in per.values()]), "configurations"
    else:
        overall, over = next(iter(per.values())), "seeds"
    return Comparison(
        arm=arm,
        baseline=baseline,
        per_config=per,
        overall=overall,
        over=over,
        wins=sum(better(i.mean) for i in per.values()),
        metric=metric,
        view=view,
        accounting=_accounting(used, view),
        flops_ratio=_mean([x for r in ratios.values() for x in r]),
        config_flops_ratio={c: _mean(r) for c, r in ratios.items()},
        seed_wins={c: sum(better(x) for x in d) for c, d in diffs.items()},
        diffs=diffs,
    )


def _mean(xs: list[float]) -> Optional[float]:
    return sum(xs) / len(xs) if xs else None


def verdicts(comparisons: list[Comparison]) -> list[Verdict]:
    """The report's lines, Holm-adjusted together: per configuration over seeds when every
    configuration of the comparison has >= 2 seeds; otherwise one line pooled over configurations."""
    lines = []
    for c in comparisons:
        if all(i.n >= 2 for i in c.per_config.values()):
            lines += [Verdict(c, conf, i, "seeds", c.seed_wins.get(conf, 0)) for conf, i in c.per_config.items()]
        else:
            lines.append(
                Verdict(
                    c,
                    ALL,
                    c.overall,
                    c.over,
                    c.wins if c.over == "configurations" else next(iter(c.seed_wins.values()), 0),
                )
            )
    for v, p in zip(lines, holm([v.interval.p for v in lines])):
        v.p_holm = p
    add_power(lines)
    return lines


def _kind(v: Verdict) -> tuple:
    c = v.comparison
    return (c.arm, c.baseline, c.metric, c.accounting, c.view)


def add_power(lines: list[Verdict], alpha: float = 0.05) -> None:
    """Each line's LinePower (the Holm levels over all the lines; pooled sd over the lines of a kind)."""
    levels = holm_levels([v.interval.p for v in lines], alpha)
    kinds: dict = {}
    for v in lines:
        if v.interval.has_ci:
            kinds.setdefault(_kind(v), []).append((v.interval.n, v.interval.sd))
    for v, level in zip(lines, levels):
        i = v.interval
        if level is None or not (i.sd or 0) > 0:
            continue
        group = kinds.get(_kind(v), [])
        pooled = pooled_sd(group) if len(group) > 1 else None
        mde_holm = detectable_effect(i.sd, i.n, level)
        v.power = LinePower(
            alpha=alpha,
            holm_level=level,
            mde=detectable_effect(i.sd, i.n, alpha),
            mde_holm=mde_holm,
            seeds=seeds_needed(i.mean, i.sd, alpha),
            seeds_holm=seeds_needed(i.mean, i.sd, level),
            observed_power_holm=paired_power(i.mean, i.sd, i.n, level),
            pooled_sd=pooled,
            pooled_lines=len(group) if pooled is not None else 0,
            mde_pooled=detectable_effect(pooled, i.n, alpha) if pooled else None,
            mde_pooled_holm=detectable_effect(pooled, i.n, level) if pooled else None,
            underpowered=abs(i.mean) < mde_holm,
        )


def verdict_line(v: Verdict, *, level: float = 0.05) -> str:
    """One generated sentence; the numbers are the only content (the tests parse them back)."""
    c, i = v.comparison, v.interval
    loss = c.metric == "val_loss"
    what = "val loss" if loss else c.metric.split(":", 1)[1]
    unit = " nats" if loss else ""
    digits = 4 if loss else 3
    on = "" if loss else f" on {c.metric.split(':', 1)[0]}"
    where = f" ({v.configuration})" if v.configuration != ALL and len(c.per_config) > 1 else ""
    units = "seed" if v.over == "seeds" else "configuration"
    ratio_of = c.config_flops_ratio.get(v.configuration, c.flops_ratio)  # this line's pairs (pooled: all)
    flops = f"; FLOPs ×{ratio_of:.3f} of {c.baseline}'s" if ratio_of is not None else ""
    head = (
        f"**{c.arm} vs {c.baseline}{on}, {c.accounting}**{where}{flops}: {c.arm} better in {v.wins} of "
        f"{i.n} {units}{'s' if i.n != 1 else ''}; mean Δ {what} {i.mean:+.{digits}f}{unit}"
    )
    ratio = f", val ppl ratio {math.exp(i.mean):.4f}" if loss else ""
    up = higher_is_better(c.metric)
    if not i.has_ci:
        why = "one configuration and one seed" if v.over == "seeds" else "one value"
        return f"{head} (no interval: {why}){ratio} — a single pair cannot separate the arms from noise."
    caveat = "; configurations are not independent replicates" if v.over == "configurations" else ""
    interval = f" (unadjusted 95% CI [{i.lo:+.{digits}f}, {i.hi:+.{digits}f}] over {i.n} {v.over}{caveat}"
    if loss:
        ratio += f" ([{math.exp(i.lo):.4f}, {math.exp(i.hi):.4f}])"
    p = f"; Holm-adjusted p = {v.p_holm:.3g})" if v.p_holm is not None else ")"
    w = v.power
    n_of = f"{i.n} {units}{'s' if i.n != 1 else ''}"
    if v.p_holm is not None and v.p_holm <= level:
        winner = c.arm if (i.mean > 0) == up else c.baseline
        end = f"{winner} is better (Holm-adjusted p ≤ {level:g})"
        if w is not None and w.underpowered:
            end += (
                f", though |Δ| is below the {w.mde_holm:.3f}{unit} this line detects at {POWER:.0%} power "
                f"with {n_of}: fragile (another draw of {n_of} repeats it with {w.observed_power_holm:.0%} power)"
            )
    elif w is not None and w.underpowered:
        more = f"; {w.seeds_holm} {units}s would decide a Δ of this size" if w.seeds_holm else ""
        end = (
            f"underpowered: cannot tell differences below {w.mde_holm:.3f}{unit} with {n_of} "
            f"({POWER:.0%} power at its Holm level {w.holm_level:.3g}{more})"
        )
    else:
        end = f"no clear difference at a Holm-adjusted {level:g}"
    return f"{head}{interval}{p}{ratio} — {end}."


# ---------------------------------------------------------------- the signal lines


def base_configuration(row: dict) -> str:
    """A row's configuration without its signal: what a cell on another signal shares with it."""
    conf = row.get("match") or row["configuration"]
    tail = f"__{row['signal']}"
    return conf[: -len(tail)] if conf.endswith(tail) else conf


def signal_comparisons(rows: list[dict], metrics: tuple[str, ...] = ("val_loss",)) -> list[Comparison]:
    """One Comparison per metric, distilled arm and pair of signals (`PAIRS`) that both ran in at least
    one (configuration, seed)."""
    distilled = [r for r in rows if r.get("signal") and r.get("accounting", "budget") == "budget"]
    order = {a: i for i, a in enumerate(ARMS)}
    arms = sorted({r["arm"] for r in distilled}, key=lambda a: (order.get(a, 99), a))
    out = []
    for metric in metrics:
        value = {}  # (arm, configuration without signal, seed, signal) -> (value, flops)
        for r in distilled:
            v = r.get(metric)
            if v is not None and math.isfinite(float(v)):
                value[(r["arm"], base_configuration(r), r["seed"], r["signal"])] = (float(v), r.get("flops"))
        for arm in arms:
            for signal, baseline in PAIRS:
                diffs: dict[str, list[float]] = {}
                ratios: dict[str, list[float]] = {}
                for (a, conf, seed, s), (v, fl) in sorted(value.items()):
                    if a != arm or s != signal or (arm, conf, seed, baseline) not in value:
                        continue
                    bv, bfl = value[(arm, conf, seed, baseline)]
                    diffs.setdefault(conf, []).append(v - bv)
                    if fl and bfl:
                        ratios.setdefault(conf, []).append(fl / bfl)
                if not diffs:
                    continue
                used = [r for r in distilled if r["arm"] == arm and r["signal"] in (signal, baseline)]
                out.append(
                    make_comparison(
                        label(arm, signal),
                        label(arm, baseline),
                        diffs,
                        ratios,
                        metric=metric,
                        view="budget",
                        used=used,
                    )
                )
    return out


def is_signal_pair(c: Comparison) -> bool:
    return c.arm.endswith("]") and c.baseline.endswith("]")


def signal_note(comparisons: list[Comparison]) -> list[str]:
    """The report's paragraph on the cross-signal lines (none when the study has none)."""
    if not any(is_signal_pair(c) for c in comparisons):
        return []
    return [
        "Lines `arm[signal] vs arm[signal]` pair one arm with itself on two teacher signals — `topk` the "
        "offline top-k cache, `sampled` a cache of tokens sampled from the teacher, `online` the teacher in "
        "the loop with its full distribution — same configuration otherwise and same seed: "
        "kd[topk] vs kd[online] is the cached-KD vs full-KD cell difference. Both sides charge the teacher's "
        "forward to every token, so they are at equal student tokens and equal FLOPs; a cache's build cost "
        "is its own line of the setup.",
        "",
    ]
