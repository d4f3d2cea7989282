"""Layer mapping, projectors, the hidden objective and the per-method plans; then, on the tiny
teacher, that the projectors are trained (they get gradients and sit in the optimiser)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import tiny_overrides
from hld.config import HiddenConfig, ObjectiveConfig, load_config
from hld.data.packing import IGNORE, Batch
from hld.distill.chunked import HeadLossSpec
from hld.distill.mapping import layer_pairs
from hld.distill.objectives import HiddenObjective, LogitObjective, SumObjective, build_plan
from hld.distill.projectors import Projectors
from hld.distill.signals import Needs, StudentOutputs, TeacherSignals
from hld.errors import HldError


def fixture_overrides(method: str, *extra: str) -> list[str]:
    """The fixtures' seconds-long run (helpers.tiny_overrides) at 8 windows a batch (one step)."""
    return [*tiny_overrides(), "train.batch_size=8", f"objective.method={method}", *extra]


# --------------------------------------------------------------------------- layer mapping


@pytest.mark.parametrize(
    "n_student,n_teacher,expected",
    [
        (1, 18, [(1, 18)]),
        (2, 3, [(1, 2), (2, 3)]),  # 1.5 rounds half to even
        (2, 18, [(1, 9), (2, 18)]),
        (3, 18, [(1, 6), (2, 12), (3, 18)]),
        (4, 18, [(1, 4), (2, 9), (3, 14), (4, 18)]),  # 4.5 -> 4, 13.5 -> 14 (half to even)
        (6, 6, [(1, 1), (2, 2), (3, 3), (4, 4), (5, 5), (6, 6)]),
    ],
)
def test_uniform_pairs(n_student, n_teacher, expected):
    pairs = layer_pairs(HiddenConfig(mapping="uniform"), n_student=n_student, n_teacher=n_teacher)
    assert pairs == expected
    # same relative depth in both models (within half a teacher block)
    for s, t in pairs:
        assert abs(t / n_teacher - s / n_student) <= 0.5 / n_teacher + 1e-12


def test_uniform_fewer_pairs_than_blocks():
    cfg = HiddenConfig(mapping="uniform", n_pairs=2)
    assert layer_pairs(cfg, n_student=4, n_teacher=18) == [(2, 9), (4, 18)]
    assert layer_pairs(HiddenConfig(n_pairs=1), n_student=4, n_teacher=18) == [(4, 18)]


@pytest.mark.parametrize("n_pairs", [0, 5])
def test_uniform_n_pairs_out_of_range(n_pairs):
    with pytest.raises(HldError, match=r"1\.\.4"):
        layer_pairs(HiddenConfig(n_pairs=n_pairs), n_student=4, n_teacher=18)


def test_last_pairs():
    assert layer_pairs(HiddenConfig(mapping="last"), n_student=3, n_teacher=18) == [(3, 18)]


def test_explicit_pairs_kept_in_order_including_embeddings():
    cfg = HiddenConfig(mapping="explicit", pairs=[[0, 0], [1, 9], [2, 18]])
    assert layer_pairs(cfg, n_student=2, n_teacher=18) == [(0, 0), (1, 9), (2, 18)]


@pytest.mark.parametrize(
    "pair,who,rng",
    [
        ([3, 5], "student", "0..2"),
        ([-1, 5], "student", "0..2"),
        ([1, 19], "teacher", "0..18"),
        ([1, -2], "teacher", "0..18"),
    ],
)
def test_explicit_out_of_range(pair, who, rng):
    with pytest.raises(HldError) as err:
        layer_pairs(HiddenConfig(mapping="explicit", pairs=[pair]), n_student=2, n_teacher=18)
    msg = str(err.value)
    assert who in msg and rng in msg and str(pair[0] if who == "student" else pair[1]) in msg


@pytest.mark.parametrize("bad", [[1], [1, 2, 3], "1,2", [1.0, 2], {"s": 1}])
def test_explicit_malformed_entry(bad):
    with pytest.raises(HldError, match="student_layer, teacher_layer"):
        layer_pairs(HiddenConfig(mapping="explicit", pairs=[bad]), n_student=2, n_teacher=18)


# --------------------------------------------------------------------------- projectors


