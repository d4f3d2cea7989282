"""The learning-rate schedule (hld.train.schedule.lr_factor) against values worked out by hand, and the
rate a run actually applied (its metrics.jsonl) against the same hand values: a schedule replaced by a
constant, or a loop that ignored it, fails here."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from helpers import train_argv
from hld.cli import main
from hld.config import TrainConfig
from hld.train.schedule import lr_factor


def _cfg(**kw) -> TrainConfig:
    return dataclasses.replace(TrainConfig(), **kw)


def test_cosine_with_warmup_by_hand():
    # 100 steps, 5 of warmup (0.05 x 100); the cosine runs over steps 5..99 (span 94) from 1 to the floor
    cfg = _cfg(schedule="cosine", warmup_share=0.05, min_lr_ratio=0.1)
    want = {0: 0.2, 1: 0.4, 4: 1.0, 5: 1.0, 52: 0.55, 99: 0.1}  # step 52: half way, 0.1 + 0.9 x 0.5
    want[28] = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 23 / 94))
    for step, value in want.items():
        assert lr_factor(step, 100, cfg) == pytest.approx(value, abs=1e-12), step


def test_wsd_by_hand():
    # 10 steps, no warmup, the last 2 (0.2 x 10) decay linearly to the floor: 1 - 0.9 x 1/2, then 0.1
    cfg = _cfg(schedule="wsd", warmup_share=0.0, decay_share=0.2, min_lr_ratio=0.1)
    got = [lr_factor(k, 10, cfg) for k in range(10)]
    assert got == pytest.approx([1.0] * 8 + [0.55, 0.1], abs=1e-12)
    # with a warmup of 2 steps (0.2 x 10): 0.5, 1, then flat, then the same decay
    cfg = _cfg(schedule="wsd", warmup_share=0.2, decay_share=0.2, min_lr_ratio=0.1)
    assert [lr_factor(k, 10, cfg) for k in range(10)] == pytest.approx([0.5, 1.0] + [1.0] * 6 + [0.55, 0.1])


def test_constant_with_warmup_by_hand():
    cfg = _cfg(schedule="constant", warmup_share=0.25, min_lr_ratio=0.1)
    assert [lr_factor(k, 8, cfg) for k in range(8)] == pytest.approx([0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])


def test_the_shortest_schedules_reach_the_floor_on_their_last_step():
    # cosine over 2 steps, no warmup: its span is 1 step, so the last step is all the way down (not half way)
    cfg = _cfg(schedule="cosine", warmup_share=0.0, min_lr_ratio=0.1)
    assert [lr_factor(k, 2, cfg) for k in range(2)] == pytest.approx([1.0, 0.1], abs=1e-12)
    # a 1-step cosine after its warmup: the span is clamped to 1, its only step at the peak
    cfg = _cfg(schedule="cosine", warmup_share=0.5, min_lr_ratio=0.1)
    assert [lr_factor(k, 2, cfg) for k in range(2)] == pytest.approx([1.0, 1.0], abs=1e-12)
    # wsd whose decay is a single step (round(0.1 x 10) = 1): flat to step 8, the floor at step 9
    cfg = _cfg(schedule="wsd", warmup_share=0.0, decay_share=0.1, min_lr_ratio=0.1)
    assert [lr_factor(k, 10, cfg) for k in range(10)] == pytest.approx([1.0] * 9 + [0.1], abs=1e-12)
    # a decay share that rounds to 0 steps still decays over 1 (the last), never divides by 0
    cfg = _cfg(schedule="wsd", warmup_share=0.0, decay_share=0.01, min_lr_ratio=0.2)
    assert [lr_factor(k, 10, cfg) for k in range(10)] == pytest.approx([1.0] * 9 + [0.2], abs=1e-12)


@pytest.mark.parametrize("schedule", ["cosine", "wsd"])
def test_past_the_last_step_the_rate_stays_at_the_floor(schedule):
    # a step beyond total_steps (a resumed run with a shorter horizon, an extra eval step): the floor, not a
    # cosine that climbs back up (cos(pi x progress) for progress > 1) nor a linear decay below the floor
    cfg = _cfg(schedule=schedule, warmup_share=0.1, decay_share=0.2, min_lr_ratio=0.1)
    for step in (10, 11, 15, 19, 30):
        assert lr_factor(step, 10, cfg) == pytest.approx(0.1, abs=1e-12), step


@pytest.mark.parametrize(
    "schedule, want",
    [
        # 4 steps, warmup round(0.25 x 4) = 1 step; cosine span 4 - 1 - 1 = 2: 1, cos(pi/2) -> 0.55, floor
        ("cosine", [1.0, 1.0, 0.55, 0.1]),
        # wsd: the last round(0.5 x 4) = 2 steps decay: 1 - 0.9 x 1/2, then the floor
        ("wsd", [1.0, 1.0, 0.55, 0.1]),
        ("constant", [1.0, 1.0, 1.0, 1.0]),
    ],
)
def test_a_run_applies_the_schedule(tmp_path, capsys, schedule, want):
    run = tmp_path / "run"
    argv = train_argv(
        run,
        f"train.schedule={schedule}",
        "train.lr=0.01",
        "train.warmup_share=0.25",
        "train.decay_share=0.5",
        "train.min_lr_ratio=0.1",
        "train.log_every_steps=1",
    )
    assert main(argv) == 0, capsys.readouterr().err
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    applied = {r["step"]: r["lr"] for r in lines if "lr" in r}
    assert len(applied) == 4, applied
    assert [applied[k] for k in sorted(applied)] == pytest.approx([0.01 * w for w in want], rel=1e-12)
