"""Run length from the budget: tokens, or FLOPs with the teacher counted."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hld.config import load_config
from hld.errors import HldError
from hld.flops import forward_flops_per_token
from hld.train.budget import planned_steps
from hld.train.loop import build
from hld.train.resources import Resources


def _setup(overrides, *extra):
    return build(load_config("smoke", [*overrides, *extra]), Resources())


def test_tokens_budget_is_met_to_the_token_by_a_shorter_last_step(overrides):
    s = _setup(overrides, "budget.tokens=1000")  # 4 x 32 tokens per step: 7 full steps = 896 tokens
    assert (s.total_steps, s.length.last_len) == (8, (1000 - 896) // 4)
    assert sum(s.length.tokens_at(k, 4, 32) for k in range(s.total_steps)) == 1000
    s = _setup(overrides, "budget.tokens=1024")  # a whole number of steps: no short step
    assert (s.total_steps, s.length.last_len) == (8, 32)


def _brute_force_tokens(s, budget: float) -> tuple[float, int]:
    """FLOPs and tokens of the longest run within `budget`, by walking step by step with the
    loop's own phase rule (independent of budget.run_length's closed form): for each candidate
    number of steps S, the first S-1 steps are full and the last reads L <= 32 positions."""
    B, T = 4, 32
    best = (0.0, 0)
    for S in range(1, 400):
        for L in range(T, 0, -1):
            total = (S - 1) * T + L  # the loop's rule: a step runs the phase of its token shares
            cost = [
                s.costs[s.plan.phase_for(k * T / total, (k * T + (L if k == S - 1 else T)) / total).name].total
                for k in range(S)
            ]
            f = B * T * sum(cost[:-1]) + B * L * cost[-1]
            if f <= budget:
                if B * ((S - 1) * T + L) > best[1]:
                    best = (f, B * ((S - 1) * T + L))
                break
    return best


def test_flops_budget_at_equal_flops_ce_sees_more_tokens_than_kd(overrides):
    budget = 2e9
    ce = _setup(overrides, "budget.tokens=null", f"budget.flops={budget}", "objective.method=ce")
    kd = _setup(overrides, "budget.tokens=null", f"budget.flops={budget}", "objective.method=kd")
    tps = 4 * 32
    # independent arithmetic: student training = 3 x forward, teacher = 1 x forward (with its head)
    student = 3 * forward_flops_per_token(ce.student, 32)
    teacher = forward_flops_per_token(kd.teacher_lm, 32)
    for s, per_token in ((ce, student), (kd, student + teacher)):
        tokens = int(budget // (4 * per_token)) * 4  # whole tokens per window, 4 windows per step
        assert sum(s.length.tokens_at(k, 4, 32) for k in range(s.total_steps)) == tokens
        assert s.total_steps == -(-tokens // tps)
        # the realised FLOPs fall short of the budget by less than one token per window
        assert budget - 4 * per_token < tokens * per_token <= budget
    assert ce.total_steps > kd.total_steps


def test_not_counting_the_teacher_gives_kd_the_ce_length(overrides):
    ce = _setup(overrides, "budget.tokens=null", "budget.flops=2e9", "objective.method=ce")
    kd = _setup(
        overrides, "budget.tokens=null", "budget.flops=2e9", "objective.method=kd", "budget.count_teacher=false"
    )
    assert kd.total_steps == ce.total_steps


def test_hld_first_phases_are_weighted_by_their_share(overrides):
    s = _setup(
        overrides,
        "budget.tokens=null",
        "budget.flops=3e9",
        "objective.method=hld-first",
        "objective.hidden.first_share=0.25",
    )
    first, second = (s.costs[p.name].total for p in s.plan.phases)
    assert first < second  # the hidden-only phase runs neither head
    flops, tokens = _brute_force_tokens(s, 3e9)
    assert sum(s.length.tokens_at(k, 4, 32) for k in range(s.total_steps)) == tokens
    assert 3e9 - 4 * second < flops <= 3e9
    tok = Resources().tokenizer(s.cfg.teacher.model)
    assert planned_steps(s.cfg, s.teacher_lm, tok) == s.total_steps  # the cheap meta-device plan agrees


def test_tokens_and_flops_together_are_refused(overrides):
    with pytest.raises(HldError, match="both budget.tokens and budget.flops"):
        load_config("smoke", [*overrides, "budget.flops=1e9"])


def test_flops_budget_shorter_than_a_step_is_refused(overrides):
    with pytest.raises(HldError, match="less than one token per window"):
        _setup(overrides, "budget.tokens=null", "budget.flops=1000")


def test_the_short_last_step_trains_on_the_windows_prefix(overrides):
    """The last step of a 138-token budget (one step of 4 x 32, then 4 x 2 positions) has the gradient
    of F.cross_entropy over those 2 positions of each window, computed here directly."""
    from hld.data.packing import IGNORE
    from hld.train.loop import train_step

    s = _setup(overrides, "budget.tokens=138", "objective.method=ce", "train.grad_clip=0")
    assert (s.total_steps, s.length.last_len) == (2, 2)
    full = s.order.batch(1)
    ids, labels = full.input_ids[:, :2], full.labels[:, :2]
    ref = {n: p.detach().clone().requires_grad_(True) for n, p in s.student.named_parameters()}
    logits = torch.func.functional_call(s.student, ref, (ids,)).logits.float()
    mask = labels != IGNORE
    F.cross_entropy(logits[mask], labels[mask]).backward()
    grads = {}
    s.optimizer.step = lambda: grads.update(
        {n: p.grad.clone() for n, p in s.student.named_parameters() if p.grad is not None}
    )
    train_step(s, 1)
    assert grads
    for n, g in grads.items():
        torch.testing.assert_close(g, ref[n].grad, rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("method", ["ce", "kd", "hld-first"])
def test_a_run_spends_its_flops_budget_to_within_one_token_per_window(tmp_path, overrides, method):
    from hld.train.loop import train

    budget = 4e9
    summary = train(
        load_config(
            "smoke",
            [
                *overrides,
                "budget.tokens=null",
                f"budget.flops={budget}",
                f"objective.method={method}",
                "train.eval_every_steps=0",
            ],
        ),
        tmp_path / method,
        quiet=True,
    )
    per_token_max = max(summary["flops_per_token"].values())
    assert budget - 4 * per_token_max < summary["flops"] <= budget
    assert summary["tokens"] % 4 == 0 and summary["tokens"] % 128 != 0  # this budget ends inside a step


@pytest.mark.parametrize("budget", [4e8, 6e8, 1e9, 2.5e9, 4e9])
@pytest.mark.slow
def test_hld_first_short_runs_never_overspend(overrides, budget):
    """A cut last step shortens the run and moves hld-first's boundary (a share of the run's tokens):
    the length must be found with the moved boundary, or a short run overspends (7% at 4e8 once)."""
    from hld.train.budget import run_length

    s = _setup(
        overrides,
        "budget.tokens=null",
        f"budget.flops={budget}",
        "objective.method=hld-first",
        "student.preset=tiny-1l",
    )
    length = run_length(s.cfg, s.plan, s.costs)
    B, T = 4, 32
    S, L = length.steps, length.last_len
    total = (S - 1) * T + L
    spent = sum(
        B
        * (L if k == S - 1 else T)
        * s.costs[s.plan.phase_for(k * T / total, (k * T + (L if k == S - 1 else T)) / total).name].total
        for k in range(S)
    )
    best_flops, best_tokens = _brute_force_tokens(s, budget)
    assert spent <= budget
    assert B * total >= best_tokens - B  # within one token per window of the longest run that fits
