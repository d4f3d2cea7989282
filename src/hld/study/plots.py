"""Plots of a set of run directories (read from their metrics.jsonl only)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

COLORS = {"ce": "#7f7f7f", "kd": "#1f77b4", "hld-joint": "#d62728", "hld-first": "#2ca02c", "teacher": "#000000"}


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _smooth(y: np.ndarray, k: int) -> np.ndarray:
    if len(y) < k or k <= 1:
        return y
    return np.convolve(y, np.ones(k) / k, mode="valid")


def plot_training(runs: dict[str, Path], out: Path, *, teacher_ppl: float | None = None) -> list[Path]:
    """train/ce against tokens for every arm that computes it, and the final val/ppl per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    finals = {}
    for arm, run_dir in runs.items():
        rows = read_metrics(run_dir)
        pts = [(r["tokens"], r["train/ce"]) for r in rows if "train/ce" in r]
        if pts:
            x, y = map(np.asarray, zip(*pts))
            k = max(1, len(y) // 20)
            ax1.plot(x[k - 1:] if k > 1 else x, _smooth(y, k), label=arm, color=COLORS.get(arm))
        vals = [r["val/ppl"] for r in rows if "val/ppl" in r]
        if vals:
            finals[arm] = vals[-1]
    ax1.set_xlabel("training tokens")
    ax1.set_ylabel("train/ce (nats, smoothed)")
    ax1.set_title("Student next-token loss")
    ax1.legend()
    ax1.grid(alpha=0.3)
    arms = list(finals)
    ax2.bar(arms, [finals[a] for a in arms], color=[COLORS.get(a, "#888") for a in arms])
    for i, a in enumerate(arms):
        ax2.text(i, finals[a], f"{finals[a]:.0f}", ha="center", va="bottom")
    if teacher_ppl is not None:
        ax2.axhline(teacher_ppl, color="black", ls="--", lw=1, label=f"teacher {teacher_ppl:.1f}")
        ax2.legend()
    ax2.set_yscale("log")
    ax2.set_ylabel("validation perplexity, log scale (lower is better)")
    ax2.set_title("Final validation perplexity")
    ax2.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = out / "training.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]