def test_projector_shapes_and_keys():
    pairs = [(1, 4), (2, 9)]
    p = Projectors(pairs, d_student=16, d_teacher=40, seed=3)
    x = torch.randn(2, 5, 16)
    for pair in pairs:
        assert p(pair, x).shape == (2, 5, 40)
    assert set(p.proj.keys()) == {"s1_t4", "s2_t9"}
    assert all(lin.weight.shape == (40, 16) and lin.bias is None for lin in p.proj.values())
    assert p.n_params() == 2 * 16 * 40


def test_projector_init_depends_on_seed_only():
    torch.manual_seed(0)
    a = Projectors([(1, 2)], d_student=8, d_teacher=12, seed=5)
    state = torch.random.get_rng_state()
    torch.manual_seed(123)
    b = Projectors([(1, 2)], d_student=8, d_teacher=12, seed=5)
    c = Projectors([(1, 2)], d_student=8, d_teacher=12, seed=6)
    torch.testing.assert_close(a.proj["s1_t2"].weight, b.proj["s1_t2"].weight)
    assert not torch.equal(a.proj["s1_t2"].weight, c.proj["s1_t2"].weight)
    torch.manual_seed(0)
    Projectors([(1, 2)], d_student=8, d_teacher=12, seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global stream is left untouched


# --------------------------------------------------------------------------- hidden objective


def _batch(B: int, T: int, seed: int) -> Batch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 50, (B, T), generator=g)
    labels = torch.roll(ids, -1, dims=1)
    labels[:, -1] = IGNORE
    labels[0, 2] = IGNORE  # a document boundary
    return Batch(ids, labels)


@pytest.mark.parametrize("loss,norm", [("mse", "rms"), ("nmse", "none"), ("cosine", "rms"), ("mse", "none")])
def test_hidden_objective_matches_hand_computation(loss, norm):
    B, T, d_s, d_t = 2, 6, 8, 12
    pairs = [(1, 2), (2, 3)]
    proj = Projectors(pairs, d_student=d_s, d_teacher=d_t, seed=0)
    batch = _batch(B, T, 0)
    g = torch.Generator().manual_seed(1)
    s_hidden = {1: torch.randn(B, T, d_s, generator=g), 2: torch.randn(B, T, d_s, generator=g)}
    t_hidden = {
        2: torch.randn(B, T, d_t, generator=g) * 20,
        3: torch.randn(B, T, d_t, generator=g) * 50,
        1: torch.randn(B, T, d_t, generator=g),
    }  # layer 1 is not paired: must be ignored
    student = StudentOutputs(final_hidden=torch.zeros(B, T, d_s), hidden=s_hidden, head_weight=torch.zeros(3, d_s))
    teacher = TeacherSignals(hidden=t_hidden)
    obj = HiddenObjective(proj, loss=loss, normalize_teacher=norm, beta=0.7)
    assert obj.needs == Needs(logits=False, layers=(2, 3)) and obj.student_layers == (1, 2)
    value, n, metrics = obj(batch, student, teacher)

    mask = batch.mask.numpy()
    per_pair = []
    for s, t in pairs:
        W = proj.proj[f"s{s}_t{t}"].weight.detach().double().numpy()  # (d_t, d_s)
        pred = s_hidden[s].double().numpy() @ W.T
        tgt = t_hidden[t].double().numpy()
        if norm == "rms":
            tgt = tgt / np.sqrt((tgt**2).mean(-1, keepdims=True) + 1e-6)
        if loss == "mse":
            per = ((pred - tgt) ** 2).mean(-1)
        elif loss == "nmse":
            per = ((pred - tgt) ** 2).sum(-1) / ((tgt**2).sum(-1) + 1e-6)
        else:
            per = 1 - (pred * tgt).sum(-1) / (np.linalg.norm(pred, axis=-1) * np.linalg.norm(tgt, axis=-1))
        per_pair.append((per * mask).sum())
    expected = 0.7 * np.mean(per_pair)
    assert n == int(mask.sum())
    assert float(value.detach()) == pytest.approx(expected, rel=1e-5)
    assert metrics["hidden"] == pytest.approx(expected / 0.7, rel=1e-5)  # metric is before beta


