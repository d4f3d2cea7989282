"""The loop calls its callbacks at the named points, in list order, and a callback's exception stops
the run where it was raised (`hld.train.callbacks`)."""

from __future__ import annotations

import pytest
import torch

from hld.config import load_config
from hld.errors import HldError
from hld.train.callbacks import Callback, Validation, every
from hld.train.loop import _steps, build
from hld.train.state import RunState


class Recorder(Callback):
    def __init__(self, name: str, calls: list) -> None:
        self.name, self.calls = name, calls

    def on_start(self, run):
        self.calls.append((self.name, "start", run.step))

    def on_step_end(self, run, line):
        self.calls.append((self.name, "step", run.step, run.last, "val/ppl" in line))

    def on_train_end(self, run):
        self.calls.append((self.name, "end", run.step))


@pytest.fixture
def setup(resources, overrides):
    return build(load_config("smoke", [*overrides, "objective.method=kd"]), resources, device=torch.device("cpu"))


def test_points_and_order(setup, tmp_path):
    calls: list = []
    n = setup.total_steps
    assert n == 4  # the tiny overrides: 512 tokens in steps of 4 x 32
    line = _steps(setup, tmp_path, RunState(), [Recorder("a", calls), Validation(2), Recorder("b", calls)])
    want = [("a", "start", 0), ("b", "start", 0)]
    for k in range(1, n + 1):  # "a" runs before validation (no val/ppl in its line), "b" after it
        want += [("a", "step", k, k == n, False), ("b", "step", k, k == n, k % 2 == 0)]
    want += [("a", "end", n), ("b", "end", n)]
    assert calls == want
    assert line["step"] == n and "val/ppl" in line


def test_a_callback_that_raises_stops_the_run_at_its_step(setup, tmp_path):
    class StopAt(Callback):
        def on_step_end(self, run, line):
            if run.step == 2:
                raise HldError("stopped", "on purpose")

    calls: list = []
    state = RunState()
    with pytest.raises(HldError, match="stopped"):
        _steps(setup, tmp_path, state, [StopAt(), Recorder("later", calls)])
    assert state.step == 2 and [c[2] for c in calls if c[1] == "step"] == [1]  # "later" never saw step 2


@pytest.mark.parametrize("step, n, want", [(0, 0, False), (3, 0, False), (4, 2, True), (3, 2, False), (5, 1, True)])
def test_every(step, n, want):
    assert every(step, n) is want
