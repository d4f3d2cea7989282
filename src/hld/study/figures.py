"""The study report's plots, drawn from results rows and run directories (metrics.jsonl) only:
validation loss against training FLOPs, training curves, and the paired differences."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import numpy as np

from hld.atomic import read_json_object
from hld.errors import HldError
from hld.study.pairs import Comparison, higher_is_better
from hld.study.results import Table, best_configuration
from hld.study.signals import arm_label
from hld.study.spec import ignores
from hld.train.loggers import read_metrics

ALL = "mean over configurations"
COLORS = {"ce": "#7f7f7f", "kd": "#1f77b4", "hld-joint": "#d62728", "hld-first": "#2ca02c", "teacher": "#000000"}
MARKERS = {"ce": "o", "kd": "s", "hld-joint": "^", "hld-first": "v"}
SIGNAL_MARKERS = {"topk": "s", "sampled": "D", "online": "P"}  # an arm on several signals: one marker each


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _students(table: Table) -> list[str]:
    by_size: dict[str, int] = {}
    for r in table.rows:
        by_size.setdefault(r["student"], r["student_params_non_embedding"] or 0)
    return sorted(by_size, key=lambda s: (by_size[s], s))


def _arms(table: Table) -> list[str]:
    order = list(COLORS)
    return sorted({r["arm"] for r in table.rows}, key=lambda a: (order.index(a) if a in order else 99, a))


def _student_title(table: Table, student: str) -> str:
    r = next(r for r in table.rows if r["student"] == student)
    n = r["student_params_non_embedding"]
    return f"student {student}" + (f" ({n / 1e3:,.0f}k non-embedding params)" if n else "")


def _student_panels(table: Table, *, width: float, height: float):
    """A row of panels sharing the y axis, one per student (smallest first): (fig, axes, students, arms)."""
    students = _students(table)
    fig, axes = _plt().subplots(
        1, len(students), figsize=(width * len(students) + 0.6, height), squeeze=False, sharey=True
    )
    return fig, axes, students, _arms(table)


def _fit_y(ax, lows: list[float], highs: list[float], *, pad: float) -> None:
    """y limits from the values worth seeing (not a curve's first, ln V-high steps), padded by a share."""
    if lows:
        margin = pad * (max(highs) - min(lows) + 1e-9)
        ax.set_ylim(min(lows) - margin, max(highs) + margin)


def plot_loss_vs_flops(
    table: Table,
    study_dir: Path,
    out: Path,
    *,
    reference: Sequence[dict] = (),
    levels: Sequence[tuple[str, float]] = (),
) -> Path:
    """One panel per student. Per arm: the training loss (train/ce) of its best grid point against
    cumulative training FLOPs as a line, its final validation loss as a large marker at the FLOPs it
    spent (joined across budgets), and every cell's validation loss as a small dot. At equal FLOPs
    the markers stand in one column, so their vertical order is the verdict. The teacher's validation
    loss and the count-based models' (`levels`) are horizontal lines."""
    fig, axes, students, arms = _student_panels(table, width=5.4, height=4.6)
    lows, highs = [], []
    for ax, student in zip(axes[0], students):
        flops = [r["flops"] for r in table.rows if r["student"] == student]
        wide = max(flops) / max(min(flops), 1e-30) > 10
        vary = table.signals_vary  # one marker line per arm on each signal (kd[topk], kd[online], ...)
        names = [(a, n) for a in arms for n in sorted({arm_label(r, vary) for r in table.rows if r["arm"] == a})]
        for arm, name in names:
            rows = [
                r
                for r in table.rows
                if r["student"] == student and arm_label(r, vary) == name and math.isfinite(r["val_loss"])
            ]
            if not rows:
                continue
            color = COLORS.get(arm)
            marker = MARKERS.get(arm, "o") if name == arm else SIGNAL_MARKERS.get(rows[0]["signal"], "o")
            ax.scatter(
                [r["flops"] for r in rows],
                [r["val_loss"] for r in rows],
                s=14,
                alpha=0.35,
                color=color,
                marker=marker,
                linewidths=0,
            )
            best = _best_per_budget(rows, table.budget_keys)
            ax.plot(
                [b[0] for b in best],
                [b[1] for b in best],
                marker=marker,
                ms=9,
                color=color,
                lw=1.5,
                label=f"{name}: val {best[-1][1]:.3f}",
                zorder=3,
            )
            lows += [b[1] for b in best]
            highs += [r["val_loss"] for r in rows]
            curve = _train_curve(Path(study_dir) / "runs" / best[-1][2], "flops")
            if curve is not None:
                ax.plot(*curve, color=color, alpha=0.55, lw=1)
                lows.append(float(np.min(curve[1])))
                highs.append(float(np.max(curve[1][len(curve[1]) // 5 :])))
        if wide:
            ax.set_xscale("log")
        else:
            ax.set_xlim(0, max(flops) * 1.06)
            ax.xaxis.set_major_formatter(_sci_formatter())
        _levels(ax, list(levels), lows, highs)
        ax.set_xlabel("training FLOPs" + (" (log scale)" if wide else "") + "; line: train/ce of the best cell")
        ax.set_title(_student_title(table, student), fontsize=10)
        ax.grid(alpha=0.3, which="both")
        _legend_below(ax, title="arm (mean over seeds) and references")
    _fit_y(axes[0][0], lows, highs, pad=0.06)
    axes[0][0].set_ylabel("loss (nats/token, lower is better)")
    title = (
        "Validation loss vs training FLOPs, teacher counted\n(markers: final validation loss, mean over "
        "seeds; small dots: cells; lines: references)"
    )
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, out / "loss_vs_flops.png")


def _legend_below(ax, *, title: str) -> None:
    """The legend under the panel, not on it: early curves start high at the left, references run the
    whole width, so no corner of the axes is free of data (`_save` keeps it in the picture)."""
    legend = ax.legend(
        title=title, fontsize=7, title_fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False
    )
    legend.set_in_layout(False)  # tight_layout would shrink the axes to fit a long legend (a signal study's 13
    # entries squashed the panel under its own x label); `_save`'s tight bounding box keeps it in the picture


def _sci_formatter():
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda x, _: "0" if x == 0 else f"{x:.2g}")


def _smooth(y: np.ndarray, k: int) -> np.ndarray:
    if len(y) < k or k <= 1:
        return y
    return np.convolve(y, np.ones(k) / k, mode="valid")


def _train_curve(run_dir: Path, x_key: str) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """(x, train/ce) of a run, smoothed on long runs. A last step cut short by the budget (fewer
    positions than the others) is left out: its loss over a few positions per window is noise."""
    pts = [(m[x_key], m["train/ce"], m["tokens"]) for m in read_metrics(run_dir) if "train/ce" in m]
    if len(pts) >= 3 and pts[-1][2] - pts[-2][2] < pts[-2][2] - pts[-3][2]:
        pts = pts[:-1]
    if len(pts) < 2:
        return None
    x, y = np.asarray([p[0] for p in pts], dtype=float), np.asarray([p[1] for p in pts], dtype=float)
    k = max(1, len(y) // 20)
    return (x[k - 1 :], _smooth(y, k)) if k > 1 else (x, y)


def _best_per_budget(rows: list[dict], budget_keys: list[str]) -> list[tuple[float, float, str]]:
    """(mean FLOPs, val loss, a cell) of the configuration with the lowest seed-mean loss, per budget
    (the flops-matched cells are a budget of their own)."""
    by_budget: dict[tuple, list[dict]] = {}
    for r in rows:
        by_budget.setdefault((r.get("accounting"), r.get("budget"), *(r[k] for k in budget_keys)), []).append(r)
    pts = []
    for group in (best_configuration(g) for g in by_budget.values()):
        if group:
            pts.append(
                (
                    float(np.mean([r["flops"] for r in group])),
                    float(np.mean([r["val_loss"] for r in group])),
                    group[0]["cell"],
                )
            )
    return sorted(pts)


LEVEL_STYLES = {"teacher": ("#000000", "-"), "unigram": ("#8c564b", "--"), "bigram": ("#9467bd", "-.")}


def _levels(ax, levels: list[tuple[str, float]], lows: list[float], highs: list[float]) -> None:
    """Horizontal lines at the reference rows' validation losses (teacher, unigram, bigram; the
    whole-split fits solid-ish, the fits on the tokens read thinner), widening the y range to them."""
    for label, y in levels:
        kind = next((k for k in LEVEL_STYLES if label.startswith(k)), "teacher")
        color, ls = LEVEL_STYLES[kind]
        thin = "tokens read" in label
        ax.axhline(
            y, color=color, ls=ls, lw=0.8 if thin else 1.3, alpha=0.55 if thin else 0.9, label=f"{label}: {y:.3f}"
        )
        lows.append(y)
        highs.append(y)


def plot_curves(table: Table, study_dir: Path, out: Path, *, levels: Sequence[tuple[str, float]] = ()) -> Path:
    """train/ce against tokens, one panel per student: thin lines per cell, the arm's best grid point
    (lowest validation loss, its first seed) bold. At equal FLOPs, CE's line runs furthest."""
    fig, axes, students, arms = _student_panels(table, width=5.2, height=4.4)
    tops, bottoms = [], []
    for ax, student in zip(axes[0], students):
        for arm in arms:
            rows = [r for r in table.rows if r["student"] == student and r["arm"] == arm]
            finite = [r for r in rows if math.isfinite(r["val_loss"])]
            bests = {b[2] for b in _best_per_budget(finite, table.budget_keys)} if finite else set()
            for r in rows:
                curve = _train_curve(Path(study_dir) / "runs" / r["cell"], "tokens")
                if curve is None:
                    continue
                x, y = curve
                bold = r["cell"] in bests
                ax.plot(
                    x,
                    y,
                    color=COLORS.get(arm),
                    alpha=1.0 if bold else 0.25,
                    lw=2 if bold else 0.8,
                    label=f"{arm} ({_point(r, table.grid_keys)})" if bold else None,
                )
                tops.append(float(np.max(y[len(y) // 10 :])))
                bottoms.append(float(np.min(y)))
        _levels(ax, [lv for lv in levels if "tokens read" not in lv[0]], bottoms, tops)
        ax.set_xlabel("training tokens")
        ax.set_title(_student_title(table, student), fontsize=10)
        ax.grid(alpha=0.3)
        _legend_below(ax, title="bold: each budget's first seed")
    _fit_y(axes[0][0], bottoms, tops, pad=0.05)  # the first steps (ln V nats) would squash the rest
    axes[0][0].set_ylabel("train/ce (nats/token; moving average on long runs)")
    fig.suptitle("Student next-token loss during training (thin: other cells)", fontsize=11)
    fig.tight_layout()
    return _save(fig, out / "training_curves.png")


def _point(row: dict, grid_keys: list[str]) -> str:
    """The grid point of `row` as its arm reads it: a key the arm ignores (ce and the cross-tokenizer loss)
    is left out, or the cell shared by every value of it would be labelled with the first."""
    point = {k: row[k] for k in grid_keys}
    shown = [k for k in grid_keys if not ignores(row["arm"], k, point)]
    return ", ".join(f"{k.rsplit('.', 1)[-1]} {row[k]}" for k in shown) or row["configuration"]


PAIRED_COLUMNS = 4  # comparison panels a row


def plot_paired(comparisons: list[Comparison], out: Path) -> Path:
    """A grid of panels: one per comparison (hld-joint − kd, ...), at most `PAIRED_COLUMNS` a row (a signal
    study's 21 lines would be one unreadable strip), one block of rows per metric (validation loss, then each
    downstream task). Each configuration's mean difference over seeds (95% CI when > 1 seed) and, at the
    bottom, the mean over configurations with its interval; zero marked."""
    plt = _plt()
    pairs = list(dict.fromkeys((c.arm, c.baseline, c.accounting) for c in comparisons))
    metrics = list(dict.fromkeys(c.metric for c in comparisons))
    by = {(c.arm, c.baseline, c.accounting, c.metric): c for c in comparisons}
    # each panel lists its own configurations (a signal study's kd[topk] − kd[online] has other ones than
    # kd − ce: one shared list left empty rows); panels that all list the same share the y axis
    rows_of = {id(c): _paired_labels(c) for c in comparisons}
    shared = len({tuple(v) for v in rows_of.values()}) <= 1
    most = max((len(v) for v in rows_of.values()), default=1)
    ncols = max(1, min(len(pairs), PAIRED_COLUMNS))
    per = -(-len(pairs) // ncols)  # panel rows per metric
    size = (4.4 * ncols + 2.6, len(metrics) * per * max(2.0, 1.4 + 0.4 * most) + 0.9)
    fig, axes = plt.subplots(len(metrics) * per, ncols, figsize=size, squeeze=False, sharey=shared)
    for row in range(len(metrics)):  # each metric's last panel row's empty places
        for j in range(len(pairs), per * ncols):
            axes[row * per + j // ncols][j % ncols].set_visible(False)
    for row, metric in enumerate(metrics):
        labels: list[str] = []
        up = higher_is_better(metric)
        name = "validation loss (nats)" if metric == "val_loss" else metric
        for j, (arm, base, accounting) in enumerate(pairs):
            ax = axes[row * per + j // ncols][j % ncols]
            cmp = by.get((arm, base, accounting, metric))
            if cmp is None:
                ax.set_visible(False)
                continue
            color = COLORS.get(arm, "#444")
            labels = rows_of[id(cmp)]
            for y, conf in enumerate(labels):
                i = cmp.overall if conf == ALL else cmp.per_config.get(conf)
                if i is None:
                    continue
                err = [[i.mean - i.lo], [i.hi - i.mean]] if i.has_ci else None
                big = conf == ALL
                if not big and cmp.diffs.get(conf):  # each seed's difference, faint
                    ax.scatter(cmp.diffs[conf], [y + 0.12] * len(cmp.diffs[conf]), s=12, color=color, alpha=0.5)
                ax.errorbar(
                    [i.mean],
                    [y],
                    xerr=err,
                    fmt="D" if big else "o",
                    ms=8 if big else 5,
                    color=color,
                    ecolor=color,
                    capsize=3,
                    lw=1.5,
                )
            ax.axvline(0, color="black", lw=1, ls="--")
            if ALL in labels:
                ax.axhline(len(labels) - 1.5, color="#999", lw=0.6)
            ax.set_ylim(len(labels) - 0.5, -0.5)
            won = sum(cmp.seed_wins.values()) if cmp.n == 1 else cmp.wins
            of = next(iter(cmp.per_config.values())).n if cmp.n == 1 else cmp.n
            ax.set_title(
                f"{arm} − {base}, {accounting}\n{arm} better in {won} of {of}"
                f" {'seeds' if cmp.n == 1 else 'configurations'}",
                fontsize=9,
            )
            ax.set_xlabel(f"Δ {name}; {'> 0' if up else '< 0'}: {arm} better", fontsize=9)
            ax.grid(axis="x", alpha=0.3)
            lim = max(abs(v) for v in ax.get_xlim())
            ax.set_xlim(-lim, lim)
            if not shared:
                ax.set_yticks(range(len(labels)), labels, fontsize=8)
        if shared and labels:
            for r in range(row * per, (row + 1) * per):
                axes[r][0].set_yticks(range(len(labels)), labels, fontsize=8)
    seeds = max((i.n for cmp in comparisons for i in cmp.per_config.values()), default=1)
    bars = "bars: 95% t-interval over seeds" if seeds > 1 else "one seed: no interval per configuration"
    pooled = any(ALL in v for v in rows_of.values())
    tail = "; bottom: mean over configurations with its 95% t-interval" if pooled else ""
    fig.suptitle(f"Paired differences per configuration ({bars}, unadjusted; dots: seeds{tail})", fontsize=10)
    fig.tight_layout()
    return _save(fig, out / "paired_differences.png")


def _paired_labels(cmp: Comparison) -> list[str]:
    """A paired panel's rows: its configurations, then the mean over them when there are several."""
    confs = sorted(cmp.per_config)
    return confs + ([ALL] if len(confs) > 1 else [])


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    legends = [lg for lg in (ax.get_legend() for ax in fig.axes) if lg is not None]
    # legends placed outside the axes stay in, those left out of the layout (`_legend_below`) too
    extra = [*fig.get_default_bbox_extra_artists(), *legends]  # (a list given replaces the default one)
    fig.savefig(path, dpi=110, bbox_inches="tight", bbox_extra_artists=extra)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def _cka_curve(run_dir: Path, start: Optional[dict] = None) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """(tokens, mean over mapped pairs of val/cka/...) at each validation of a run; `start` (pair key ->
    CKA of the unhealed derived student, study.json's derived_reference) adds the point at 0 tokens when
    it holds every pair the run logged."""
    logged = [
        (m["tokens"], {k[len("val/cka/") :]: v for k, v in m.items() if k.startswith("val/cka/")})
        for m in read_metrics(run_dir)
        if any(k.startswith("val/cka/") for k in m)
    ]
    if not logged:
        return None
    pts = [(t, float(np.mean(list(c.values())))) for t, c in logged]
    if start and logged[0][0] > 0 and set(logged[0][1]) <= set(start):
        pts.insert(0, (0, float(np.mean([start[k] for k in logged[0][1]]))))
    return np.asarray([p[0] for p in pts], dtype=float), np.asarray([p[1] for p in pts])


def plot_cka(table: Table, study_dir: Path, out: Path, derived: Sequence[dict] = ()) -> Optional[Path]:
    """Mean linear CKA of the mapped (student, teacher) layer pairs against training tokens, one line
    per cell coloured by arm, from the unhealed student's (`derived`: study.json's derived_reference)
    for a derived student. None when no run logged val/cka (diagnostics off)."""
    start = {e["student"]: e["cka"] for e in derived if e.get("cka")}
    fig, axes, students, arms = _student_panels(table, width=5.2, height=4.2)
    drawn = False
    for ax, student in zip(axes[0], students):
        for arm in arms:
            labelled = False
            for r in (r for r in table.rows if r["student"] == student and r["arm"] == arm):
                curve = _cka_curve(Path(study_dir) / "runs" / r["cell"], start.get(student))
                if curve is None:
                    continue
                ax.plot(*curve, color=COLORS.get(arm), alpha=0.6, lw=1, marker=".", label=None if labelled else arm)
                labelled = drawn = True
        ax.set_xlabel("training tokens")
        ax.set_title(_student_title(table, student), fontsize=10)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if not drawn:
        _plt().close(fig)
        return None
    axes[0][0].set_ylabel("linear CKA, mean over mapped layer pairs")
    fig.suptitle("How teacher-like the student's mapped layers are (validation windows)", fontsize=11)
    fig.tight_layout()
    return _save(fig, out / "cka_over_training.png")


def plot_cka_matrices(table: Table, study_dir: Path, out: Path) -> Optional[Path]:
    """Heat maps of the final student-layer x teacher-layer CKA (cka.json), averaged over each arm's
    cells, one row of panels per student."""

    mats: dict[tuple[str, str], list] = {}
    for r in table.rows:
        path = Path(study_dir) / "runs" / r["cell"] / "cka.json"
        if path.exists():
            mats.setdefault((r["student"], r["arm"]), []).append(_read_cka(path))
    if not mats:
        return None
    students = [s for s in _students(table) if any(k[0] == s for k in mats)]
    arms = [a for a in _arms(table) if any(k[1] == a for k in mats)]
    plt = _plt()
    fig, axes = plt.subplots(
        len(students),
        len(arms),
        figsize=(3.6 * len(arms) + 0.8, 2.6 * len(students) + 0.6),
        squeeze=False,
        layout="constrained",
    )  # room for the suptitle and the colour bar
    for i, student in enumerate(students):
        for j, arm in enumerate(arms):
            ax = axes[i][j]
            found = mats.get((student, arm))
            if not found:
                ax.axis("off")
                continue
            m = np.mean([np.asarray(f["cka"]) for f in found], axis=0)
            im = ax.imshow(m, vmin=0, vmax=1, aspect="auto", origin="lower", cmap="viridis")
            for s_l, t_l in found[0]["pairs"]:
                ax.scatter([t_l], [s_l], marker="s", facecolors="none", edgecolors="red", s=40)
            ax.set_title(f"{student} · {arm} ({len(found)} cells)", fontsize=9)
            ax.set_yticks(range(m.shape[0]))  # layers are whole numbers (0 = embedding output)
            ax.set_xlabel("teacher layer")
            if j == 0:
                ax.set_ylabel("student layer")
    fig.colorbar(im, ax=axes, shrink=0.8, label="linear CKA")
    fig.suptitle("Final CKA, student layer x teacher layer (red: mapped pairs)", fontsize=11)
    return _save(fig, out / "cka_matrices.png")


def _read_cka(path: Path) -> dict:
    """A cell's cka.json: a matrix of numbers in [0, 1] and the mapped pairs, else one line."""
    fix = f"delete {path} (the plot shows the other cells), or rerun that cell to write it again"
    m = read_json_object(path, "layer diagnostics", fix)
    rows, pairs = m.get("cka"), m.get("pairs")
    ok = isinstance(rows, list) and rows and all(isinstance(r, list) and len(r) == len(rows[0]) for r in rows)
    ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) for r in rows for v in r)
    ok = ok and isinstance(pairs, list) and all(isinstance(p, list) and len(p) == 2 for p in pairs)
    if not ok:
        raise HldError(f"layer diagnostics {path} are damaged (no matrix of numbers and pairs)", fix)
    return m
