"""Objectives share one signature: `(batch, student outputs, teacher signals) -> (loss sum, token
count, metric sums)`. The loss is a **sum** over the batch's valid targets and the count is what that
sum is normalised by: the batch's next-token targets (`batch.n_targets`), for every objective and
part. The hidden loss with `skip_first_position` sums over fewer positions (not position 0) but is
divided by the same count, so each of its positions weighs what a head-loss position weighs. The
training loop divides by the global count of the optimiser step and checks that the counts returned
add up to it. A `Plan` says which objective applies at each
point of the budget (hld-first has two phases); the loop never branches on the method.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Protocol

import torch

from hld.config import ObjectiveConfig, ScheduleConfig
from hld.data.packing import Batch
from hld.distill.chunked import HeadLossSpec, head_loss
from hld.distill.divergences.registry import parse as parse_divergence
from hld.distill.hidden import (
    STATS_FILE,
    Moments,
    estimate_layer_stats,
    hidden_mask,
    load_stats,
    normalize_target,
    save_stats,
)
from hld.distill.hidden_losses.lens import Lens, lens_spec
from hld.distill.hidden_losses.registry import hidden_loss
from hld.distill.projectors import Projectors, pair_key
from hld.distill.schedule import step_progress, weight_at
from hld.distill.signals import Needs, StudentOutputs, TeacherSignals

# (loss sum, target count, metric sums): the metrics are detached 0-dim tensors on the loss's device, read
# back by the loop once per step (a float per metric and micro-batch would be a host sync each on a GPU)
Result = tuple[torch.Tensor, int, dict[str, torch.Tensor]]


class Objective(Protocol):
    needs: Needs  # teacher signals read
    student_layers: tuple[int, ...]  # student layers read
    uses_head: bool  # computes the student's logits (counted in FLOPs)
    n_pairs: int  # trained projectors (layer pairs with a projector)

    def cost_dims(self, seq_len: int) -> tuple[tuple[float, float], ...]: ...  # loss matmuls, 6*a*b FLOPs/token

    def set_progress(self, progress: float) -> dict[str, float]: ...  # scheduled weights at progress p

    def __call__(self, batch: Batch, student: StudentOutputs, teacher: Optional[TeacherSignals]) -> Result: ...


class LogitObjective:
    """w_ce * CE + w_kd * T^2 * D(teacher_T, student_T), through the fused chunked head. With an
    alpha schedule, w_kd = alpha(p) and w_ce = 1 - alpha(p) at progress p (`set_progress`)."""

    student_layers: tuple[int, ...] = ()
    uses_head = True
    n_pairs = 0

    def __init__(self, spec: HeadLossSpec, *, schedule: Optional[ScheduleConfig] = None) -> None:
        self.spec = spec
        self.alpha0 = spec.kd_weight
        self.schedule = schedule if spec.kd_weight > 0 or (schedule and schedule.final > 0) else None
        self.needs = Needs(logits=spec.kd_weight > 0 or self.schedule is not None)

    def cost_dims(self, seq_len: int) -> tuple[tuple[float, float], ...]:
        return ()

    def set_progress(self, progress: float) -> dict[str, float]:
        if self.schedule is None:
            return {}
        a = weight_at(progress, self.alpha0, self.schedule)
        self.spec = replace(self.spec, ce_weight=1 - a, kd_weight=a)
        return {"alpha": a}

    def __call__(self, batch: Batch, student: StudentOutputs, teacher: Optional[TeacherSignals]) -> Result:
        h = student.final_hidden.reshape(-1, student.final_hidden.shape[-1])  # (B*T, d)
        spec = self.spec if student.softcap is None else replace(self.spec, softcap=student.softcap)
        loss, stats = head_loss(
            h,
            student.head_weight,
            batch.labels.reshape(-1),
            batch.mask.reshape(-1),
            spec,
            teacher.logits if teacher is not None else None,
        )
        metrics = {"ce": stats["ce"]}
        if self.needs.logits:
            metrics["kd"] = stats["kd"]
        return loss, batch.n_targets, metrics


class HiddenObjective:
    """beta * mean over layer pairs of the hidden loss (src/hld/distill/hidden_losses/) between the
    student layer (projected, when the loss declares a projector) and its teacher layer's target, on
    the positions that have a target (minus position 0 with `skip_first_position`)."""

    uses_head = False

    def __init__(
        self,
        projectors: Projectors,
        *,
        loss: str,
        normalize_teacher: str,
        beta: float,
        skip_first_position: bool = False,
        schedule: Optional[ScheduleConfig] = None,
        lens: Optional[Lens] = None,
        lens_spec: Optional[HeadLossSpec] = None,
    ) -> None:
        kind = hidden_loss(loss)
        self.kind = kind.build(lens=lens, lens_spec=lens_spec)
        if kind.projector != projectors.maps:
            raise ValueError(f"loss={loss} {'needs' if kind.projector else 'takes no'} projectors")
        self.projectors = projectors
        self.normalize_teacher, self.beta0 = normalize_teacher, beta
        self.beta = beta  # the weight in force (scheduled: set_progress)
        self.skip_first = skip_first_position
        self.schedule = schedule
        self.stats: Optional[dict[int, Moments]] = None  # standardize: teacher layer -> frozen moments
        self.needs = Needs(layers=tuple(sorted({t for _, t in projectors.pairs})))
        self.student_layers = tuple(sorted({s for s, _ in projectors.pairs}))
        self.n_pairs = len(projectors.pairs) if projectors.linear else 0  # trained projectors

    @property
    def wants_stats(self) -> bool:
        return self.normalize_teacher == "standardize" and self.kind.normalized_target

    def cost_dims(self, seq_len: int) -> tuple[tuple[float, float], ...]:
        """FLOPs per token of the loss's matmuls, as (a, b) with 6*a*b each (`flops.step_cost`'s
        projector term): a projector d_s -> d_t trained (x3), then the loss's own (`HiddenLoss.cost_dims`)."""
        d_s, d_t = self.projectors.d_student, self.projectors.d_teacher
        n = len(self.projectors.pairs)
        dims: tuple[tuple[float, float], ...] = (
            ((d_s, d_t),) * n if self.kind.projector and self.projectors.linear else ()
        )
        if self.kind.projector and self.projectors.basis is not None:  # fixed P: forward and dL/ds, 4 d_s d_t
            dims = ((d_s, 2 * d_t / 3),) * n
        return dims + self.kind.cost_dims(d_student=d_s, d_teacher=d_t, seq_len=seq_len) * n

    def set_progress(self, progress: float) -> dict[str, float]:
        if self.schedule is None:
            return {}
        self.beta = weight_at(progress, self.beta0, self.schedule)
        return {"beta": self.beta}

    def target(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """The teacher target of `layer`, normalised as configured, or the raw state for a loss that
        reads it (`lens` matches it through the teacher's own norm and head). x (..., d_t)."""
        if not self.kind.normalized_target:
            return x
        moments = self.stats.get(layer) if self.stats is not None else None
        return normalize_target(x, self.normalize_teacher, moments)

    def pair_sum(
        self, pair: tuple[int, int], s_hidden: torch.Tensor, t_hidden: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """The loss of one layer pair summed over `mask`. s_hidden (B, T, d_s), t_hidden (B, T, d_t), mask (B, T)."""
        s, t = pair
        pred = s_hidden
        if self.kind.projector and self.projectors.identity:  # the student's block is a teacher block:
            pred = self.target(t, self.projectors(pair, s_hidden))  # its state (in the teacher's basis)
            # normalised as the teacher's (B, T, d_t)
        elif self.kind.projector:
            proj = self.projectors.proj[pair_key(pair)]
            pred = proj(s_hidden.to(proj.weight.dtype))  # type: ignore[arg-type]  # (B, T, d_t)
        return self.kind.pair_sum(pred, self.target(t, t_hidden), mask)

    def __call__(self, batch: Batch, student: StudentOutputs, teacher: Optional[TeacherSignals]) -> Result:
        mask = hidden_mask(batch.mask, skip_first=self.skip_first)  # (B, T)
        total = student.final_hidden.new_zeros((), dtype=torch.float32)
        for pair in self.projectors.pairs:
            s, t = pair
            total = total + self.pair_sum(pair, student.hidden[s], teacher.hidden[t], mask)
        total = total / len(self.projectors.pairs)
        return self.beta * total, batch.n_targets, {"hidden": total.detach()}


class SumObjective:
    """The sum of its parts' losses and metrics; their counts must agree (one normaliser per batch)."""

    def __init__(self, *parts: Objective) -> None:
        self.parts = parts
        self.needs = Needs()
        for p in parts:
            self.needs = self.needs | p.needs
        self.student_layers = tuple(sorted({i for p in parts for i in p.student_layers}))
        self.uses_head = any(p.uses_head for p in parts)
        self.n_pairs = sum(p.n_pairs for p in parts)

    def cost_dims(self, seq_len: int) -> tuple[tuple[float, float], ...]:
        return tuple(d for p in self.parts for d in p.cost_dims(seq_len))

    def set_progress(self, progress: float) -> dict[str, float]:
        out: dict[str, float] = {}
        for p in self.parts:
            out.update(p.set_progress(progress))
        return out

    def __call__(self, batch: Batch, student: StudentOutputs, teacher: Optional[TeacherSignals]) -> Result:
        total, counts, metrics = None, set(), {}
        for part in self.parts:
            loss, n, m = part(batch, student, teacher)
            total = loss if total is None else total + loss
            counts.add(n)
            metrics.update(m)
        return total, _one_count(counts), metrics


class BlendObjective(SumObjective):
    """The step that straddles a phase boundary: share * (phase before) + (1 - share) * (phase after),
    `share` being the part of the step's tokens that falls before the boundary. Both parts are
    computed on every window of the step (and counted in FLOPs: the union of their costs)."""

    def __init__(self, before: Objective, after: Objective) -> None:
        super().__init__(before, after)
        self.share = 1.0

    def __call__(self, batch: Batch, student: StudentOutputs, teacher: Optional[TeacherSignals]) -> Result:
        (a, n, ma), (b, nb, mb) = (p(batch, student, teacher) for p in self.parts)
        return self.share * a + (1 - self.share) * b, _one_count({n, nb}), {**ma, **mb}


def _one_count(counts: set[int]) -> int:
    """The count every part was normalised by; parts that disagree would mix two normalisations."""
    if len(counts) != 1:
        raise ValueError(f"the parts of an objective return different token counts {sorted(counts)}")
    return counts.pop()


@dataclass
class Phase:
    name: str
    until_share: float  # this phase runs while the share of the run's tokens seen < until_share
    objective: Objective


class Plan:
    """The objective in force at each point of the budget. Phase i covers the token shares
    [until_share(i-1), until_share(i)); a step whose tokens straddle a boundary runs the blend of
    the two phases weighted by how many of its tokens fall on each side, so a phase spends exactly
    its share of the run's tokens (not a whole number of steps)."""

    def __init__(self, phases: list[Phase]) -> None:
        self.phases = phases
        self.needs = Needs()
        for ph in phases:
            self.needs = self.needs | ph.objective.needs
        self.student_layers = tuple(sorted({i for ph in phases for i in ph.objective.student_layers}))
        self.boundaries = [
            Phase(f"{a.name}+{b.name}", a.until_share, BlendObjective(a.objective, b.objective))
            for a, b in zip(phases[:-1], phases[1:])
        ]

    def phase_for(self, start: float, end: float) -> Phase:
        """The phase of a step reading the token shares [start, end) of the run: a phase, or the
        blend at a boundary that falls strictly inside the step."""
        eps = 1e-12
        for i, ph in enumerate(self.phases[:-1]):
            b = ph.until_share
            if end <= b + eps:
                return ph
            if start < b - eps:
                blend = self.boundaries[i]
                blend.objective.share = (b - start) / (end - start)  # type: ignore[attr-defined]
                return blend
        return self.phases[-1]

    def all_phases(self) -> list[Phase]:
        """The phases and the boundary blends (everything a step can run; each has a FLOPs cost)."""
        return self.phases + self.boundaries

    def at_step(
        self, step: int, total_steps: int, *, tokens_before: int, tokens_in_step: int, tokens_total: int
    ) -> tuple[Phase, dict[str, float]]:
        """The phase of optimiser step `step` and the scheduled weights in force (set on its objectives)."""
        phase = self.phase_for(tokens_before / tokens_total, (tokens_before + tokens_in_step) / tokens_total)
        weights = phase.objective.set_progress(step_progress(step, total_steps))
        return phase, weights


def logit_spec(
    cfg: ObjectiveConfig, *, chunk_tokens: int, kd: bool, matmul_dtype: Optional[torch.dtype] = None
) -> HeadLossSpec:
    alpha = cfg.alpha if kd else 0.0
    return HeadLossSpec(
        ce_weight=1 - alpha,
        kd_weight=alpha,
        temperature=cfg.temperature,
        divergence=parse_divergence(cfg.divergence),
        top_k=cfg.top_k,
        top_k_rest=cfg.top_k_rest,
        chunk_tokens=chunk_tokens,
        matmul_dtype=matmul_dtype,
    )


def build_plan(
    cfg: ObjectiveConfig,
    *,
    projectors: Optional[Projectors],
    chunk_tokens: int,
    matmul_dtype: Optional[torch.dtype] = None,
    teacher_lm: Optional[torch.nn.Module] = None,
) -> Plan:
    """`teacher_lm` is read only by a loss that declares `teacher_head` (`lens`: its final norm and head)."""
    method = cfg.method
    if method == "ce":
        spec = logit_spec(cfg, chunk_tokens=chunk_tokens, kd=False, matmul_dtype=matmul_dtype)
        return Plan([Phase("ce", 1.0, LogitObjective(spec))])
    alpha_schedule = cfg.alpha_schedule if cfg.alpha_schedule.kind != "constant" else None
    kd = LogitObjective(
        logit_spec(cfg, chunk_tokens=chunk_tokens, kd=True, matmul_dtype=matmul_dtype), schedule=alpha_schedule
    )
    if method == "kd":
        return Plan([Phase("kd", 1.0, kd)])
    hidden = hidden_objective(
        cfg, projectors, chunk_tokens=chunk_tokens, matmul_dtype=matmul_dtype, teacher_lm=teacher_lm
    )
    return method_plan(method, kd, hidden, first_share=cfg.hidden.first_share)


def method_plan(method: str, kd: Objective, hidden: Objective, *, first_share: float) -> Plan:
    """The plan of an HLD method from its logit and hidden objectives: hld-joint their sum throughout,
    hld-first the hidden one for `first_share` of the tokens, then the logit one."""
    if method == "hld-joint":
        return Plan([Phase("hld-joint", 1.0, SumObjective(kd, hidden))])
    if method == "hld-first":
        return Plan([Phase("hidden", first_share, hidden), Phase("kd", 1.0, kd)])
    raise ValueError(method)


def hidden_objective(
    cfg: ObjectiveConfig,
    projectors: Optional[Projectors],
    *,
    chunk_tokens: int,
    matmul_dtype: Optional[torch.dtype] = None,
    teacher_lm: Optional[torch.nn.Module] = None,
    kind: type[HiddenObjective] | None = None,
    **extra,
) -> HiddenObjective:
    """The hidden objective `cfg.hidden` describes, of class `kind` (HiddenObjective; the cross-tokenizer one
    takes its `pooling` in `extra`). `teacher_lm` is read only by a loss that declares `teacher_head`
    (`lens`: its final norm and head)."""
    h = cfg.hidden
    if projectors is None:
        raise ValueError(f"objective.method={cfg.method} needs the layer pairs' projectors")
    lens = lspec = None
    if hidden_loss(h.loss).teacher_head:
        if teacher_lm is None:
            raise ValueError(f"objective.hidden.loss={h.loss} needs the teacher model (build_plan(teacher_lm=...))")
        lens = Lens.of(teacher_lm)
        lspec = lens_spec(
            temperature=cfg.temperature, chunk_tokens=chunk_tokens, softcap=lens.softcap, matmul_dtype=matmul_dtype
        )
    return (kind or HiddenObjective)(
        projectors,
        loss=h.loss,
        normalize_teacher=h.normalize_teacher,
        beta=h.beta,
        skip_first_position=h.skip_first_position,
        schedule=h.beta_schedule if h.beta_schedule.kind != "constant" else None,
        lens=lens,
        lens_spec=lspec,
        **extra,
    )


def hidden_objectives(plan: Plan) -> list[HiddenObjective]:
    """The plan's hidden objectives (those the standardisation statistics are set on)."""
    out: list = []

    def walk(obj) -> None:
        if isinstance(obj, HiddenObjective) and obj not in out:
            out.append(obj)
        for part in getattr(obj, "parts", ()):
            walk(part)

    for ph in plan.all_phases():
        walk(ph.objective)
    return out


def fit_targets(
    plan: Plan, teacher, order, cfg: ObjectiveConfig, *, max_windows: Optional[int] = None
) -> Optional[dict[int, Moments]]:
    """`standardize`: estimate the teacher layers' statistics on the run's first training windows
    (at most `max_windows`: those the run reads, which is what a teacher cache holds) and freeze
    them on the plan's hidden objectives (None when no objective standardises)."""
    objs = [o for o in hidden_objectives(plan) if o.wants_stats]
    if not objs or teacher is None:
        return None
    layers = tuple(sorted({t for o in objs for _, t in o.projectors.pairs}))
    n = min(cfg.hidden.stats_windows, order.n_windows, max_windows or order.n_windows)
    skip = cfg.hidden.skip_first_position
    stored = getattr(teacher, "layer_stats", None)  # a per-chunk cache holds them (its states are pooled)
    stats = stored(layers, n_windows=n, skip_first=skip) if stored is not None else None
    if stats is None:
        stats = estimate_layer_stats(teacher, order, layers, n_windows=n, skip_first=skip)
    set_targets(plan, stats)
    return stats


def set_targets(plan: Plan, stats: dict[int, Moments]) -> None:
    for o in hidden_objectives(plan):
        o.stats = stats


def keep_targets(plan: Plan, run_dir: Path, *, write: bool) -> None:
    """Freeze the statistics in the run directory: a run's first start writes RUN_DIR/hidden_stats.pt
    (`write`: rank 0), a resumed run reads them back, so every step of the run uses the same ones."""
    objs = [o for o in hidden_objectives(plan) if o.stats is not None]
    if not objs:
        return
    path = Path(run_dir) / STATS_FILE
    if os.path.lexists(path):  # a dangling link too: refused in one line, never written over
        set_targets(plan, load_stats(path))
    elif write:
        save_stats(objs[0].stats, path)
