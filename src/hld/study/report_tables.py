"""The report's tables of numbers: the per-arm summary (what `hld run` prints), the results table
(one row per cell, with the reference rows) and the helpers they share: the rows grouped by
student, budget and arm, and the task scores' formatting."""

from __future__ import annotations

import math

from hld.study.aggregate import Table, best_configuration, task_metric
from hld.study.signals import arm_label
from hld.study.spec import ARMS


def reference_levels(meta: dict) -> list[tuple[str, float]]:
    """(label, validation loss) of the reference rows, for the plots' horizontal lines."""
    out = [(f"teacher {r['model']}", r["val_loss"]) for r in meta.get("teacher_reference") or []]
    out += [(f"{r['model']} ({_fit_label(r)})", r["val_loss"]) for r in meta.get("ngram_reference") or []]
    return out


def _fit_label(r: dict) -> str:
    if r["fit"] == "train split":
        return "whole train split"
    return f"{r['fit_tokens']:,} tokens read" if r.get("fit_tokens") else r["fit"]


def best_table(table: Table, reference: list[dict], ngrams: list[dict] = ()) -> list[str]:
    """Per student, budget and arm: the mean over seeds (± their standard deviation) of its best grid
    point (lowest seed-mean validation loss: with one grid point, no selection), with the arm's
    tokens and FLOPs; then the reference rows. What `hld run` prints."""
    tasks = table.task_metrics
    lines = [
        "| student | budget | arm | grid point | seeds | train tokens | train FLOPs | val loss | ± sd | val ppl |"
        + "".join(f" {m} |" for m in tasks),
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(tasks),
    ]
    for (student, budget, arm), rows in arm_groups(table).items():
        best = best_configuration(rows)
        if not best:
            continue
        losses = [r["val_loss"] for r in best]
        loss = sum(losses) / len(losses)
        sd = math.sqrt(sum((x - loss) ** 2 for x in losses) / (len(losses) - 1)) if len(losses) > 1 else None
        point = ", ".join(f"{k.rsplit('.', 1)[-1]}={best[0][k]}" for k in table.grid_keys) or "—"
        lines.append(
            f"| {student} | {budget} | {arm} | {point} | {len(best)} | "
            f"{sum(r['tokens'] for r in best) / len(best):,.0f} | {best[0]['flops']:.4g} | {loss:.4f} | "
            f"{'—' if sd is None else f'{sd:.4f}'} | {math.exp(loss):.2f} |"
            + "".join(f" {_score(best, m)} |" for m in tasks)
        )
    pad = " — | — | — | — | — | — |"
    for ref in reference:
        scores = {task_metric(t, r): r for t, r in (ref.get("tasks") or {}).items()}
        lines.append(
            f"| teacher `{ref['model']}` |{pad} {ref['val_loss']:.4f} | — | {ref['val_ppl']:.2f} |"
            + "".join(
                f" {_fmt_score(scores[m]['value'], scores[m].get('stderr'))} |" if m in scores else " — |"
                for m in tasks
            )
        )
    for r in ngrams:
        seeds = f", mean of {r['seeds']} seeds" if r.get("seeds", 1) > 1 else ""
        lines.append(
            f"| {r['model']}: {_fit_label(r)}{seeds} |{pad} {r['val_loss']:.4f} | — | "
            f"{math.exp(r['val_loss']):.2f} |" + " — |" * len(tasks)
        )
    return lines


def task_score(task: str, r: dict) -> str:
    """`hld_mc acc 0.750 ± 0.069 (chance 0.250)`: one task's headline score."""
    chance = f" (chance {r['chance']:.3f})" if r.get("chance") is not None else ""
    return f"{task} {r['metric']} {_fmt_score(r['value'], r.get('stderr'))}{chance}"


def _fmt_score(value: float, stderr) -> str:
    return f"{value:.3f} ± {stderr:.3f}" if stderr is not None else f"{value:.3f}"


def _score(rows: list[dict], metric: str) -> str:
    """A task metric over a configuration's seeds: the value ± its stderr (one seed), or the mean."""
    vals = [r[metric] for r in rows if r.get(metric) is not None]
    if not vals:
        return "—"
    if len(vals) == 1:
        return _fmt_score(vals[0], rows[0].get(f"{metric}_stderr"))
    return f"{sum(vals) / len(vals):.3f} (mean of {len(vals)})"


def unique(table: Table, key: str) -> list:
    out = []
    for r in table.rows:
        if r[key] not in out:
            out.append(r[key])
    return out


def arm_groups(table: Table) -> dict:
    """Rows by (student, budget, arm), arms in the order ce, kd, hld-joint, hld-first; a distilled arm
    per teacher signal (`kd[online]`) when the study varies it."""
    out: dict = {}
    order = {a: i for i, a in enumerate(ARMS)}
    vary = table.signals_vary
    for r in sorted(
        table.rows,
        key=lambda r: (
            r["student"],
            r.get("accounting", "budget") != "budget",
            r["budget"],
            order.get(r["arm"], 99),
            r["arm"],
            r.get("signal") or "",
        ),
    ):
        out.setdefault((r["student"], r["budget"], arm_label(r, vary)), []).append(r)
    return out


def results_table(table: Table, reference: list[dict], ngrams: list[dict] = ()) -> list[str]:
    grid, tasks = table.grid_keys, table.task_metrics
    head = ["student", "budget", *grid, "seed", "arm", "tokens", "FLOPs", "val loss", "val ppl", "train s", *tasks]
    lines = [
        "| " + " | ".join(head) + " |",
        "|" + "---|" * 2 + "---:|" * len(grid) + "---:|---|" + "---:|" * (5 + len(tasks)),
    ]
    for r in table.rows:
        cells = [
            r["student"],
            r["budget"],
            *[str(r[k]) for k in grid],
            str(r["seed"]),
            r["arm"],
            f"{r['tokens']:,}",
            f"{r['flops']:.3g}",
            f"{r['val_loss']:.4f}",
            f"{r['val_ppl']:.2f}",
            f"{r['train_seconds']:.1f}" if r["train_seconds"] is not None else "—",
            *[_score([r], m) for m in tasks],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    for ref in reference:
        scores = {task_metric(t, v): v for t, v in (ref.get("tasks") or {}).items()}
        cells = [
            f"teacher `{ref['model']}`",
            "—",
            *["—"] * len(grid),
            "—",
            "teacher",
            "—",
            "—",
            f"{ref['val_loss']:.4f}",
            f"{ref['val_ppl']:.2f}",
            "—",
            *[_fmt_score(scores[m]["value"], scores[m].get("stderr")) if m in scores else "—" for m in tasks],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    for r in ngrams:
        cells = [
            f"{r['model']}: {_fit_label(r)}",
            "—",
            *["—"] * len(grid),
            str(r.get("seeds", 1)),
            r["model"],
            f"{r['fit_tokens']:,}" if r.get("fit_tokens") else "all",
            "—",
            f"{r['val_loss']:.4f}",
            f"{math.exp(r['val_loss']):.2f}",
            "—",
            *["—"] * len(tasks),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]
