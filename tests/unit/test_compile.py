"""`train.compile=true` gives the same step as eager. Compiling takes minutes on a 2-core CPU, so this
runs on CUDA (benchmarks/gpu_check.sh) or when HLD_TEST_COMPILE=1."""

from __future__ import annotations

import os

import pytest
import torch

from hld.config import load_config
from hld.train.loop import build, train_step
from hld.train.resources import Resources

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() or os.environ.get("HLD_TEST_COMPILE") == "1"),
    reason="torch.compile takes minutes on CPU: set HLD_TEST_COMPILE=1 to run",
)


def test_compiled_student_matches_eager(overrides):
    losses = {}
    for comp in (False, True):
        s = build(
            load_config("smoke", [*overrides, "objective.method=hld-joint", f"train.compile={comp}"]), Resources()
        )
        losses[comp] = [train_step(s, k)["train/loss"] for k in range(2)]
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)