def test_the_count_is_the_normaliser_for_every_part():
    """The hidden loss skips position 0 but is divided by the batch's targets, like the head loss:
    the count a sum of parts returns is that one number, and parts that disagree are refused."""
    B, T, d = 2, 6, 8
    proj = Projectors([(1, 1)], d_student=d, d_teacher=d, seed=0)
    batch = _batch(B, T, 0)
    g = torch.Generator().manual_seed(1)
    student = StudentOutputs(
        final_hidden=torch.randn(B, T, d, generator=g),
        hidden={1: torch.randn(B, T, d, generator=g)},
        head_weight=torch.randn(50, d, generator=g),
    )
    teacher = TeacherSignals(hidden={1: torch.randn(B, T, d, generator=g)})
    hidden = HiddenObjective(proj, loss="mse", normalize_teacher="none", beta=1.0, skip_first_position=True)
    ce = LogitObjective(HeadLossSpec(ce_weight=1.0, kd_weight=0.0))
    assert hidden(batch, student, teacher)[1] == batch.n_targets == int(batch.mask.sum())
    assert SumObjective(ce, hidden)(batch, student, teacher)[1] == batch.n_targets

    class Miscounted(HiddenObjective):
        def __call__(self, batch, student, teacher):
            loss, n, m = super().__call__(batch, student, teacher)
            return loss, n - B, m  # normalised over the positions it read: not the loop's count

    odd = Miscounted(proj, loss="mse", normalize_teacher="none", beta=1.0, skip_first_position=True)
    with pytest.raises(ValueError, match="different token counts"):
        SumObjective(ce, odd)(batch, student, teacher)


# --------------------------------------------------------------------------- plans


def _pairs():
    return [(1, 2), (2, 3)]


def test_plan_ce_needs_no_teacher():
    plan = build_plan(ObjectiveConfig(method="ce", alpha=0.5), projectors=None, chunk_tokens=64)
    assert len(plan.phases) == 1 and not plan.needs.any and plan.student_layers == ()
    obj = plan.phases[0].objective
    assert isinstance(obj, LogitObjective) and obj.uses_head
    assert obj.spec.ce_weight == 1.0 and obj.spec.kd_weight == 0.0  # alpha ignored for CE
    assert obj.spec.chunk_tokens == 64


def test_plan_kd_needs_logits_only():
    cfg = ObjectiveConfig(method="kd", alpha=0.3, temperature=2.0, divergence="jsd(beta=0.2)", top_k=16)
    plan = build_plan(cfg, projectors=None, chunk_tokens=32)
    assert plan.needs == Needs(logits=True, layers=()) and plan.student_layers == ()
    spec = plan.phases[0].objective.spec
    assert (spec.ce_weight, spec.kd_weight) == pytest.approx((0.7, 0.3))
    assert (spec.temperature, spec.divergence.spec(), spec.divergence.beta, spec.top_k) == (
        2.0,
        "jsd(beta=0.2)",
        0.2,
        16,
    )


def test_plan_hld_joint_needs_both():
    proj = Projectors(_pairs(), d_student=8, d_teacher=12)
    plan = build_plan(ObjectiveConfig(method="hld-joint"), projectors=proj, chunk_tokens=32)
    assert len(plan.phases) == 1
    obj = plan.phases[0].objective
    assert isinstance(obj, SumObjective) and obj.uses_head
    assert plan.needs == Needs(logits=True, layers=(2, 3)) and plan.student_layers == (1, 2)
    assert plan.phase_for(0.0, 0.1) is plan.phase_for(0.9, 1.0) is plan.phases[0]


def test_plan_hld_first_phases():
    proj = Projectors(_pairs(), d_student=8, d_teacher=12)
    cfg = ObjectiveConfig(method="hld-first", hidden=HiddenConfig(first_share=0.25))
    plan = build_plan(cfg, projectors=proj, chunk_tokens=32)
    first, second = plan.phases
    assert first.objective.needs == Needs(logits=False, layers=(2, 3)) and not first.objective.uses_head
    assert second.objective.needs == Needs(logits=True, layers=()) and second.objective.student_layers == ()
    assert plan.needs == Needs(logits=True, layers=(2, 3))
    assert plan.phase_for(0.0, 0.1) is first and plan.phase_for(0.15, 0.25) is first
    assert plan.phase_for(0.25, 0.35) is second and plan.phase_for(0.9, 1.0) is second
    # a step across the boundary: the blend, weighted by the share of its tokens before it (by hand:
    # [0.2, 0.3) has half its tokens before 0.25; [0.24, 0.34) a tenth)
    for start, share in ((0.2, 0.5), (0.24, 0.1)):
        blend = plan.phase_for(start, start + 0.1)
        assert blend.name == f"{first.name}+{second.name}" and blend.objective.share == pytest.approx(share)


