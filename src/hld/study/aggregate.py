"""Rows and paired verdicts of a study, read from its run directories only.

Each `runs/<cell>/` holds config.yaml (resolved), summary.json, metrics.jsonl and the study's
cell.json (which keys were grid keys). A run directory without cell.json (e.g. copied from
`hld train`) still counts: its grid keys are then the config keys that vary across the runs.

Paired differences are `val_loss(arm) - val_loss(baseline)` in nats, matched on configuration and
seed: negative means the arm is better; exp(difference) is the perplexity ratio. The same for each
downstream task's headline metric (downstream.json, written by the study): accuracy(arm) −
accuracy(baseline), positive meaning the arm is better. Per configuration
the mean over seeds (t-interval when > 1 seed); across configurations the mean of the per-
configuration means with a t-interval over configurations, and a count of configurations won.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hld.atomic import read_json_object, write_text
from hld.errors import HldError
from hld.eval.downstream import read_downstream
from hld.study.grid import CONTROLLED, LENGTH_KEYS
from hld.study.naming import configuration_id
from hld.study.signals import signal_of
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
from hld.train.loggers import read_metrics
from hld.train.rundir import read_run_config, read_summary

COMPARISONS = (("hld-joint", "kd"), ("hld-first", "kd"), ("kd", "ce"))
BASE_COLUMNS = [
    "cell",
    "configuration",
    "match",
    "accounting",
    "arm",
    "student",
    "student_params",
    "student_params_non_embedding",
]
TAIL_COLUMNS = ["seed", "steps", "tokens", "flops", "val_loss", "val_ppl", "train_seconds"]
# what ran (summary.json's `ran`: resolved dtypes, device, machine, versions); empty for a run from before it
RAN_COLUMNS = ["student_dtype", "teacher_dtype", "device", "machine", "cpu_flags", "torch", "transformers"]


@dataclass
class Table:
    rows: list[dict]
    budget_keys: list[str]  # "budget.tokens", ...
    grid_keys: list[str]  # dotted run-config keys
    pending: list[str] = field(default_factory=list)  # run directories without summary.json
    configs: dict = field(default_factory=dict)  # cell -> resolved config dict
    task_metrics: list[str] = field(default_factory=list)  # "<task>:<metric>" scored in downstream.json
    task_info: dict = field(default_factory=dict)  # "<task>:<metric>" -> {"chance", "n"} (from a cell)

    @property
    def signals_vary(self) -> bool:
        """Did the distilled runs train on several teacher signals, or a study's cells on another than the
        offline top-k cache? (A directory of `hld train` runs, all online, is not a study of signals.)"""
        seen = {r.get("signal") for r in self.rows} - {"", None}
        named = {(r.get("cell_json") or {}).get("signal") for r in self.rows} - {"topk", None}
        return len(seen) > 1 or bool(named)

    @property
    def columns(self) -> list[str]:
        tasks = [c for m in self.task_metrics for c in (m, f"{m}_stderr")]
        base = BASE_COLUMNS[:5] + ["signal"] + BASE_COLUMNS[5:] if self.signals_vary else BASE_COLUMNS
        return base + self.budget_keys + self.grid_keys + TAIL_COLUMNS + RAN_COLUMNS + tasks


def task_metric(task: str, row: dict) -> str:
    """The column a downstream.json row fills: `<task>:<metric>` (e.g. hld_mc:acc)."""
    return f"{task}:{row['metric']}"


def higher_is_better(metric: str) -> bool:
    """val_loss and perplexities: lower is better; accuracies and the like: higher."""
    name = metric.rsplit(":", 1)[-1]
    return not (name == "val_loss" or "perplexity" in name or name == "bits_per_byte")


def get_dotted(cfg: dict, dotted: str) -> Any:
    """cfg["a"]["b"] for "a.b": a resolved config's value by its dotted key."""
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


