"""Rows of a study, read from its run directories only, and its CSV files.

Each `runs/<cell>/` holds config.yaml (resolved), summary.json, metrics.jsonl and the study's
cell.json (which keys were grid keys). A run directory without cell.json (e.g. copied from
`hld train`) still counts: its grid keys are then the config keys that vary across the runs.
results.csv holds a row per cell; paired.csv a row per configuration of each comparison, with its
verdict line's Holm-adjusted p and power (the paired differences and verdicts: hld.study.pairs).
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
from hld.study.pairs import ALL, Comparison, Verdict
from hld.study.signals import signal_of
from hld.study.spec import CONTROLLED, LENGTH_KEYS, configuration_id
from hld.train.loggers import read_metrics
from hld.train.rundir import read_run_config, read_summary

# --------------------------------------------------------------------------- CSV files


def write_csv(path: Path, columns: list[str], rows: list[dict]) -> Path:
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=columns)
    w.writeheader()
    for r in rows:
        w.writerow({k: r.get(k) for k in columns})
    write_text(path, buf.getvalue())  # atomically: a reader never sees half a table
    return path


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
    return write_csv(path, cols, rows)


# --------------------------------------------------------------------------- rows

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
RAN_COLUMNS = [
    "student_dtype",
    "teacher_dtype",
    "device",
    "machine",
    "cpu_flags",
    "cpu_kernels",
    "torch",
    "transformers",
]


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
    def per_character(self) -> bool:
        """Were the students validated in bits per character (students with their own tokenizer)?"""
        return any(r.get("val_bpc") is not None for r in self.rows)

    @property
    def columns(self) -> list[str]:
        tasks = [c for m in self.task_metrics for c in (m, f"{m}_stderr")]
        base = BASE_COLUMNS[:5] + ["signal"] + BASE_COLUMNS[5:] if self.signals_vary else BASE_COLUMNS
        tail = TAIL_COLUMNS[:6] + ["val_bpc"] + TAIL_COLUMNS[6:] if self.per_character else TAIL_COLUMNS
        return base + self.budget_keys + self.grid_keys + tail + RAN_COLUMNS + tasks


def task_metric(task: str, row: dict) -> str:
    """The column a downstream.json row fills: `<task>:<metric>` (e.g. hld_mc:acc)."""
    return f"{task}:{row['metric']}"


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
    val_bpc = summary.get("val/bpc")  # a student with its own tokenizer: bits per character
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
            "val_bpc": val_bpc,
            "train_seconds": summary.get("train_seconds"),
            "cell_json": cell,
            "budget": ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in budget.items()),
        }
    )  # a label, not a results.csv column
    ran = summary.get("ran") or {}
    row.update({k: ran.get(k) for k in RAN_COLUMNS})
    return row


def write_results_csv(table: Table, path: Path) -> Path:
    return write_csv(path, table.columns, table.rows)


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
