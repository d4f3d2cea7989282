"""The study report's plots, drawn from results rows and run directories (metrics.jsonl) only:
validation loss against training FLOPs, training curves, and the paired differences."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from hld.study.aggregate import Comparison, Table
from hld.study.plots import COLORS, _smooth, read_metrics

ALL = "mean over configurations"
MARKERS = {"ce": "o", "kd": "s", "hld-joint": "^", "hld-first": "v"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _students(table: Table) -> list[str]:
    by_size = {}
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


def plot_loss_vs_flops(table: Table, out: Path) -> Path:
    """One panel per student: every cell as a dot; per arm and budget the best grid point (mean over
    seeds) as a marker, joined across budgets."""
    plt = _plt()
    students, arms = _students(table), _arms(table)
    fig, axes = plt.subplots(1, len(students), figsize=(5.2 * len(students) + 0.6, 4.4), squeeze=False,
                             sharey=True)
    for ax, student in zip(axes[0], students):
        for arm in arms:
            rows = [r for r in table.rows if r["student"] == student and r["arm"] == arm
                    and math.isfinite(r["val_loss"])]
            if not rows:
                continue
            ax.scatter([r["flops"] for r in rows], [r["val_loss"] for r in rows], s=14, alpha=0.35,
                       color=COLORS.get(arm), marker=MARKERS.get(arm, "o"), linewidths=0)
            best = _best_per_budget(rows, table.budget_keys)
            ax.plot([b[0] for b in best], [b[1] for b in best], marker=MARKERS.get(arm, "o"), ms=8,
                    color=COLORS.get(arm), label=arm, lw=1.5)
        _flops_axis(ax, [r["flops"] for r in table.rows if r["student"] == student])
        ax.set_title(_student_title(table, student), fontsize=10)
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel("validation loss (nats/token, lower is better)")
    axes[0][-1].legend(title="arm (best grid point)", fontsize=8, title_fontsize=8)
    fig.suptitle("Validation loss vs training compute (small dots: every cell)", fontsize=11)
    fig.tight_layout()
    return _save(fig, out / "loss_vs_flops.png")


def _flops_axis(ax, flops: list[float]) -> None:
    """Log scale across decades; within one decade a linear axis with short, non-overlapping labels."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    wide = max(flops) / max(min(flops), 1e-30) > 10
    if wide:
        ax.set_xscale("log")
    else:
        ax.xaxis.set_major_locator(MaxNLocator(5))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:.3g}"))
    ax.margins(x=0.08)
    ax.set_xlabel("training FLOPs per run (as counted in summary.json)" + (", log scale" if wide else ""))


def _best_per_budget(rows: list[dict], budget_keys: list[str]) -> list[tuple[float, float]]:
    """(mean FLOPs, val loss) of the configuration with the lowest seed-mean loss, per budget."""
    by_budget: dict[tuple, dict[str, list[dict]]] = {}
    for r in rows:
        by_budget.setdefault(tuple(r[k] for k in budget_keys), {}).setdefault(r["configuration"], []).append(r)
    pts = []
    for confs in by_budget.values():
        group = min(confs.values(), key=lambda g: np.mean([r["val_loss"] for r in g]))
        pts.append((float(np.mean([r["flops"] for r in group])), float(np.mean([r["val_loss"] for r in group]))))
    return sorted(pts)


