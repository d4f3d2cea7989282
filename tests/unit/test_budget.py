"""Run length from the budget: tokens, or FLOPs with the teacher counted."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from hld.config import load_config
from hld.config_checks import MAX_STEPS
from hld.distill.objectives import Phase, Plan
from hld.distill.signals.base import Needs
from hld.errors import HldError
from hld.flops import StepCost, forward_flops_per_token
from hld.train.budget import fixed_flops, phase_costs, planned_steps, run_length, step_counts
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


# ---------------------------------------------------------------------------------------------------------
# run_length, step_counts and fixed_flops on plans and costs given here (no model): each length is checked
# against a walk over the steps with the loop's own rule (Plan.phase_for on each step's token shares).


class _Part:
    """The least of an objective a Plan and its boundary blends read (no loss is computed here)."""

    needs = Needs()
    student_layers: tuple[int, ...] = ()
    uses_head = True
    n_pairs = 0


def _plan(*shares: float) -> Plan:
    names = "abcd"
    return Plan([Phase(names[i], s, _Part()) for i, s in enumerate([*shares, 1.0])])


def _costs(plan: Plan, per_phase: list[float]) -> dict[str, StepCost]:
    """FLOPs per token of each phase; a boundary blend runs both phases (the sum of their costs)."""
    costs = {ph.name: StepCost(student=c, teacher=0.0, projectors=0.0) for ph, c in zip(plan.phases, per_phase)}
    for i, b in enumerate(plan.boundaries):
        costs[b.name] = StepCost(student=per_phase[i] + per_phase[i + 1], teacher=0.0, projectors=0.0)
    return costs


def _cfg(B: int, T: int, *, flops: float | None = None, tokens: int | None = None):
    return SimpleNamespace(
        train=SimpleNamespace(batch_size=B),
        data=SimpleNamespace(seq_len=T),
        budget=SimpleNamespace(flops=flops, tokens=tokens),
    )


def _walk_flops(plan: Plan, costs: dict[str, StepCost], S: int, L: int, B: int, T: int) -> float:
    """FLOPs of S steps whose last reads L positions a window, step by step by the loop's rule."""
    total = (S - 1) * T + L
    out = 0.0
    for k in range(S):
        n = L if k == S - 1 else T
        out += B * n * costs[plan.phase_for(k * T / total, (k * T + n) / total).name].total
    return out


@pytest.mark.parametrize("steps", [*range(1, 41), 97, 100, 1000])
@pytest.mark.parametrize("shares", [(0.25,), (0.29,), (0.5,), (0.3, 0.7), (0.1, 0.15, 0.9), (0.0,), (1.0,)])
def test_step_counts_are_the_phases_the_loop_runs_step_by_step(steps, shares):
    """step_counts(plan, S) = how many of S full steps Plan.phase_for gives each phase or blend (0.29 * 100
    is 28.999999999999996 in floats: the boundary still falls at the end of step 29)."""
    plan = _plan(*shares)
    walked: dict[str, int] = {}
    for k in range(steps):
        name = plan.phase_for(k / steps, (k + 1) / steps).name
        walked[name] = walked.get(name, 0) + 1
    got = {name: n for name, n in step_counts(plan, steps).items() if n}
    assert got == walked
    assert all(n >= 0 for n in step_counts(plan, steps).values())


