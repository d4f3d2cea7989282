"""The loop calls its callbacks at the named points, in list order, and a callback's exception stops
the run where it was raised (`hld.train.callbacks`)."""

from __future__ import annotations

import pytest
import torch

from helpers import KeptLines, weights_to_inf_after_each_step
from hld.config import load_config
from hld.errors import HldError
from hld.train.callbacks import Callback, MetricLog, NonFiniteStop, Validation, every
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


def test_five_skipped_steps_read_back_late_still_stop_the_run(resources, overrides, tmp_path, monkeypatch):
    """Steps 2.. are non-finite (the first update fills the weights with inf); nothing reads the metrics
    back before the last of 8 steps, where the guard meets the 5th skip in a row (step 6) in step order,
    after the metric log has written each skipped step."""
    weights_to_inf_after_each_step(monkeypatch)
    cfg = load_config("smoke", [*overrides, "objective.method=ce", "budget.tokens=1024", "train.warmup_share=0"])
    s = build(cfg, resources, device=torch.device("cpu"))
    log, state = KeptLines(), RunState()
    with pytest.raises(HldError, match=r"non-finite for 5 steps in a row \(step 6\)"):
        _steps(s, tmp_path, state, [MetricLog(log, 100), NonFiniteStop()])  # type: ignore[arg-type]
    assert state.step == 8  # the steps after the 5th skip ran (and were skipped too) before the read-back
    assert [(x["step"], x["skipped"]) for x in log.lines] == [(k, True) for k in range(2, 7)]


def test_a_finished_run_frees_its_student(overrides, tmp_path):
    """A process that runs cell after cell (`hld run`) gets each run's memory back when `train` returns:
    its Setup sits in reference cycles, which only the cyclic collector frees (turned off here, as it
    effectively is between a few large objects)."""
    import gc
    import weakref

    import hld.train.loop as loop

    built: list = []
    real = loop.build

    def build(*a, **k):
        s = real(*a, **k)
        built.append(weakref.ref(s.student))
        return s

    was = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(loop, "build", build)
            loop.train(load_config("smoke", [*overrides, "objective.method=hld-joint"]), tmp_path / "r", quiet=True)
        assert len(built) == 1 and built[0]() is None
    finally:
        if was:
            gc.enable()


def test_on_finish_sees_the_exported_student_unless_it_reads_none_of_it(setup, resources, tmp_path):
    """`_finish` writes the student while the callbacks that read nothing of it (`after_export = False`: the
    layer diagnostics) run; the others run once it is complete; summary.json's student_sha256 is hashlib's
    sha256 of each file written."""
    import hashlib

    from hld.train.loop import _finish

    seen: dict = {}

    class Reads(Callback):
        def on_finish(self, run):
            files = sorted((run.out / "student").iterdir())
            seen["reads"] = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}

    class Apart(Callback):
        after_export = False

        def on_finish(self, run):
            seen["apart"] = True

    line = _steps(setup, tmp_path, RunState(), [Validation(0)])
    tok = resources.tokenizer(setup.cfg.teacher.model)
    summary = _finish(setup, tmp_path, RunState(step=setup.total_steps), line, tok, [Reads(), Apart()])
    assert seen["apart"] and "model.safetensors" in seen["reads"] and "config.json" in seen["reads"]
    assert summary["student_sha256"] == seen["reads"]