def _leaves(cfg: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in cfg.items():
        if isinstance(v, dict):
            out.update(_leaves(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _final_val(summary: dict, run_dir: Path) -> tuple[float, float]:
    """val/loss from summary.json, else the last validation line of metrics.jsonl."""
    if "val/loss" in summary:
        return summary["val/loss"], summary.get("val/ppl", math.exp(summary["val/loss"]))
    vals = [m for m in read_metrics(run_dir) if "val/loss" in m]
    if not vals:
        return math.nan, math.nan
    return vals[-1]["val/loss"], vals[-1].get("val/ppl", math.exp(vals[-1]["val/loss"]))


def collect(study_dir: Path) -> Table:
    runs_dir = Path(study_dir) / "runs"
    found, pending = [], []
    for run_dir in sorted(p for p in runs_dir.glob("*") if p.is_dir()) if runs_dir.is_dir() else []:
        if not (run_dir / "summary.json").exists():
            pending.append(run_dir.name)
            continue
        retrain = f"delete {run_dir} and rerun the study to train that cell again"
        cfg = read_run_config(run_dir / "config.yaml") if (run_dir / "config.yaml").exists() else None
        if cfg is None:
            raise HldError(f"{run_dir} has a summary.json but no hld run config (config.yaml)", retrain)
        has_cell = (run_dir / "cell.json").exists()
        cell = read_json_object(run_dir / "cell.json", "cell record", retrain) if has_cell else None
        summary = read_summary(run_dir, retrain)
        if cell is not None and not (
            isinstance(cell.get("configuration"), str) and isinstance(cell.get("budget"), dict)
        ):
            raise HldError(f"cell record {run_dir / 'cell.json'} is damaged (no configuration or budget)", retrain)
        if cell is not None and not isinstance(cell.get("signal", ""), (str, type(None))):
            raise HldError(f"cell record {run_dir / 'cell.json'} is damaged (its signal is not a name)", retrain)
        found.append((run_dir, cfg, summary, cell))
    scores = {run_dir.name: read_downstream(run_dir) for run_dir, *_ in found}
    task_info = {
        task_metric(t, r): {"chance": r.get("chance"), "n": r.get("n")} for d in scores.values() for t, r in d.items()
    }
    task_metrics = list(task_info)
    budget_keys = sorted({f"budget.{k}" for _, cfg, _, _ in found for k in cfg["budget"]})
    grid_keys = _grid_keys(found)
    # without cell.json a budget is named by its length keys and whatever else varies across the runs
    leaves = [_leaves(cfg) for _, cfg, _, _ in found]
    naming = [
        k for k in budget_keys if k.split(".", 1)[1] in LENGTH_KEYS or len({json.dumps(lv.get(k)) for lv in leaves}) > 1
    ]
    rows, configs = [], {}
    for run_dir, cfg, summary, cell in found:
        row = _row(run_dir, cfg, summary, cell, naming, grid_keys)
        for t, r in scores[run_dir.name].items():
            row[task_metric(t, r)], row[f"{task_metric(t, r)}_stderr"] = r["value"], r.get("stderr")
        rows.append(row)
        configs[row["cell"]] = cfg
    rows.sort(key=lambda r: (r["configuration"], r["seed"], r["arm"]))
    return Table(
        rows=rows,
        budget_keys=budget_keys,
        grid_keys=grid_keys,
        pending=pending,
        configs=configs,
        task_metrics=task_metrics,
        task_info=task_info,
    )


def _grid_keys(found: list) -> list[str]:
    keys: list[str] = []
    for _, _, _, cell in found:
        for k in (cell or {}).get("grid", {}):
            if k not in keys:
                keys.append(k)
    if any(cell is None for *_, cell in found):  # infer: config keys that vary across the runs
        leaves = [_leaves(cfg) for _, cfg, _, _ in found]
        skip = set(CONTROLLED)
        for k in leaves[0] if leaves else []:
            if (
                k not in skip
                and not k.startswith("budget.")
                and k not in keys
                and len({json.dumps(lv.get(k), sort_keys=True) for lv in leaves}) > 1
            ):
                keys.append(k)
    return keys


def _row(
    run_dir: Path, cfg: dict, summary: dict, cell: Optional[dict], naming: list[str], grid_keys: list[str]
) -> dict:
    student, seed, arm = cfg["student"]["preset"], cfg["train"]["seed"], cfg["objective"]["method"]
    point = {k: get_dotted(cfg, k) for k in grid_keys}
    accounting, match = "budget", None
    if cell is not None:
        configuration, budget = cell["configuration"], cell["budget"]
        accounting, match = cell.get("accounting", "budget"), cell.get("match")
        if cell.get("flops_of") and "flops" in budget:  # a label naming what it matches
            budget = {f"{cell['flops_of'].rsplit('__', 1)[-1]}'s flops": budget["flops"]}
    else:
        budget = {k.split(".", 1)[1]: get_dotted(cfg, k) for k in naming}
        budget = {k: v for k, v in budget.items() if v is not None}
        configuration = configuration_id(student, budget, point)
    val_loss, val_ppl = _final_val(summary, run_dir)
    row = {
        "cell": run_dir.name,
        "configuration": configuration,
        "match": match or configuration,
        "serves": list((cell or {}).get("serves") or []),  # a label, not a results.csv column
        "accounting": accounting,
        "arm": arm,
        # the teacher signal ("" for ce); a results.csv column when the study varies it
        "signal": (cell["signal"] if cell is not None and "signal" in cell else signal_of(cfg)) or "",
        "student": student,
        "student_params": summary.get("student_params"),
        "student_params_non_embedding": summary.get("student_params_non_embedding"),
    }
    row.update({f"budget.{k}": v for k, v in cfg["budget"].items()})
    row.update(point)
    row.update(
        {
            "seed": seed,
            "steps": summary.get("steps"),
            "tokens": summary.get("tokens"),
            "flops": summary.get("flops"),
            "val_loss": val_loss,
            "val_ppl": val_ppl,
            "train_seconds": summary.get("train_seconds"),
            "cell_json": cell,
            "budget": ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in budget.items()),
        }
    )  # a label, not a results.csv column
    ran = summary.get("ran") or {}
    row.update({k: ran.get(k) for k in RAN_COLUMNS})
    return row


def _write_csv(path: Path, columns: list[str], rows: list[dict]) -> Path:
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=columns)
    w.writeheader()
    for r in rows:
        w.writerow({k: r.get(k) for k in columns})
    write_text(path, buf.getvalue())  # atomically: a reader never sees half a table
    return path


def write_results_csv(table: Table, path: Path) -> Path:
    return _write_csv(path, table.columns, table.rows)


# --------------------------------------------------------------------------- paired verdicts


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
    the flops view each arm's flops-matched cell where it has one, else its budget cell (a distilled arm
    spends its own FLOPs). A cell shared by several configurations (`serves`: grid keys its arm ignores)
    stands in each of them."""
    out = {}
    for accounting in ("budget",) if view == "budget" else ("budget", "flops"):
        for r in rows:
            v = r.get(metric)
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


POWER_COLUMNS = [
    "sd",
    "holm_level",
    "mde",
    "mde_holm",
    "seeds_needed",
    "seeds_needed_holm",
    "pooled_sd",
    "mde_pooled",
    "mde_pooled_holm",
    "underpowered",
]


def power_columns(v: Verdict) -> dict:
    """A verdict line's power, as paired.csv columns (empty where it has none)."""
    w = v.power
    if w is None:
        return {"sd": v.interval.sd}
    return {
        "sd": v.interval.sd,
        "holm_level": w.holm_level,
        "mde": w.mde,
        "mde_holm": w.mde_holm,
        "seeds_needed": w.seeds,
        "seeds_needed_holm": w.seeds_holm,
        "pooled_sd": w.pooled_sd,
        "mde_pooled": w.mde_pooled,
        "mde_pooled_holm": w.mde_pooled_holm,
        "underpowered": w.underpowered,
    }


