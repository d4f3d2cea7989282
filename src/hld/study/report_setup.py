"""The report's setup section: teacher, data, seeds and grid, downstream tasks, what ran (machine,
versions, precision), the reference and cache lines, the students' shapes, the compute per arm and the
signal-fidelity rows."""

from __future__ import annotations

from hld.errors import HldError
from hld.study.aggregate import Table, get_dotted
from hld.study.fidelity import fidelity_rows
from hld.study.report_tables import arm_groups, task_score, unique


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
        lines += [
            f"- **Downstream tasks**: the teacher only ({teacher}). The students are not scored: at "
            "this size and budget they sit at or above the unigram's loss, where zero-shot accuracy is at "
            "chance for every arm, so the tasks cannot separate the arms."
        ]
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
    from hld.models.student import resolve_shape

    try:
        s = resolve_shape(StudentConfig(**cfg["student"]))
    except (HldError, TypeError):
        return "?"
    return f"{s.n_layers} × {s.d_model}"
