"""A run's length, derived from its budget: `budget.tokens`, or `budget.flops` with the per-token
costs of its phases (src/hld/flops.py). Steps are never set per arm; the last step may read a
prefix of its windows so the budget is met to within one token per window.

With `budget.count_teacher` (default) the teacher's forward FLOPs are charged to every token an
objective reads teacher signals for, whether the teacher runs online or its signals come from the
offline cache (the cache spent exactly that forward pass; its build is also reported on its own).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from hld.config import RunConfig
from hld.config_checks import MAX_STEPS, derived_depth
from hld.distill.objectives import Plan
from hld.errors import HldError
from hld.flops import StepCost, planned_calibration, step_cost


def phase_costs(
    cfg: RunConfig,
    plan: Plan,
    *,
    student: torch.nn.Module,
    teacher: torch.nn.Module | None,
    teacher_seq_len: Optional[int] = None,
) -> dict[str, StepCost]:
    """FLOPs per training token of each phase of the plan (and of each boundary blend). `teacher_seq_len`:
    the teacher's window length when it reads other tokens than the student (paired windows)."""
    seq = cfg.data.seq_len
    out = {}
    for ph in plan.all_phases():
        obj = ph.objective
        needs = obj.needs
        counted = teacher is not None and needs.any and cfg.budget.count_teacher
        upto = None if needs.logits or not needs.layers else max(needs.layers)
        dims = tuple(obj.cost_dims(seq)) if teacher is not None else ()
        out[ph.name] = step_cost(
            student,
            seq,
            teacher=teacher if counted else None,
            teacher_logits=needs.logits,
            teacher_upto=upto,
            projector_dims=dims,
            student_logits=obj.uses_head,
            frozen_head=cfg.train.freeze_embedding,
            teacher_seq_len=teacher_seq_len,
        )
    return out


def flops_per_token(plan: Plan, costs: dict[str, StepCost]) -> float:
    """Mean FLOPs per training token over the whole run (phases weighted by their share of tokens)."""
    total, start = 0.0, 0.0
    for ph in plan.phases:
        total += (ph.until_share - start) * costs[ph.name].total
        start = ph.until_share
    return total


@dataclass(frozen=True)
class Length:
    """A run's length: `steps` optimiser steps, the last of which reads only the first `last_len`
    positions of its windows (`seq_len` when it is a full step). Cutting the last step short meets a
    budget to within one token per window instead of one whole step: at 10 steps a whole step would
    be 10% of the budget, so arms compared "at equal FLOPs" could differ by that much."""

    steps: int
    last_len: int

    def tokens_at(self, step: int, batch_size: int, seq_len: int) -> int:
        """Input positions read by step `step` (0-based)."""
        return batch_size * (self.last_len if step == self.steps - 1 else seq_len)


def step_phase(plan: Plan, step: int, steps: int, *, last_share: float = 1.0) -> str:
    """The phase (or boundary blend) step `step` of `steps` runs, by the loop's own rule
    (`Plan.phase_for` on the step's token shares); `last_share`: the share of a full step the last one reads."""
    total = steps - 1 + last_share
    width = last_share if step == steps - 1 else 1.0
    return plan.phase_for(step / total, (step + width) / total).name


def step_counts(plan: Plan, steps: int) -> dict[str, int]:
    """How many of `steps` full steps run each phase and each boundary blend, by `step_phase`'s rule:
    the phase before a boundary at share b runs the steps that end by b (floor(b * steps) of them
    after the previous boundary), and when b * steps is not whole the next step is the blend."""
    counts: dict[str, int] = {}
    start = 0
    for i, ph in enumerate(plan.phases):
        if i == len(plan.phases) - 1:
            counts[ph.name] = counts.get(ph.name, 0) + max(0, steps - start)
            break
        k = min(steps, max(start, math.floor(ph.until_share * steps + 1e-9)))
        counts[ph.name] = counts.get(ph.name, 0) + k - start
        start = k
        if k < steps:
            name = step_phase(plan, k, steps)
            if name == plan.boundaries[i].name:
                counts[name] = counts.get(name, 0) + 1
                start = k + 1
    return counts


def _full_steps_flops(plan: Plan, costs: dict[str, StepCost], steps: int, tokens_per_step: int) -> float:
    return tokens_per_step * sum(n * costs[name].total for name, n in step_counts(plan, steps).items())


EXACT_STEPS = 20_000  # up to this many steps the last step's length is found with the loop's own phases


def spent_flops(plan: Plan, costs: dict[str, StepCost], steps: int, last_len: int, B: int, T: int) -> float:
    """FLOPs the loop counts for `steps` steps whose last reads `last_len` positions per window: a cut
    last step shortens the run, and the phase boundaries (shares of the run's tokens) move with it."""
    share = last_len / T
    return sum(
        B * (last_len if k == steps - 1 else T) * costs[step_phase(plan, k, steps, last_share=share)].total
        for k in range(steps)
    )


