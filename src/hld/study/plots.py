"""What the report's plots share: arm colours and reading a run's metrics.jsonl."""

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
