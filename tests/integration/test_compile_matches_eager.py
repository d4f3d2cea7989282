"""`train.compile=true` gives the same step as eager: on CPU in every full run (inductor's C++ backend,
seconds for the smoke student; marked slow), and on CUDA in benchmarks/gpu_check.sh."""

from __future__ import annotations

import pytest

from hld.config import load_config
from hld.train.loop import build, train_step
from hld.train.resources import Resources

pytestmark = pytest.mark.slow


def test_compiled_student_matches_eager(overrides):
    losses = {}
    for comp in (False, True):
        s = build(
            load_config("smoke", [*overrides, "objective.method=hld-joint", f"train.compile={comp}"]), Resources()
        )
        losses[comp] = [train_step(s, k)["train/loss"] for k in range(2)]
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)