def plot_curves(table: Table, study_dir: Path, out: Path) -> Path:
    """train/ce against tokens, one panel per student: thin lines per cell, the arm's mean bold."""
    plt = _plt()
    students, arms = _students(table), _arms(table)
    fig, axes = plt.subplots(1, len(students), figsize=(5.2 * len(students) + 0.6, 4.4), squeeze=False,
                             sharey=True)
    tops, bottoms = [], []
    for ax, student in zip(axes[0], students):
        for arm in arms:
            curves = []
            for r in table.rows:
                if r["student"] != student or r["arm"] != arm:
                    continue
                pts = [(m["tokens"], m["train/ce"]) for m in read_metrics(Path(study_dir) / "runs" / r["cell"])
                       if "train/ce" in m]
                if len(pts) < 2:
                    continue
                x, y = map(np.asarray, zip(*pts))
                k = max(1, len(y) // 20)
                x, y = (x[k - 1:], _smooth(y, k)) if k > 1 else (x, y)
                curves.append((x, y))
                ax.plot(x, y, color=COLORS.get(arm), alpha=0.25, lw=0.8)
                tail = y[len(y) // 10:]
                tops.append(float(np.max(tail)))
                bottoms.append(float(np.min(y)))
            if curves:
                x, y = _mean_curve(curves)
                ax.plot(x, y, color=COLORS.get(arm), lw=2, label=f"{arm} (mean of {len(curves)})")
        ax.set_xlabel("training tokens")
        ax.set_title(_student_title(table, student), fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if tops:  # the first steps (ln V nats) would squash the rest of the curve
        pad = 0.05 * (max(tops) - min(bottoms) + 1e-9)
        axes[0][0].set_ylim(min(bottoms) - pad, max(tops) + pad)
    axes[0][0].set_ylabel("train/ce (nats/token; moving average on long runs)")
    fig.suptitle("Student next-token loss during training (thin: each cell; bold: mean per arm)", fontsize=11)
    fig.tight_layout()
    return _save(fig, out / "training_curves.png")


def _mean_curve(curves: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Mean of curves on the longest one's token grid, over the token range all of them cover."""
    end = min(x[-1] for x, _ in curves)
    start = max(x[0] for x, _ in curves)
    grid = max((x for x, _ in curves), key=len)
    grid = grid[(grid >= start) & (grid <= end)]
    return grid, np.mean([np.interp(grid, x, y) for x, y in curves], axis=0)


def plot_paired(comparisons: list[Comparison], out: Path) -> Path:
    """One panel per comparison: each configuration's mean difference over seeds (95% CI when > 1
    seed) and, at the bottom, the mean over configurations with its interval; zero marked."""
    plt = _plt()
    confs = sorted({c for cmp in comparisons for c in cmp.per_config})
    labels = confs + [ALL]
    n = max(len(comparisons), 1)
    size = (4.6 * n + 2.4, max(3.4, 1.6 + 0.45 * len(labels)))
    fig, axes = plt.subplots(1, n, figsize=size, squeeze=False, sharey=True)
    for ax, cmp in zip(axes[0], comparisons):
        color = COLORS.get(cmp.arm, "#444")
        for y, conf in enumerate(labels):
            i = cmp.overall if conf == ALL else cmp.per_config.get(conf)
            if i is None:
                continue
            err = [[i.mean - i.lo], [i.hi - i.mean]] if i.has_ci else None
            big = conf == ALL
            ax.errorbar([i.mean], [y], xerr=err, fmt="D" if big else "o", ms=8 if big else 5, color=color,
                        ecolor=color, capsize=3, lw=1.5)
        ax.axvline(0, color="black", lw=1, ls="--")
        ax.axhline(len(confs) - 0.5, color="#999", lw=0.6)
        ax.set_title(f"{cmp.arm} − {cmp.baseline}: {cmp.arm} won {cmp.wins} of {cmp.n}", fontsize=10)
        ax.set_xlabel(f"Δ validation loss (nats)\n< 0: {cmp.arm} better")
        ax.grid(axis="x", alpha=0.3)
        lim = max(abs(v) for v in ax.get_xlim())
        ax.set_xlim(-lim, lim)
    axes[0][0].set_yticks(range(len(labels)), labels, fontsize=8)
    axes[0][0].invert_yaxis()
    seeds = max((i.n for cmp in comparisons for i in cmp.per_config.values()), default=1)
    per = "bars: 95% t-interval over seeds" if seeds > 1 else "one seed: no interval per configuration"
    fig.suptitle(f"Paired differences per configuration ({per}; bottom: mean over configurations "
                 "with its 95% t-interval)", fontsize=10)
    fig.tight_layout()
    return _save(fig, out / "paired_differences.png")


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