# --------------------------------------------------------------------------- on the tiny teacher


def _build(resources, method: str, *extra: str):
    from hld.train.loop import build

    return build(load_config("smoke", fixture_overrides(method, *extra)), resources, device=torch.device("cpu"))


def _ids(params) -> set[int]:
    return {id(p) for p in params}


def test_projectors_get_gradients_and_are_optimised(resources):
    from hld.train.loop import train_step

    s = _build(resources, "hld-joint")
    opt_ids = [id(p) for g in s.optimizer.param_groups for p in g["params"]]
    assert len(opt_ids) == len(set(opt_ids))  # tied head/embedding appears once
    assert _ids(s.projectors.parameters()) <= set(opt_ids)
    assert _ids(s.student.parameters()) <= set(opt_ids)
    assert set(opt_ids) == _ids(s.projectors.parameters()) | _ids(s.student.parameters())
    assert len(s.projectors.pairs) == 2  # tiny-2l -> 2 pairs with the 3-block teacher

    # the pieces of train_step: one micro-batch forward/backward
    phase = s.plan.phases[0]
    batch = s.order.batch(0)
    teacher = s.teacher(batch, phase.objective.needs)
    out = s.runner(batch.input_ids)
    loss, n, metrics = phase.objective(batch, out, teacher)
    assert set(metrics) == {"ce", "kd", "hidden"} and n == batch.n_targets
    (loss / n).backward()
    for name, p in s.projectors.named_parameters():
        assert p.grad is not None and float(p.grad.abs().max()) > 0, name
    for name, p in s.student.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    s.optimizer.zero_grad(set_to_none=True)

    before = {k: v.detach().clone() for k, v in s.projectors.state_dict().items()}
    m = train_step(s, 0)
    assert not m["skipped"] and m["phase"] == "hld-joint"
    for k, v in s.projectors.state_dict().items():
        assert not torch.equal(v, before[k]), k


def test_weight_decay_groups(resources):
    s = _build(resources, "hld-joint")
    decay, no_decay = s.optimizer.param_groups
    assert decay["weight_decay"] == s.cfg.train.weight_decay and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert _ids(s.projectors.parameters()) <= _ids(decay["params"])


def test_hld_first_phase_one_runs_no_head(resources):
    """Phase 1 reads only teacher hidden states: the online teacher returns no logits, and the step
    logs only the hidden loss."""
    from hld.train.loop import train_step

    s = _build(resources, "hld-first", "objective.hidden.first_share=0.5")
    assert s.total_steps == 2
    phase = s.plan.phases[0]
    sig = s.teacher(s.order.batch(0), phase.objective.needs)
    assert sig.source is None and sig.logits(slice(0, 4)) is None and set(sig.hidden) == {2, 3}
    m0 = train_step(s, 0)
    assert m0["phase"] == "hidden" and "train/hidden" in m0 and "train/ce" not in m0
    m1 = train_step(s, 1)
    assert m1["phase"] == "kd" and {"train/ce", "train/kd"} <= set(m1) and "train/hidden" not in m1


def test_ce_arm_loads_no_teacher(resources):
    s = _build(resources, "ce")
    assert s.teacher is None and s.teacher_lm is None and s.projectors is None
    assert not s.plan.needs.any


def test_shared_teacher_is_left_disarmed_between_runs(resources):
    """`Resources` hands the same teacher module to every run of a process. A hidden-only phase
    stops the teacher's forward after its deepest layer; that stop must not outlive the call, or a
    later run that needs logits would silently get none (and train with a zero KD term)."""
    first = _build(resources, "hld-first")
    batch = first.order.batch(0)
    ids = batch.input_ids
    phase1 = first.plan.phases[0]
    assert first.teacher(batch, phase1.objective.needs).source is None  # stopped early, as it should

    kd = _build(resources, "kd")
    assert kd.teacher_lm is first.teacher_lm  # the shared module
    sig = kd.teacher(batch, kd.plan.needs)
    assert sig.source is not None and sig.logits(slice(0, 4)) is not None
    with torch.no_grad():
        logits = kd.teacher_lm(input_ids=ids).logits  # a plain forward on the shared module completes
    assert logits.shape[:2] == ids.shape