def _exact_last_len(
    plan: Plan, costs: dict[str, StepCost], steps: int, guess: int, budget: float, B: int, T: int
) -> int:
    """The longest last step (0..T positions) whose run stays within `budget` by `spent_flops`, searched
    from `guess` (the estimate that ignores how the boundaries move): for a multi-phase plan (hld-first)
    the estimate can overspend by a boundary step's share of a short run."""
    last = min(guess, T)
    while last >= 1 and spent_flops(plan, costs, steps, last, B, T) > budget:
        last -= 1
    while last < T and spent_flops(plan, costs, steps, last + 1, B, T) <= budget:
        last += 1
    return last


def run_length(
    cfg: RunConfig, plan: Plan, costs: dict[str, StepCost], *, fixed_flops: float = 0.0, whole_steps: bool = False
) -> Length:
    """Steps (and the last step's length) that spend the budget: exactly `budget.tokens` input
    positions (rounded down to a multiple of batch_size), or the most tokens whose FLOPs, phase by
    phase, stay within `budget.flops` less `fixed_flops` (spent before step 0: a derived student's
    calibration, `hld.models.derive`). `whole_steps` (paired windows, which are never cut inside: a chunk
    would lose one side): a last step that would be cut short is dropped, so the run stays within its budget
    by less than one step."""
    B, T = cfg.train.batch_size, cfg.data.seq_len
    if cfg.budget.flops is None:
        tokens = budget_tokens(cfg)
        unit = f"budget.tokens={tokens}"
        steps = -(-tokens // (B * T))
        last = (tokens - (steps - 1) * B * T) // B if steps else 0
    else:
        budget = cfg.budget.flops - fixed_flops
        unit = f"budget.flops={cfg.budget.flops:.3g}"
        if budget <= 0:
            raise HldError(
                f"{unit} is spent before training: deriving the student costs {fixed_flops:.3g} FLOPs",
                "raise budget.flops, or lower student.init.calibration_windows (or list student.init.blocks)",
            )
        estimate = budget / (B * T * flops_per_token(plan, costs))
        if estimate > MAX_STEPS:  # refused before the step search below walks that far
            raise HldError(
                f"{unit} needs about {estimate:.3g} steps of {B}x{T} tokens, more than the limit of {MAX_STEPS:,}",
                "lower budget.flops, or raise train.batch_size or data.seq_len",
            )
        steps = max(1, math.floor(estimate) - 2)
        while _full_steps_flops(plan, costs, steps, B * T) < budget:  # the first `steps` that reach it
            steps += 1
        while steps > 1 and _full_steps_flops(plan, costs, steps - 1, B * T) >= budget:
            steps -= 1
        last_cost = costs[step_phase(plan, steps - 1, steps)].total
        before = _full_steps_flops(plan, costs, steps, B * T) - B * T * last_cost
        last = min(T, math.floor((budget - before) / (B * last_cost)))
        if steps <= EXACT_STEPS and len(plan.phases) > 1:
            last = _exact_last_len(plan, costs, steps, max(last, 0), budget, B, T)
    if last < 1 or (whole_steps and last < T):  # the remainder is less than one token per window: drop that step
        steps, last = steps - 1, T
    if steps < 1:
        raise HldError(
            f"{unit} is less than one token per window of a batch ({B} windows)",
            "raise the budget or lower train.batch_size",
        )
    return Length(steps=steps, last_len=last)


def budget_tokens(cfg: RunConfig) -> int:
    return cfg.budget.tokens if cfg.budget.tokens is not None else DEFAULT_TOKENS


DEFAULT_TOKENS = 65536


def sized_plan(
    cfg: RunConfig, teacher: torch.nn.Module, tokenizer, *, student_tokenizer=None, teacher_seq_len=None
) -> tuple[Plan, int]:
    """The plan and the steps a config will run, without building it for real (the student is
    assembled on the meta device, so this is cheap for any size). Sizes a teacher cache before training.
    `student_tokenizer`, `teacher_seq_len`: a student with its own tokenizer (paired windows), as `build`."""
    from hld.train.assembly import meta_assembly

    parts = meta_assembly(cfg, teacher, tokenizer, student_tokenizer)
    costs = phase_costs(cfg, parts.plan, student=parts.student, teacher=teacher, teacher_seq_len=teacher_seq_len)
    paired = student_tokenizer is not None  # paired windows are never cut inside (`run_length`)
    length = run_length(cfg, parts.plan, costs, fixed_flops=fixed_flops(cfg, teacher), whole_steps=paired)
    return parts.plan, length.steps


def fixed_flops(cfg: RunConfig, teacher: torch.nn.Module) -> float:
    """FLOPs a run spends before step 0: a derived student's calibration (`hld.models.derive`), else 0."""
    if derived_depth(cfg.student.preset) is None:
        return 0.0
    return planned_calibration(cfg.student, teacher, cfg.data.seq_len)[1]


def planned_steps(cfg: RunConfig, teacher: torch.nn.Module, tokenizer) -> int:
    """The steps a config will run (`sized_plan`)."""
    return sized_plan(cfg, teacher, tokenizer)[1]