def write_paired_csv(comparisons: list[Comparison], path: Path, lines: Optional[list[Verdict]] = None) -> Path:
    cols = [
        "comparison",
        "accounting",
        "metric",
        "configuration",
        "n",
        "over",
        "mean_diff",
        "ci_lo",
        "ci_hi",
        "p",
        "p_holm",
        "ppl_ratio",
        "flops_ratio",
        "wins",
        *POWER_COLUMNS,
    ]
    holm_of = {(id(v.comparison), v.configuration): v.p_holm for v in lines or []}
    power_of = {(id(v.comparison), v.configuration): power_columns(v) for v in lines or []}
    rows = []
    for c in comparisons:
        name = f"{c.arm} vs {c.baseline}"
        ratio = math.exp if c.metric == "val_loss" else (lambda x: None)
        common = {"comparison": name, "accounting": c.accounting, "metric": c.metric, "flops_ratio": c.flops_ratio}
        for conf, i in c.per_config.items():
            rows.append(
                {
                    **common,
                    "configuration": conf,
                    "n": i.n,
                    "over": "seeds",
                    "mean_diff": i.mean,
                    "ci_lo": i.lo,
                    "ci_hi": i.hi,
                    "p": i.p,
                    "p_holm": holm_of.get((id(c), conf)),
                    "ppl_ratio": ratio(i.mean),
                    "wins": c.seed_wins.get(conf),
                    "flops_ratio": c.config_flops_ratio.get(conf, c.flops_ratio),
                    **power_of.get((id(c), conf), {}),
                }
            )
        if len(c.per_config) > 1:
            i = c.overall
            rows.append(
                {
                    **common,
                    "configuration": ALL,
                    "n": i.n,
                    "over": c.over,
                    "mean_diff": i.mean,
                    "ci_lo": i.lo,
                    "ci_hi": i.hi,
                    "p": i.p,
                    "p_holm": holm_of.get((id(c), ALL)),
                    "ppl_ratio": ratio(i.mean),
                    "wins": c.wins,
                    **power_of.get((id(c), ALL), {}),
                }
            )
    return _write_csv(path, cols, rows)


# --------------------------------------------------------------------------- best configuration


def best_configuration(rows: list[dict], key: str = "val_loss") -> list[dict]:
    """The rows (seeds) of the configuration with the lowest seed-mean `key` among `rows`; [] if
    none is finite. The one selection rule of the report's table and its plots."""
    by_conf: dict[str, list[dict]] = {}
    for r in rows:
        if r.get(key) is not None and math.isfinite(r[key]):
            by_conf.setdefault(r["configuration"], []).append(r)
    if not by_conf:
        return []
    return min(by_conf.values(), key=lambda g: sum(r[key] for r in g) / len(g))
