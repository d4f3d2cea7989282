"""Run length from the budget: tokens, or FLOPs with the teacher counted."""

from __future__ import annotations

import pytest

from hld.config import load_config
from hld.errors import HldError
from hld.flops import forward_flops_per_token
from hld.train.budget import planned_steps
from hld.train.loop import build
from hld.train.resources import Resources


def _setup(overrides, *extra):
    return build(load_config("smoke", [*overrides, *extra]), Resources())


def test_tokens_budget_gives_tokens_over_tokens_per_step(overrides):
    s = _setup(overrides, "budget.tokens=1000")  # 4 x 32 tokens per step
    assert s.total_steps == 1000 // 128


def test_flops_budget_at_equal_flops_ce_sees_more_tokens_than_kd(overrides):
    budget = 2e9
    ce = _setup(overrides, "budget.tokens=null", f"budget.flops={budget}", "objective.method=ce")
    kd = _setup(overrides, "budget.tokens=null", f"budget.flops={budget}", "objective.method=kd")
    tps = 4 * 32
    # independent arithmetic: student training = 3 x forward, teacher = 1 x forward (with its head)
    student = 3 * forward_flops_per_token(ce.student, 32)
    teacher = forward_flops_per_token(kd.teacher_lm, 32)
    assert ce.total_steps == int(budget // (tps * student))
    assert kd.total_steps == int(budget // (tps * (student + teacher)))
    assert ce.total_steps > kd.total_steps
    # the realised FLOPs stay within one step of the budget for both arms
    for s in (ce, kd):
        per_step = tps * s.costs[s.plan.phases[0].name].total
        assert budget - per_step < s.total_steps * per_step <= budget


def test_not_counting_the_teacher_gives_kd_the_ce_length(overrides):
    ce = _setup(overrides, "budget.tokens=null", "budget.flops=2e9", "objective.method=ce")
    kd = _setup(overrides, "budget.tokens=null", "budget.flops=2e9", "objective.method=kd", "budget.count_teacher=false")
    assert kd.total_steps == ce.total_steps


def test_hld_first_phases_are_weighted_by_their_share(overrides):
    s = _setup(overrides, "budget.tokens=null", "budget.flops=3e9", "objective.method=hld-first", "objective.hidden.first_share=0.25")
    first, second = (s.costs[p.name].total for p in s.plan.phases)
    assert first < second  # the hidden-only phase runs neither head
    mean = 0.25 * first + 0.75 * second
    assert s.total_steps == int(3e9 // (128 * mean))
    assert planned_steps(s.cfg, s.teacher_lm) == s.total_steps  # the cheap meta-device plan agrees


def test_tokens_and_flops_together_are_refused(overrides):
    with pytest.raises(HldError, match="both budget.tokens and budget.flops"):
        load_config("smoke", [*overrides, "budget.flops=1e9"])


def test_flops_budget_shorter_than_a_step_is_refused(overrides):
    with pytest.raises(HldError, match="less than one step"):
        _setup(overrides, "budget.tokens=null", "budget.flops=1000")
