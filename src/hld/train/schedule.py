"""The learning-rate schedule, a pure function of the step (a multiplier of the peak rate). The loss
weights' schedules (alpha, beta) are the objectives': `hld.distill.schedule`."""

from __future__ import annotations

import math

from hld.config import TrainConfig


def lr_factor(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """Multiplier of cfg.lr at optimiser step `step` (0-based) of `total_steps`."""
    warmup = int(round(cfg.warmup_share * total_steps))
    if warmup and step < warmup:
        return (step + 1) / warmup
    floor = cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "cosine":
        span = max(1, total_steps - warmup - 1)
        progress = min(1.0, (step - warmup) / span)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    # warmup-stable-decay: flat, then linear decay to the floor over the last decay_share of steps
    decay = max(1, int(round(cfg.decay_share * total_steps)))
    start = total_steps - decay
    if step < start:
        return 1.0
    return 1.0 - (1 - floor) * min(1.0, (step - start + 1) / decay)
