"""The study's CSV files: paired.csv (a row per configuration of each comparison, with its verdict
line's Holm-adjusted p and power) and the writer it shares with results.csv (hld.study.aggregate)."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Optional

from hld.atomic import write_text
from hld.study.pairs import ALL, Comparison, Verdict


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
