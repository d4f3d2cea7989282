"""Loss-weight schedules, pure functions of the run's progress: alpha (KD) and beta (hidden)."""

from __future__ import annotations

import math

from hld.config import ScheduleConfig


def weight_at(progress: float, w0: float, cfg: ScheduleConfig) -> float:
    """A loss weight (alpha, beta) at `progress` p in [0, 1] of the run (p = step / (steps - 1)):
    constant  w0
    linear    w0 + (final - w0) * p
    cosine    final + (w0 - final) * (1 + cos(pi p)) / 2
    wsd       w0 * p / warmup (p < warmup); w0; then w0 + (final - w0) * (p - (1 - decay)) / decay
              over the last `decay` share (Peng et al. 2024 use it for the KD weight)."""
    p = min(1.0, max(0.0, progress))
    wf = cfg.final
    if cfg.kind == "constant":
        return w0
    if cfg.kind == "linear":
        return w0 + (wf - w0) * p
    if cfg.kind == "cosine":
        return wf + (w0 - wf) * 0.5 * (1 + math.cos(math.pi * p))
    if cfg.kind == "wsd":
        if cfg.warmup_share > 0 and p < cfg.warmup_share:
            return w0 * p / cfg.warmup_share
        start = 1.0 - cfg.decay_share
        if cfg.decay_share > 0 and p > start:
            return w0 + (wf - w0) * (p - start) / cfg.decay_share
        return w0
    raise ValueError(f"unknown schedule {cfg.kind!r}")


def step_progress(step: int, total_steps: int) -> float:
    """p of step `step` (0-based): 0 at the first step, 1 at the last."""
    return step / (total_steps - 1) if total_steps > 1 else 0.0
