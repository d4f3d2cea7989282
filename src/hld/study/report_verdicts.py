"""The report's notes and tables beside its paired verdicts: the cells left out (not finite), whether
the arms were compared at equal compute, the power of each verdict line and the per-configuration
differences."""

from __future__ import annotations

import math

from hld.study.aggregate import Table
from hld.study.pairs import Comparison
from hld.study.report_tables import arm_groups


def non_finite_notes(table) -> list[str]:
    """A line per cell whose validation loss is not a finite number (a diverged run): the comparisons
    leave it out, so without this its row would vanish from the verdicts unexplained."""
    return [
        f"**cell `{r['cell']}` ({r['arm']}) is left out of every comparison**: its validation loss is "
        f"{r['val_loss']} (not finite; the run diverged) — rerun it with a lower train.lr"
        for r in table.rows
        if not (isinstance(r.get("val_loss"), (int, float)) and math.isfinite(r["val_loss"]))
    ]


def compute_note(table: Table) -> list[str]:
    """Say, from the FLOPs, whether the arms were compared at equal compute (and, when the study ran
    ce again at a distilled arm's FLOPs, how close that match is)."""
    groups = arm_groups(table)
    ratios = {}
    for (student, budget, arm), rows in groups.items():
        ce = groups.get((student, budget, "ce"))
        if ce and arm != "ce" and rows[0].get("accounting", "budget") == "budget":
            ratio = (sum(r["flops"] for r in rows) / len(rows)) / (sum(r["flops"] for r in ce) / len(ce))
            ratios.setdefault(arm, []).append(ratio)
    if not ratios:
        return []
    spread = max(abs(x - 1) for v in ratios.values() for x in v)
    if spread <= 0.01:
        return ["The arms' training FLOPs agree within 1% of the ce arm's: they are compared at equal compute.", ""]
    parts = [f"{arm} ×{min(v):.3f}" + (f"–{max(v):.3f}" if max(v) - min(v) > 5e-4 else "") for arm, v in ratios.items()]
    by_cell = {r["cell"]: r for r in table.rows}
    matched = [
        abs(r["flops"] / by_cell[m["flops_of"]]["flops"] - 1)
        for r in table.rows
        if (m := r.get("cell_json") or {}).get("flops_of") in by_cell
    ]
    if matched:
        return [
            f"At the study's budgets the arms are **not** FLOP-matched (training FLOPs relative to ce: "
            f"{', '.join(parts)}, the teacher counted); the ce cells rerun at the distilled arm's FLOPs match "
            f"them within {100 * max(matched):.2f}%, and the equal-FLOPs lines compare those.",
            "",
        ]
    return [
        f"The arms are **not** FLOP-matched (training FLOPs relative to ce: {', '.join(parts)}); "
        "the verdicts compare them at the budget listed, not at equal compute.",
        "",
    ]


def power_table(verdicts: list) -> list[str]:
    """Per verdict line: n, the paired differences' sd, the smallest |Δ| its two-sided paired t-test
    detects at 80% power (unadjusted alpha, and the Holm level the line is tested at), the same from the
    pooled sd of the report's lines of its kind where there are several, and the seeds that would
    decide the observed Δ."""
    rows = [v for v in verdicts if v.power is not None]
    if not rows:
        return []
    pooled = any(v.power.pooled_sd is not None for v in rows)
    lines = [
        "Power of each line (two-sided paired t-test, 80% power; sd of the per-seed differences; "
        "the seeds that would decide the observed |Δ| at 80% power):",
        "",
        "| comparison | accounting | metric | configuration | n | \\|Δ\\| | sd | Holm level | detectable at 0.05 | "
        "detectable at Holm level | seeds to decide at 0.05 | at Holm level |"
        + (" pooled sd (lines) | detectable, pooled sd (0.05 / Holm) |" if pooled else ""),
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---|" if pooled else ""),
    ]
    for v in rows:
        c, i, w = v.comparison, v.interval, v.power
        loss = c.metric == "val_loss"
        extra = ""
        if pooled:
            extra = (
                f" {w.pooled_sd:.4f} ({w.pooled_lines}) | {w.mde_pooled:.4f} / {w.mde_pooled_holm:.4f} |"
                if w.pooled_sd is not None
                else " — | — |"
            )
        lines.append(
            f"| {c.arm} vs {c.baseline} | {c.accounting} | {'val loss (nats)' if loss else c.metric} | "
            f"{v.configuration} | {i.n} | {abs(i.mean):.4f} | {i.sd:.4f} | {w.holm_level:.4g} | {w.mde:.4f} | "
            f"{w.mde_holm:.4f}{' (underpowered)' if w.underpowered else ''} | {w.seeds or '—'} | "
            f"{w.seeds_holm or '—'} |" + extra
        )
    return lines + [""]


def per_config_table(comparisons: list[Comparison]) -> list[str]:
    if not comparisons or all(c.n == 1 for c in comparisons):  # the verdict lines say it all
        return []
    lines = [
        "Per configuration (mean over seeds; unadjusted intervals):",
        "",
        "| comparison | accounting | metric | configuration | seeds | Δ | 95% CI | ppl ratio |",
        "|---|---|---|---|---:|---:|---|---:|",
    ]
    for c in comparisons:
        loss = c.metric == "val_loss"
        d = 4 if loss else 3
        for conf, i in c.per_config.items():
            ci = f"[{i.lo:+.{d}f}, {i.hi:+.{d}f}]" if i.has_ci else "—"
            ratio = f"{math.exp(i.mean):.4f}" if loss else "—"
            lines.append(
                f"| {c.arm} vs {c.baseline} | {c.accounting} | {'val loss (nats)' if loss else c.metric} | "
                f"{conf} | {i.n} | "
                f"{i.mean:+.{d}f} | {ci} | {ratio} |"
            )
    return lines + [""]
