"""Objectives share one signature: `(batch, student outputs, teacher signals) -> (loss sum, token
count, metric sums)`. The loss is a **sum** over the batch's valid targets; the training loop
divides by the global count of the optimiser step. A `Plan` says which objective applies at each
point of the budget (hld-first has two phases); the loop never branches on the method.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol

import torch

from hld.config import ObjectiveConfig
from hld.data.packing import Batch
from hld.distill.chunked import HeadLossSpec, head_loss
from hld.distill.losses import hidden_sum
from hld.distill.projectors import Projectors, pair_key
from hld.distill.signals import Needs, StudentOutputs, TeacherSignals

Result = tuple[torch.Tensor, int, dict[str, float]]


class Objective(Protocol):
    needs: Needs  # teacher signals read
    student_layers: tuple[int, ...]  # student layers read
    uses_head: bool  # computes the student's logits (counted in FLOPs)
    n_pairs: int  # hidden-state layer pairs (projectors, counted in FLOPs)

    def __call__(self, batch: Batch, student: StudentOutputs, teacher: Optional[TeacherSignals]) -> Result: ...


class LogitObjective:
    """w_ce * CE + w_kd * T^2 * D(teacher_T, student_T), through the fused chunked head."""

    student_layers: tuple[int, ...] = ()
    uses_head = True
    n_pairs = 0

    def __init__(self, spec: HeadLossSpec) -> None:
        self.spec = spec
        self.needs = Needs(logits=spec.kd_weight > 0)

    def __call__(self, batch: Batch, student: StudentOutputs, teacher: Optional[TeacherSignals]) -> Result:
        h = student.final_hidden.reshape(-1, student.final_hidden.shape[-1])  # (B*T, d)
        spec = self.spec if student.softcap is None else _with_softcap(self.spec, student.softcap)
        loss, stats = head_loss(h, student.head_weight, batch.labels.reshape(-1), batch.mask.reshape(-1), spec,
                                teacher.logits if teacher is not None else None)
        metrics = {"ce": stats["ce"]}
        if self.spec.kd_weight:
            metrics["kd"] = stats["kd"]
        return loss, batch.n_targets, metrics


def _with_softcap(spec: HeadLossSpec, cap: float) -> HeadLossSpec:
    from dataclasses import replace
    return replace(spec, softcap=cap)


class HiddenObjective:
    """beta * mean over layer pairs of the per-token hidden loss between projected student states and
    (optionally RMS-normalised) teacher states, on the positions that have a target."""

    uses_head = False

    def __init__(self, projectors: Projectors, *, loss: str, normalize_teacher: str, beta: float) -> None:
        self.projectors = projectors
        self.loss, self.normalize_teacher, self.beta = loss, normalize_teacher, beta
        self.needs = Needs(layers=tuple(sorted({t for _, t in projectors.pairs})))
        self.student_layers = tuple(sorted({s for s, _ in projectors.pairs}))
        self.n_pairs = len(projectors.pairs)

    def __call__(self, batch: Batch, student: StudentOutputs, teacher: Optional[TeacherSignals]) -> Result:
        mask = batch.mask.reshape(-1)
        total = student.final_hidden.new_zeros((), dtype=torch.float32)
        for pair in self.projectors.pairs:
            s, t = pair
            proj = self.projectors.proj[pair_key(pair)]
            pred = proj(student.hidden[s].to(proj.weight.dtype))  # (B, T, d_t)
            target = teacher.hidden[t]
            total = total + hidden_sum(pred.reshape(-1, pred.shape[-1]), target.reshape(-1, target.shape[-1]),
                                       mask, loss=self.loss, normalize_teacher=self.normalize_teacher)
        total = total / len(self.projectors.pairs)
        return self.beta * total, batch.n_targets, {"hidden": float(total.detach())}


class SumObjective:
    def __init__(self, *parts: Objective) -> None:
        self.parts = parts
        self.needs = Needs()
        for p in parts:
            self.needs = self.needs | p.needs
        self.student_layers = tuple(sorted({i for p in parts for i in p.student_layers}))
        self.uses_head = any(p.uses_head for p in parts)
        self.n_pairs = sum(p.n_pairs for p in parts)

    def __call__(self, batch: Batch, student: StudentOutputs, teacher: Optional[TeacherSignals]) -> Result:
        total, metrics = None, {}
        for part in self.parts:
            loss, n, m = part(batch, student, teacher)
            total = loss if total is None else total + loss
            metrics.update(m)
        return total, n, metrics


@dataclass
class Phase:
    name: str
    until_share: float  # this phase runs while tokens_seen / budget < until_share
    objective: Objective


class Plan:
    """The objective in force at each point of the budget."""

    def __init__(self, phases: list[Phase]) -> None:
        self.phases = phases
        self.needs = Needs()
        for ph in phases:
            self.needs = self.needs | ph.objective.needs
        self.student_layers = tuple(sorted({i for ph in phases for i in ph.objective.student_layers}))

    def phase_at(self, progress: float) -> Phase:
        for ph in self.phases:
            if progress < ph.until_share:
                return ph
        return self.phases[-1]


def logit_spec(cfg: ObjectiveConfig, *, chunk_tokens: int, kd: bool,
               matmul_dtype: Optional[torch.dtype] = None) -> HeadLossSpec:
    alpha = cfg.alpha if kd else 0.0
    return HeadLossSpec(ce_weight=1 - alpha, kd_weight=alpha, temperature=cfg.temperature,
                        divergence=cfg.divergence, jsd_beta=cfg.jsd_beta, top_k=cfg.top_k,
                        top_k_rest=cfg.top_k_rest,
                        chunk_tokens=chunk_tokens, matmul_dtype=matmul_dtype)


def build_plan(cfg: ObjectiveConfig, *, projectors: Optional[Projectors], chunk_tokens: int,
               matmul_dtype: Optional[torch.dtype] = None) -> Plan:
    method = cfg.method
    if method == "ce":
        spec = logit_spec(cfg, chunk_tokens=chunk_tokens, kd=False, matmul_dtype=matmul_dtype)
        return Plan([Phase("ce", 1.0, LogitObjective(spec))])
    kd = LogitObjective(logit_spec(cfg, chunk_tokens=chunk_tokens, kd=True, matmul_dtype=matmul_dtype))
    if method == "kd":
        return Plan([Phase("kd", 1.0, kd)])
    h = cfg.hidden
    hidden = HiddenObjective(projectors, loss=h.loss, normalize_teacher=h.normalize_teacher, beta=h.beta)
    if method == "hld-joint":
        return Plan([Phase("hld-joint", 1.0, SumObjective(kd, hidden))])
    if method == "hld-first":
        return Plan([Phase("hidden", h.first_share, hidden), Phase("kd", 1.0, kd)])
    raise ValueError(method)
