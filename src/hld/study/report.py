"""`hld report DIR`: report.md, results.csv, paired.csv and plots/*.png of a study, rebuilt from its
run directories alone (study.json, when present, only adds the study's name and the teacher-cache
build cost). Every sentence with a number in it is generated from the numbers.

Its parts, in this file's order: the tables of numbers (the per-arm summary `hld run` prints, the
results table with the reference rows, the rows grouped by student, budget and arm); the notes and
tables beside the paired verdicts (cells left out as not finite, whether the arms were compared at
equal compute, each verdict line's power, the per-configuration differences); the setup section
(teacher, data, seeds and grid, tasks, what ran, the reference and cache lines, the students' shapes,
the compute per arm, the signal-fidelity rows); then the report itself.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from hld.atomic import write_text
from hld.errors import HldError
from hld.study.figures import plot_cka, plot_cka_matrices, plot_curves, plot_loss_vs_flops, plot_paired
from hld.study.pairs import Comparison, paired, signal_comparisons, signal_note, verdict_line, verdicts
from hld.study.record import read_report_meta
from hld.study.references import fidelity_rows
from hld.study.results import (
    Table,
    best_configuration,
    collect,
    get_dotted,
    task_metric,
    write_paired_csv,
    write_results_csv,
)
from hld.study.signals import arm_label
from hld.study.spec import ARMS

# --------------------------------------------------------------------------- tables


def reference_levels(meta: dict) -> list[tuple[str, float]]:
    """(label, validation loss) of the reference rows, for the plots' horizontal lines (not a teacher scored on
    its own tokens where the students have theirs: nats per another token)."""
    out = [(f"teacher {r['model']}", r["val_loss"]) for r in meta.get("teacher_reference") or [] if "val_bpc" not in r]
    out += [(f"{r['model']} ({_fit_label(r)})", r["val_loss"]) for r in meta.get("ngram_reference") or []]
    return out


def _fit_label(r: dict) -> str:
    if r["fit"] == "train split":
        return "whole train split"
    return f"{r['fit_tokens']:,} tokens read" if r.get("fit_tokens") else r["fit"]


def best_table(
    table: Table, reference: list[dict], ngrams: Sequence[dict] = (), derived: Sequence[dict] = ()
) -> list[str]:
    """Per student, budget and arm: the mean over seeds (± their standard deviation) of its best grid
    point (lowest seed-mean validation loss: with one grid point, no selection), with the arm's
    tokens and FLOPs; then the reference rows. What `hld run` prints."""
    tasks, pc = table.task_metrics, table.per_character
    lines = [
        "| student | budget | arm | grid point | seeds | train tokens | train FLOPs | val loss | ± sd | val ppl |"
        + " val bits/char |" * pc
        + "".join(f" {m} |" for m in tasks),
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|" + "---:|" * (pc + len(tasks)),
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
            + (f" {sum(r['val_bpc'] for r in best) / len(best):.4f} |" if pc else "")
            + "".join(f" {_score(best, m)} |" for m in tasks)
        )
    pad = " — | — | — | — | — | — |"
    for ref in reference:
        scores = {task_metric(t, r): r for t, r in (ref.get("tasks") or {}).items()}
        # per character, the teacher's loss per token is per its own tokens: another unit than the students'
        per_token = "— | — | — |" if pc else f"{ref['val_loss']:.4f} | — | {ref['val_ppl']:.2f} |"
        lines.append(
            f"| teacher `{ref['model']}` |{pad} {per_token}"
            + "".join(f" {x} |" for x in _bpc(ref, pc))
            + "".join(
                f" {_fmt_score(scores[m]['value'], scores[m].get('stderr'))} |" if m in scores else " — |"
                for m in tasks
            )
        )
    for d in derived:
        lines.append(
            f"| {d['student']} before training (teacher blocks {d['kept']}) |{pad} {d['val_loss']:.4f} | — | "
            f"{d['val_ppl']:.4g} |" + " — |" * len(tasks)
        )
    for r in ngrams:
        seeds = f", mean of {r['seeds']} seeds" if r.get("seeds", 1) > 1 else ""
        lines.append(
            f"| {r['model']}: {_fit_label(r)}{seeds} |{pad} {r['val_loss']:.4f} | — | "
            f"{math.exp(r['val_loss']):.2f} |" + "".join(f" {x} |" for x in _bpc(r, pc)) + " — |" * len(tasks)
        )
    return lines


def recovered_table(table: Table, reference: list[dict], derived: list[dict]) -> list[str]:
    """What each arm recovered of the gap between its derived student before training and the teacher:
    (unhealed - arm) / (unhealed - teacher), the arm's mean over seeds; [] without a derived student."""
    if not derived or not reference:
        return []
    teacher = reference[0]["val_loss"]
    start = {d["student"]: d["val_loss"] for d in derived}
    rows = []
    for (student, budget, arm), group in arm_groups(table).items():
        best = best_configuration(group)
        if student not in start or not best:
            continue
        loss = sum(r["val_loss"] for r in best) / len(best)
        gap = start[student] - teacher
        rows.append(
            f"| {student} | {budget} | {arm} | {start[student]:.4f} | {loss:.4f} | {teacher:.4f} | "
            f"{(start[student] - loss) / gap:.1%} |"
        )
    if not rows:
        return []
    return [
        "What each arm recovered of the gap from its student before training (the teacher's blocks, "
        "unhealed) to the teacher: (unhealed − arm) / (unhealed − teacher), on the same validation windows.",
        "",
        "| student | budget | arm | unhealed | arm, mean over seeds | teacher | gap recovered |",
        "|---|---|---|---:|---:|---:|---:|",
        *rows,
        "",
    ]


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