@pytest.mark.parametrize("B,T", [(1, 1), (4, 32), (3, 7)])
@pytest.mark.parametrize("cost", [1.0, 6.5, 123.0])
@pytest.mark.parametrize("budget_tokens", [1, 2, 9, 31, 32, 100, 1000, 4097])
@pytest.mark.parametrize("fixed", [0.0, 3.0])
def test_one_phase_flops_budget_buys_whole_tokens_per_window(B, T, cost, budget_tokens, fixed):
    """One phase at `cost` FLOPs a token: the run reads B * floor((budget - fixed) / (B * cost)) tokens, in
    full steps of B x T and a last step of the remainder a window (a budget a hair over a whole number of
    tokens, and one exactly on it)."""
    plan = _plan()
    costs = _costs(plan, [cost])
    for budget in (fixed + budget_tokens * cost * 1.0000001, fixed + budget_tokens * cost):
        per_window = math.floor((budget - fixed) / (B * cost))
        if per_window < 1:
            with pytest.raises(HldError, match="less than one token per window"):
                run_length(_cfg(B, T, flops=budget), plan, costs, fixed_flops=fixed)
            continue
        got = run_length(_cfg(B, T, flops=budget), plan, costs, fixed_flops=fixed)
        assert (got.steps, got.last_len) == (-(-per_window // T), per_window - (-(-per_window // T) - 1) * T)
        assert sum(got.tokens_at(k, B, T) for k in range(got.steps)) == B * per_window


def _check_longest_within(plan: Plan, costs: dict[str, StepCost], B: int, T: int, budget: float) -> None:
    """run_length stays within `budget` by the step-by-step walk and one more token a window (a longer last
    step, or one more step) exceeds it; it refuses the budget only when no run of up to 60 steps fits."""
    try:
        got = run_length(_cfg(B, T, flops=budget), plan, costs)
    except HldError:
        assert all(_walk_flops(plan, costs, S, L, B, T) > budget for S in range(1, 61) for L in range(1, T + 1))
        return
    S, L = got.steps, got.last_len
    assert 1 <= L <= T
    assert _walk_flops(plan, costs, S, L, B, T) <= budget, (budget, S, L)
    longer = _walk_flops(plan, costs, S, L + 1, B, T) if L < T else _walk_flops(plan, costs, S + 1, 1, B, T)
    assert longer > budget, (budget, S, L)


@pytest.mark.parametrize(
    "shares,per_phase", [((0.25,), [1.0, 3.0]), ((0.5,), [5.0, 1.0]), ((0.2, 0.6), [2.0, 1.0, 4.0])]
)
@pytest.mark.parametrize("B,T", [(4, 32), (2, 5)])
def test_multi_phase_flops_budget_is_the_longest_run_within_it(shares, per_phase, B, T):
    """With phases of different costs the boundaries (shares of the run's tokens) move as the last step is
    cut: the length must stay within the budget by the step-by-step walk, and one more token a window
    (a longer last step, or one more step) must exceed it. Also at budgets that are exactly some run's FLOPs."""
    plan = _plan(*shares)
    costs = _costs(plan, per_phase)
    budgets = [x * B * T * max(per_phase) * 0.37 for x in (1, 2, 3, 5, 8, 13, 21, 34, 55, 200)]
    budgets += [_walk_flops(plan, costs, S, L, B, T) for S in (1, 2, 3, 7, 20) for L in (1, T // 2, T)]
    for budget in budgets:
        _check_longest_within(plan, costs, B, T, budget)


@pytest.mark.parametrize("shares,per_phase", [((0.01,), [1000.0, 1.0]), ((0.9,), [1.0, 30.0])])
def test_a_short_costly_phase_or_boundary_still_gives_the_longest_run_within_the_budget(shares, per_phase):
    """Extreme phase costs: a first phase of 1% of the tokens at 1000x the rest (its boundary blend falls in
    the first step of a short run, so the mean cost a token badly underestimates a short run's: the step
    search starts above the answer and walks down), and a last 10% at 30x. Budgets over 300 steps' worth."""
    plan = _plan(*shares)
    costs = _costs(plan, per_phase)
    B, T = 2, 5
    for x in range(1, 300):
        _check_longest_within(plan, costs, B, T, B * T * x * 1.013)


def test_a_flops_budget_at_the_step_limit_runs_and_one_past_it_is_refused():
    plan = _plan()
    costs = _costs(plan, [1.0])
    got = run_length(_cfg(1, 1, flops=float(MAX_STEPS)), plan, costs)
    assert (got.steps, got.last_len) == (MAX_STEPS, 1)
    got = run_length(_cfg(1, 4, flops=4.0 * MAX_STEPS), plan, costs)  # the limit counts steps, not tokens
    assert (got.steps, got.last_len) == (MAX_STEPS, 4)
    with pytest.raises(HldError) as err:
        run_length(_cfg(2, 1, flops=4.0 * MAX_STEPS), plan, costs)
    want = f"budget.flops={4.0 * MAX_STEPS:.3g} needs about {2.0 * MAX_STEPS:.3g} steps of 2x1 tokens, "
    assert err.value.problem == want + f"more than the limit of {MAX_STEPS:,}"
    assert err.value.fix == "lower budget.flops, or raise train.batch_size or data.seq_len"


def test_the_step_limit_uses_the_phases_mean_cost_a_token():
    """Two phases at 3 and 1 FLOPs a token, half the tokens each: 2 a token on average, so 2e7 FLOPs of 1 x 1
    steps are about 1e7 steps (the limit: run; 9,999,999 of them, the boundary step running both phases) and
    2.4e7 about 1.2e7 (refused)."""
    plan = _plan(0.5)
    costs = _costs(plan, [3.0, 1.0])
    got = run_length(_cfg(1, 1, flops=2.0 * MAX_STEPS), plan, costs)
    assert got.steps == MAX_STEPS - 1
    with pytest.raises(HldError, match="needs about 1.2e\\+07 steps of 1x1 tokens"):
        run_length(_cfg(1, 1, flops=2.4 * MAX_STEPS), plan, costs)


def test_a_flops_budget_spent_before_training_is_refused_with_its_cost():
    plan = _plan()
    costs = _costs(plan, [1.0])
    for fixed in (1e6, 2e6):
        with pytest.raises(HldError) as err:
            run_length(_cfg(4, 32, flops=1e6), plan, costs, fixed_flops=fixed)
        assert (
            err.value.problem
            == f"budget.flops=1e+06 is spent before training: deriving the student costs {fixed:.3g} FLOPs"
        )
        assert (
            err.value.fix
            == "raise budget.flops, or lower student.init.calibration_windows (or list student.init.blocks)"
        )
    with pytest.raises(HldError) as err:
        run_length(_cfg(4, 32, flops=1e6), plan, _costs(plan, [1e6]))
    assert err.value.problem == "budget.flops=1e+06 is less than one token per window of a batch (4 windows)"
    assert err.value.fix == "raise the budget or lower train.batch_size"


def test_without_a_budget_a_run_reads_the_default_65536_tokens():
    plan = _plan()
    got = run_length(_cfg(4, 32), plan, _costs(plan, [1.0]))
    assert (got.steps, got.last_len) == (65536 // (4 * 32), 32)


def test_the_meta_device_plan_of_a_derived_student_charges_its_calibration(resources, overrides):
    """planned_steps (the student on the meta device, before any weight is read) subtracts a depth-1 student's
    calibration FLOPs from the budget, as the built run does: both lengths agree, shorter than without it."""
    cfg = load_config("smoke", [*overrides, "budget.tokens=null", "budget.flops=2e9", "student.preset=depth-1"])
    teacher = resources.teacher(cfg.teacher.model, "float32").model
    tok = resources.tokenizer(cfg.teacher.model)
    s = build(cfg, resources)
    assert planned_steps(cfg, teacher, tok) == s.total_steps
    free = run_length(cfg, s.plan, s.costs)  # no calibration charged
    assert s.total_steps < free.steps


@pytest.mark.parametrize("tokens", [1, 3, 4, 5, 127, 128, 129, 1000, 1024])
def test_a_tokens_budget_is_rounded_down_to_whole_tokens_per_window(tokens):
    plan = _plan()
    costs = _costs(plan, [1.0])
    B, T = 4, 32
    if tokens < B:
        with pytest.raises(HldError) as err:
            run_length(_cfg(B, T, tokens=tokens), plan, costs)
        assert err.value.problem == f"budget.tokens={tokens} is less than one token per window of a batch (4 windows)"
        return
    got = run_length(_cfg(B, T, tokens=tokens), plan, costs)
    per_window = tokens // B
    assert sum(got.tokens_at(k, B, T) for k in range(got.steps)) == B * per_window
    assert got.steps == -(-per_window // T) and 1 <= got.last_len <= T


# the fixtures' sizes, by hand (docs/compute.md: forward = 2 x every Linear weight of a block + 4 x heads x
# head_dim x the mean context, which is (32 + 1) / 2 at seq_len 32 under the teacher's 64-token window)
TEACHER_BLOCK = 2 * (48 * 48 + 2 * 48 * 24 + 48 * 48 + 3 * 48 * 96) + 4 * 2 * 24 * 33 / 2  # d 48, 2 x 24 heads, 1 kv
TEACHER_HEAD = 2 * 512 * 48  # V 512
STUDENT_BLOCK = 2 * (64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 256) + 4 * 2 * 32 * 33 / 2  # tiny-2l: d 64, ff 256
STUDENT_HEAD = 2 * 512 * 64
PROJECTOR = 3 * 2 * 64 * 48  # one trained projector 64 -> 48


@pytest.mark.parametrize(
    "extra,want",
    [
        (["objective.method=ce"], {"ce": (3 * 2 * STUDENT_BLOCK + 3 * STUDENT_HEAD, 0.0, 0.0)}),
        (
            ["objective.method=kd"],
            {"kd": (3 * 2 * STUDENT_BLOCK + 3 * STUDENT_HEAD, 3 * TEACHER_BLOCK + TEACHER_HEAD, 0.0)},
        ),
        (
            ["objective.method=kd", "budget.count_teacher=false"],
            {"kd": (3 * 2 * STUDENT_BLOCK + 3 * STUDENT_HEAD, 0.0, 0.0)},
        ),
        (  # a frozen (tied) head's backward computes dL/dh only: 2 x its forward, not 3 x
            ["objective.method=kd", "train.freeze_embedding=true"],
            {"kd": (3 * 2 * STUDENT_BLOCK + 2 * STUDENT_HEAD, 3 * TEACHER_BLOCK + TEACHER_HEAD, 0.0)},
        ),
        (  # hidden-only phase: no head on either side, the teacher up to its deepest paired layer (3 of 3)
            ["objective.method=hld-first"],
            {
                "hidden": (3 * 2 * STUDENT_BLOCK, 3 * TEACHER_BLOCK, 2 * PROJECTOR),
                "kd": (3 * 2 * STUDENT_BLOCK + 3 * STUDENT_HEAD, 3 * TEACHER_BLOCK + TEACHER_HEAD, 0.0),
                "hidden+kd": (
                    3 * 2 * STUDENT_BLOCK + 3 * STUDENT_HEAD,
                    3 * TEACHER_BLOCK + TEACHER_HEAD,
                    2 * PROJECTOR,
                ),
            },
        ),
        (  # the relation loss's T x T Gram matrices: (T, d_s) trained, (T, d_t / 3) forward, per pair
            ["objective.method=hld-first", "objective.hidden.loss=relation"],
            {
                "hidden": (3 * 2 * STUDENT_BLOCK, 3 * TEACHER_BLOCK, 2 * (6 * 32 * 64 + 6 * 32 * 48 / 3)),
                "kd": (3 * 2 * STUDENT_BLOCK + 3 * STUDENT_HEAD, 3 * TEACHER_BLOCK + TEACHER_HEAD, 0.0),
                "hidden+kd": (
                    3 * 2 * STUDENT_BLOCK + 3 * STUDENT_HEAD,
                    3 * TEACHER_BLOCK + TEACHER_HEAD,
                    2 * (6 * 32 * 64 + 6 * 32 * 48 / 3),
                ),
            },
        ),
        (  # one pair to teacher layer 1: the teacher stops after its first block
            ["objective.method=hld-first", "objective.hidden.mapping=explicit", "objective.hidden.pairs=[[1,1]]"],
            {
                "hidden": (3 * 2 * STUDENT_BLOCK, TEACHER_BLOCK, PROJECTOR),
                "kd": (3 * 2 * STUDENT_BLOCK + 3 * STUDENT_HEAD, 3 * TEACHER_BLOCK + TEACHER_HEAD, 0.0),
                "hidden+kd": (3 * 2 * STUDENT_BLOCK + 3 * STUDENT_HEAD, 3 * TEACHER_BLOCK + TEACHER_HEAD, PROJECTOR),
            },
        ),
    ],
)
def test_phase_costs_count_what_each_phase_runs(resources, overrides, extra, want):
    """Student 3 x forward (its head only where the phase reads logits), the teacher's forward where it is
    charged and only as deep as the phase reads, projectors 3 x forward; by hand from the fixtures' shapes."""
    s = build(load_config("smoke", [*overrides, *extra]), resources)
    got = phase_costs(s.cfg, s.plan, student=s.student, teacher=s.teacher_lm)
    assert {k: (c.student, c.teacher, c.projectors) for k, c in got.items()} == pytest.approx(want)
    assert phase_costs(s.cfg, s.plan, student=s.student, teacher=None) == {
        k: StepCost(student=c[0], teacher=0.0, projectors=0.0) for k, c in want.items()
    }


@pytest.mark.parametrize(
    "extra,want",
    [
        ([], 0.0),  # a scratch student
        (["student.preset=depth-1"], 16 * 32 * 3 * TEACHER_BLOCK),  # block_influence: 16 windows, no head
        (["student.preset=depth-1", "student.init.rank=angular"], 16 * 32 * 3 * TEACHER_BLOCK),
        (  # loss_drop: the whole teacher (head included) once, and once per dropped block
            ["student.preset=depth-1", "student.init.rank=loss_drop"],
            (3 + 1) * 16 * 32 * (3 * TEACHER_BLOCK + TEACHER_HEAD),
        ),
        (["student.preset=depth-2", "student.init.blocks=[0,2]"], 0.0),  # listed blocks: nothing ranked
        (["student.preset=depth-2", "student.init.blocks=[0,2]", "student.d_ff=48"], 16 * 32 * 3 * TEACHER_BLOCK),
        (  # ranked blocks and pruned heads: two forwards without the head
            ["student.preset=depth-1", "student.init.calibration_windows=3", "student.n_heads=1"],
            2 * 3 * 32 * 3 * TEACHER_BLOCK,
        ),
    ],
)
def test_fixed_flops_is_the_derived_students_calibration(resources, overrides, extra, want):
    cfg = load_config("smoke", [*overrides, *extra])
    teacher = resources.teacher(cfg.teacher.model, "float32").model
    assert fixed_flops(cfg, teacher) == pytest.approx(want, rel=1e-12)
