"""A run's length, derived from its budget: `budget.tokens`, or `budget.flops` with the per-token
costs of its phases (src/hld/flops.py). Steps are never set per arm.

With `budget.count_teacher` (default) the teacher's forward FLOPs are charged to every token an
objective reads teacher signals for, whether the teacher runs online or its signals come from the
offline cache (the cache spent exactly that forward pass; its build is also reported on its own).
"""

from __future__ import annotations

import math

import torch

from hld.config import RunConfig
from hld.distill.objectives import Plan
from hld.errors import HldError
from hld.flops import StepCost, step_cost


def phase_costs(cfg: RunConfig, plan: Plan, *, student: torch.nn.Module,
                teacher: torch.nn.Module | None) -> dict[str, StepCost]:
    """FLOPs per training token of each phase of the plan."""
    seq = cfg.data.seq_len
    out = {}
    for ph in plan.phases:
        obj = ph.objective
        needs = obj.needs
        counted = teacher is not None and needs.any and cfg.budget.count_teacher
        upto = None if needs.logits or not needs.layers else max(needs.layers)
        dims = ()
        if obj.student_layers and teacher is not None:
            dims = ((student.config.hidden_size, teacher.config.hidden_size),) * obj.n_pairs
        out[ph.name] = step_cost(student, seq, teacher=teacher if counted else None, teacher_logits=needs.logits,
                                 teacher_upto=upto, projector_dims=dims, student_logits=obj.uses_head)
    return out


def flops_per_token(plan: Plan, costs: dict[str, StepCost]) -> float:
    """Mean FLOPs per training token over the whole run (phases weighted by their share of steps)."""
    total, start = 0.0, 0.0
    for ph in plan.phases:
        total += (ph.until_share - start) * costs[ph.name].total
        start = ph.until_share
    return total


def total_steps(cfg: RunConfig, plan: Plan, costs: dict[str, StepCost]) -> int:
    tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
    if cfg.budget.flops is not None:
        steps = math.floor(cfg.budget.flops / (tokens_per_step * flops_per_token(plan, costs)))
        unit = f"budget.flops={cfg.budget.flops:.3g}"
    else:
        steps = budget_tokens(cfg) // tokens_per_step
        unit = f"budget.tokens={budget_tokens(cfg)}"
    if steps < 1:
        raise HldError(f"{unit} is less than one step ({cfg.train.batch_size}x{cfg.data.seq_len} tokens)",
                       "raise the budget or lower train.batch_size / data.seq_len")
    return steps


def budget_tokens(cfg: RunConfig) -> int:
    return cfg.budget.tokens if cfg.budget.tokens is not None else DEFAULT_TOKENS


DEFAULT_TOKENS = 65536


def planned_steps(cfg: RunConfig, teacher: torch.nn.Module) -> int:
    """The steps a config will run, without building it for real (the student is built on the meta
    device, so this is cheap for any size). Used to size a teacher cache before training."""
    if cfg.budget.flops is None:
        return total_steps(cfg, None, {})
    from hld.distill.mapping import layer_pairs
    from hld.distill.objectives import build_plan
    from hld.distill.projectors import Projectors
    from hld.models.hooks import n_blocks
    from hld.models.student import build_student

    with torch.device("meta"):
        student = build_student(cfg.student, vocab_size=teacher.get_input_embeddings().weight.shape[0], bos_id=2,
                                eos_id=1, pad_id=0, seed=cfg.train.seed)
        projectors = None
        if cfg.objective.method.startswith("hld"):
            pairs = layer_pairs(cfg.objective.hidden, n_student=n_blocks(student), n_teacher=n_blocks(teacher))
            projectors = Projectors(pairs, d_student=student.config.hidden_size,
                                    d_teacher=teacher.config.hidden_size)
    plan = build_plan(cfg.objective, projectors=projectors, chunk_tokens=cfg.train.loss_chunk_tokens)
    return total_steps(cfg, plan, phase_costs(cfg, plan, student=student, teacher=teacher))