def _bpc(row: dict, per_character: bool) -> list[str]:
    """The bits-per-character cell of a row, in a table of students with their own tokenizer (else none)."""
    if not per_character:
        return []
    return [f"{row['val_bpc']:.4f}" if row.get("val_bpc") is not None else "—"]


def results_table(table: Table, reference: list[dict], ngrams: Sequence[dict] = ()) -> list[str]:
    grid, tasks, pc = table.grid_keys, table.task_metrics, table.per_character
    head = ["student", "budget", *grid, "seed", "arm", "tokens", "FLOPs", "val loss", "val ppl"]
    head += ["val bits/char"] * pc + ["train s", *tasks]
    lines = [
        "| " + " | ".join(head) + " |",
        "|" + "---|" * 2 + "---:|" * len(grid) + "---:|---|" + "---:|" * (5 + pc + len(tasks)),
    ]
    for r in table.rows:
        cells = [
            r["student"],
            r["budget"],
            *[str(r[k]) for k in grid],
            str(r["seed"]),
            arm_label(r, table.signals_vary),  # kd[online] where the study varies the signal
            f"{r['tokens']:,}",
            f"{r['flops']:.3g}",
            f"{r['val_loss']:.4f}",
            f"{r['val_ppl']:.2f}",
            *_bpc(r, pc),
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
            *(["—", "—"] if pc else [f"{ref['val_loss']:.4f}", f"{ref['val_ppl']:.2f}"]),
            *_bpc(ref, pc),
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
            *_bpc(r, pc),
            "—",
            *["—"] * len(tasks),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


# --------------------------------------------------------------------------- verdict notes


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
    ratios: dict[str, list[float]] = {}
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


# --------------------------------------------------------------------------- setup section


def _values(table: Table, dotted: str) -> str:
    seen = []
    for cfg in table.configs.values():
        node = get_dotted(cfg, dotted)
        if node not in seen:
            seen.append(node)
    return ", ".join(f"`{v}`" for v in seen)


def _tasks_setup(table: Table, meta: dict) -> list[str]:
    """The setup's downstream-task line: the tasks every cell was scored on, or the teacher's scores alone."""
    lines: list[str] = []
    if table.task_metrics:
        parts = []
        for m in table.task_metrics:
            info = table.task_info[m]
            chance = f"chance {info['chance']:.3f}" if info.get("chance") is not None else "open answer: chance ≈ 0"
            parts.append(f"`{m}` ({info.get('n')} items, {chance})")
        lines += [
            "- **Downstream tasks** (lm-evaluation-harness, zero-shot, scored on every cell and the teacher): "
            + ", ".join(parts)
            + "."
        ]
    scored = (meta.get("study") or {}).get("score_students", True)
    if not table.task_metrics and any(ref.get("tasks") for ref in meta.get("teacher_reference") or []) and not scored:
        teacher = "; ".join(
            f"`{ref['model']}` " + ", ".join(task_score(t, r) for t, r in ref["tasks"].items())
            for ref in meta.get("teacher_reference") or []
            if ref.get("tasks")
        )
        unigram = min(
            (r["val_loss"] for r in meta.get("ngram_reference") or [] if r["model"] == "unigram"), default=None
        )
        above = unigram is None or min(r["val_loss"] for r in table.rows) >= unigram
        why = (
            "at this size and budget they sit at or above the unigram's loss, where zero-shot accuracy is at "
            "chance for every arm, so the tasks cannot separate the arms."
            if above
            else "`score_students: false` (each cell's scoring would cost more than its training here; "
            "`score_students=true` scores them)."
        )
        lines += [f"- **Downstream tasks**: the teacher only ({teacher}). The students are not scored: {why}"]
    return lines


def setup_section(table: Table, meta: dict) -> list[str]:
    cached = {
        cfg["teacher"]["cache"] is not None for cfg in table.configs.values() if cfg["objective"]["method"] != "ce"
    }
    source = {
        frozenset({True}): "read from an offline teacher cache (top-k logits and hidden layers)",
        frozenset({False}): "computed by the teacher online",
    }.get(frozenset(cached), "from a cache in some cells, online in others")
    lines = [
        "## Setup",
        "",
        f"- **Teacher**: {_values(table, 'teacher.model')} (dtype {_values(table, 'teacher.dtype')}); "
        f"KD/HLD signals {source}.",
        f"- **Data**: training {_values(table, 'data.train')}, validation {_values(table, 'data.validation')} "
        f"(first {_values(table, 'data.val_tokens')} tokens); windows of {_values(table, 'data.seq_len')} "
        f"tokens, batches of {_values(table, 'train.batch_size')} windows.",
        f"- **Seeds**: {', '.join(str(s) for s in sorted({r['seed'] for r in table.rows}))}; "
        f"**shared hyperparameters** (grid): "
        + ("; ".join(f"`{k}` ∈ {{{', '.join(str(v) for v in unique(table, k))}}}" for k in table.grid_keys) or "none"),
    ]
    charged = {
        cfg["budget"].get("count_teacher") for cfg in table.configs.values() if cfg["objective"]["method"] != "ce"
    }
    how = (
        "the cells' FLOPs below charge the teacher's forward to every token they read from it (budget.count_teacher)"
        if charged == {True}
        else "not counted in the cells' FLOPs below"
    )
    lines += _tasks_setup(table, meta)
    lines += ran_setup(table.rows)
    for ref in meta.get("teacher_reference") or []:
        lines += [
            f"- **Teacher reference**: `{ref['model']}` scores validation loss {ref['val_loss']:.4f} nats "
            f"(ppl {ref['val_ppl']:.2f}) on the same {ref['predictions']:,} validation predictions as the "
            "students: the floor they are distilled towards."
        ]
    for cache in (meta.get("caches") or {}).values():
        if cache.get("tokens"):
            flops = f", {cache['build_flops']:.3g} FLOPs" if cache.get("build_flops") else ""
            secs = f" in {cache['build_seconds']:.0f} s" if cache.get("build_seconds") is not None else ""
            lines += [
                f"- **Teacher cache** `{cache['dir']}`: {cache['tokens']:,} tokens{flops}{secs} — built once "
                f"and shared by the KD/HLD cells; {how}."
            ]
    lines += _student_and_compute_tables(table)
    return lines + [""] + fidelity_rows(meta.get("signal_fidelity") or [])


def _student_and_compute_tables(table: Table) -> list[str]:
    """The students' shapes and sizes, then the compute per arm (means over the arm's cells)."""
    lines = ["", "| student | blocks × width | non-embedding params | total params |", "|---|---|---:|---:|"]
    for student in sorted({r["student"] for r in table.rows}):
        r = next(r for r in table.rows if r["student"] == student)
        lines.append(
            f"| {student} | {_shape(table.configs[r['cell']])} | {r['student_params_non_embedding']:,} | "
            f"{r['student_params']:,} |"
        )
    lines += [
        "",
        "Compute per arm (means over the arm's cells):",
        "",
        "| student | budget | arm | cells | train tokens | train FLOPs | FLOPs / token | FLOPs vs ce |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for (student, budget, arm), rows in arm_groups(table).items():
        ce = arm_groups(table).get((student, budget, "ce"))
        mean_flops = sum(r["flops"] for r in rows) / len(rows)
        tokens = sum(r["tokens"] for r in rows) / len(rows)
        ratio = f"×{mean_flops / (sum(r['flops'] for r in ce) / len(ce)):.3f}" if ce else "—"
        lines.append(
            f"| {student} | {budget} | {arm} | {len(rows)} | {tokens:,.0f} | {mean_flops:.3g} | "
            f"{mean_flops / tokens:.3g} | {ratio} |"
        )
    return lines


def _cpu_note(flags: str, kernels: str) -> str:
    """A CPU row's parenthesis: its flags, and torch's kernel set where recorded (not by older runs)."""
    return f" (flags: {flags or 'none of avx2/avx512/amx'}" + (f"; torch's kernels {kernels}" if kernels else "") + ")"


def ran_setup(rows: list[dict]) -> list[str]:
    """The setup's lines on what ran (summary.json's `ran`): the machine and versions, and the resolved
    precisions, with a warning when the cells ran under different ones (their differences then mix
    the arms' effect with the floating-point path's)."""
    rows = [r for r in rows if r.get("device")]
    if not rows:
        return ["- **Ran on**: not recorded (runs written before hld recorded their precision and machine)."]
    machines = sorted(
        {
            (r["device"], r["machine"], r["cpu_flags"], r.get("cpu_kernels") or "", r["torch"], r["transformers"])
            for r in rows
        },
        key=str,
    )
    lines = [
        "- **Ran on**: "
        + "; ".join(
            f"{dev} `{m}`" + (_cpu_note(flags, kernels) if dev == "cpu" else "") + f", torch {t}, transformers {tf}"
            for dev, m, flags, kernels, t, tf in machines
        )
        + "."
    ]
    precisions: dict = {}
    for r in rows:
        precisions.setdefault(r.get("student_dtype"), set()).add(r.get("teacher_dtype"))
    teachers = sorted({t for ts in precisions.values() for t in ts if t})
    lines.append(
        f"- **Precision that ran** (resolved, not `auto`): students {', '.join(f'`{d}`' for d in sorted(precisions))}"
        + (f"; teacher {', '.join(f'`{t}`' for t in teachers)}" if teachers else "")
        + "."
    )
    mixed = len(precisions) > 1 or len(teachers) > 1 or len(machines) > 1
    if mixed:
        lines.append(
            "- **The cells did not all run under the same precision and machine** (columns `student_dtype`, "
            "`teacher_dtype` and `machine` of `results.csv`): a paired difference may be the floating-point "
            "path's, not the arm's."
        )
    return lines


def _shape(cfg: dict) -> str:
    from hld.config import StudentConfig
    from hld.config_checks import derived_depth
    from hld.models.student import resolve_shape

    n = derived_depth(str(cfg.get("student", {}).get("preset", "")))
    if n is not None:  # a student made of its teacher's blocks: the teacher's width
        return f"{n} × the teacher's width"
    try:
        s = resolve_shape(StudentConfig(**cfg["student"]))
    except (HldError, TypeError):
        return "?"
    return f"{s.n_layers} × {s.d_model}"


# --------------------------------------------------------------------------- the report


def build_report(study_dir: Path) -> dict:
    study_dir = Path(study_dir)
    table = collect(study_dir)
    if not table.rows:
        raise HldError(
            f"{study_dir} holds no finished runs (no runs/*/summary.json)",
            "point at a study directory written by `hld study`",
        )
    meta = read_report_meta(study_dir)
    metrics = ("val_loss", *table.task_metrics)
    comparisons = paired(table.rows, metrics=metrics) + signal_comparisons(table.rows, metrics=metrics)
    lines = verdicts(comparisons)
    results_csv = write_results_csv(table, study_dir / "results.csv")
    paired_csv = write_paired_csv(comparisons, study_dir / "paired.csv", lines)
    plots_dir = study_dir / "plots"
    reference = meta.get("teacher_reference") or []
    levels = reference_levels(meta)
    plots = [
        plot_loss_vs_flops(table, study_dir, plots_dir, reference=reference, levels=levels),
        plot_curves(table, study_dir, plots_dir, levels=levels),
    ]
    if comparisons:
        plots.append(plot_paired(comparisons, plots_dir))
    cka_plots = [
        p
        for p in (
            plot_cka(table, study_dir, plots_dir, meta.get("derived_reference") or []),
            plot_cka_matrices(table, study_dir, plots_dir),
        )
        if p
    ]
    plots += cka_plots
    meta = {**meta, "cka_plots": [p.name for p in cka_plots]}
    said = [verdict_line(v) for v in lines]
    derived = meta.get("derived_reference") or []
    summary = best_table(table, reference, meta.get("ngram_reference") or [], derived)
    meta = {**meta, "power_table": power_table(lines)}
    text = render(table, comparisons, said, meta, name=meta.get("name", study_dir.name), summary=summary)
    write_text(study_dir / "report.md", text)
    return {
        "report": str(study_dir / "report.md"),
        "table": "\n".join(summary),
        "results_csv": str(results_csv),
        "paired_csv": str(paired_csv),
        "plots": [str(p) for p in plots],
        "verdicts": said + non_finite_notes(table),
        "cells": len(table.rows),
        "pending": table.pending,
    }


def render(
    table: Table, comparisons: list[Comparison], verdicts: list[str], meta: dict, *, name: str, summary: list[str]
) -> str:
    lines = [f"# Study `{name}`", ""]
    done = f"{len(table.rows)} finished cells"
    if table.pending:
        done += f"; {len(table.pending)} unfinished, left out: {', '.join(table.pending)}"
    lines += [f"{done}. Generated by `hld report` from the run directories under `runs/`.", ""]
    lines += setup_section(table, meta)
    grid = any(len(unique(table, k)) > 1 for k in table.grid_keys)
    lines += ["## Per arm" + (" (best grid point)" if grid else ""), ""]
    if grid:
        lines += [
            "The grid point of each arm is **selected on the validation windows it is reported on**: its loss "
            "is optimistic (no held-out split). The paired verdicts below use every grid point, no "
            "selection.",
            "",
        ]
    lines += summary + [""]
    lines += recovered_table(table, meta.get("teacher_reference") or [], meta.get("derived_reference") or [])
    lines += _reference_note(meta)
    lines += _verdicts_section(table, comparisons, verdicts, meta)
    lines += [
        "## Results",
        "",
        "One row per cell (also in `results.csv`; the paired differences in `paired.csv`)"
        + (
            "; the teacher's row is its own score on the same validation windows and tasks, for reference."
            if meta.get("teacher_reference")
            else "."
        ),
        "",
    ]
    lines += results_table(table, meta.get("teacher_reference") or [], meta.get("ngram_reference") or [])
    return "\n".join(lines + _plots_section(comparisons, meta))


def _verdicts_section(table: Table, comparisons: list[Comparison], verdicts: list[str], meta: dict) -> list[str]:
    """The paired verdicts: how to read them, a line per verdict, the cells left out, the power table, the
    compute note and the per-configuration table."""
    lines = [
        "## Paired verdicts",
        "",
        "Δ = validation loss of the arm − validation loss of its baseline, in nats per token, paired on "
        "configuration (student, budget, shared hyperparameters) and seed; Δ < 0 means the arm is better, "
        "and the perplexity ratio is exp(Δ). Each line is one configuration over its seeds (the "
        "replicates: each seed draws its own init and batch order), or pooled over configurations "
        "when they have one seed each. Intervals are two-sided 95% Student-t intervals, **unadjusted**; "
        f"the p-values (paired t-test of Δ = 0) are **Holm-adjusted over the {len(verdicts)} lines of "
        "this report**, and a line calls a winner only when its adjusted p ≤ 0.05.",
        "",
    ]
    lines += signal_note(comparisons)
    views = sorted({c.accounting for c in comparisons})
    if len(views) > 1:
        lines += [
            "Two accountings: **equal student tokens** (every arm reads the same tokens; the teacher's "
            "forward is amortised, spent once into the shared cache) and **equal FLOPs, teacher counted** "
            "(ce reruns at the FLOPs the distilled cell spent with the teacher's forward charged to each "
            "token it supervised, so it reads several times the tokens). Comparisons whose cells are the "
            "same under both (hld-* vs kd: both read the teacher for every token) appear once, with "
            "their FLOP ratio.",
            "",
        ]
    if table.task_metrics:
        lines += [
            "Downstream tasks are paired the same way on their headline metric (accuracy: Δ > 0 means the "
            "arm is better; a perplexity: Δ < 0). The accuracies' own standard errors are in the tables "
            "below: differences smaller than about twice them are noise.",
            "",
        ]
    lines += [f"- {v}" for v in verdicts] or ["- no pair of compared arms (hld-* vs kd, kd vs ce) ran in this study"]
    lines += [f"- {n}" for n in non_finite_notes(table)]
    lines += [""] + (meta.get("power_table") or []) + compute_note(table) + per_config_table(comparisons)
    return lines


def _plots_section(comparisons: list[Comparison], meta: dict) -> list[str]:
    lines = [
        "## Plots",
        "",
        "![validation loss vs FLOPs](plots/loss_vs_flops.png)",
        "",
        "Loss against training FLOPs, one panel per student: the large marker is each arm's final "
        "validation loss at its best grid point (mean over seeds; at equal FLOPs the markers share one "
        "column), the line that cell's training loss (train/ce) as the FLOPs were spent, small dots the "
        "other cells.",
        "",
        "![training curves](plots/training_curves.png)",
        "",
        "Student next-token loss (train/ce) against training tokens (bold: each arm's best grid point; at "
        "equal FLOPs with the teacher counted, CE reads the most tokens); hld-first's curve starts after "
        "its hidden-only phase, which has no next-token loss.",
        "",
    ]
    if comparisons:
        lines += [
            "![paired differences](plots/paired_differences.png)",
            "",
            "Paired Δ validation loss per configuration, with the mean over configurations at the bottom; "
            "left of the dashed zero line the arm beat its baseline.",
            "",
        ]
    if "cka_over_training.png" in meta.get("cka_plots", []):
        lines += [
            "![CKA over training](plots/cka_over_training.png)",
            "",
            "Linear CKA between each mapped student layer and its teacher layer on validation windows (mean "
            "over pairs), at every validation: does an arm make the student more teacher-like, and does "
            "that track its validation loss? CKA needs no projector, so CE and KD runs are measured too.",
            "",
        ]
    if "cka_matrices.png" in meta.get("cka_plots", []):
        lines += [
            "![final CKA matrices](plots/cka_matrices.png)",
            "",
            "Final linear CKA of every student layer against every teacher layer (`cka.json` of each run, "
            "averaged over the arm's cells); red squares mark the mapped pairs.",
            "",
        ]
    return lines


def _reference_note(meta: dict) -> list[str]:
    ngrams = meta.get("ngram_reference") or []
    if not ngrams:
        return []
    k = ngrams[0].get("add_k")
    return [
        "Reference rows, on the same validation windows and predictions as the students (positions 1..T−1 "
        "of BOS-led windows, so a bigram's first context is BOS): the teacher, and count-based models "
        "fitted on the whole training split and on the tokens the cells read (mean over seeds) — a "
        f"unigram with add-k smoothing (k = {k}) and a Witten–Bell interpolated bigram (over that unigram; "
        "no tuned parameter). A student above the unigram row has not yet learnt the token frequencies.",
        "",
    ]
