"""Hidden targets and losses against independent computations: the standardisation statistics
and the relation loss vs float64 numpy (values and gradients), `lens` vs an unfused autograd
version, the weight schedules vs torch's LR schedulers and numpy interpolation, hld-first's boundary
at exactly first_share."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hld.config import HiddenConfig, ObjectiveConfig, ScheduleConfig
from hld.distill.chunked import HeadLossSpec
from hld.distill.hidden import hidden_mask, load_stats, normalize_target, save_stats, standardize_stats
from hld.distill.hidden_losses.lens import Lens, lens_sum
from hld.distill.hidden_losses.relation import relation_sum
from hld.distill.objectives import build_plan
from hld.distill.projectors import Projectors
from hld.distill.schedule import step_progress, weight_at

# --------------------------------------------------------------------------- standardisation


def test_standardize_stats_match_float64_numpy():
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(3):
        scale = torch.tensor([1.0, 3.0, 0.1, 50.0, 2.0])
        x = torch.randn(2, 7, 5, generator=g) * scale + 1000.0 * (torch.arange(5) == 3)
        m = torch.rand(2, 7, generator=g) > 0.3
        batches.append((x, m))
    mom = standardize_stats(batches)
    rows = np.concatenate([x.double().numpy()[m.numpy()] for x, m in batches])
    assert mom.count == len(rows)
    np.testing.assert_allclose(mom.mean.numpy(), rows.mean(0), rtol=1e-6)
    np.testing.assert_allclose(mom.std.numpy(), rows.std(0), rtol=1e-5)
    z = normalize_target(torch.from_numpy(rows).float(), "standardize", mom).double().numpy()
    np.testing.assert_allclose(z.mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(z.std(0), 1, rtol=1e-4)


def test_stats_roundtrip(tmp_path):
    x = torch.randn(2, 4, 3)
    mom = standardize_stats([(x, torch.ones(2, 4, dtype=torch.bool))])
    save_stats({9: mom}, tmp_path / "s.pt")
    back = load_stats(tmp_path / "s.pt")[9]
    assert torch.equal(back.mean, mom.mean) and torch.equal(back.std, mom.std) and back.count == 8


def test_first_position_left_out():
    m = torch.ones(2, 4, dtype=torch.bool)
    assert hidden_mask(m, skip_first=True)[:, 0].sum() == 0 and hidden_mask(m, skip_first=True)[:, 1:].all()
    assert hidden_mask(m, skip_first=False) is m
    # a huge sink state at position 0 does not move the statistics when left out
    x = torch.randn(2, 4, 3)
    y = x.clone()
    y[:, 0] = 1e6
    a = standardize_stats([(x, hidden_mask(m, skip_first=True))])
    b = standardize_stats([(y, hidden_mask(m, skip_first=True))])
    assert torch.equal(a.mean, b.mean) and torch.equal(a.std, b.std)


# --------------------------------------------------------------------------- relation


def _relation_numpy(s: np.ndarray, t: np.ndarray, mask: np.ndarray) -> float:
    total = 0.0
    for b in range(s.shape[0]):
        us = s[b] / np.linalg.norm(s[b], axis=-1, keepdims=True)
        ut = t[b] / np.linalg.norm(t[b], axis=-1, keepdims=True)
        for i in range(s.shape[1]):
            if not mask[b, i]:
                continue
            keys = [j for j in range(i + 1) if mask[b, j]]
            total += np.mean([(us[i] @ us[j] - ut[i] @ ut[j]) ** 2 for j in keys])
    return total


def test_relation_loss_matches_float64_numpy_value_and_gradient():
    g = torch.Generator().manual_seed(1)
    B, T, ds, dt = 2, 6, 4, 7
    s = torch.randn(B, T, ds, generator=g, dtype=torch.float64)
    t = torch.randn(B, T, dt, generator=g, dtype=torch.float64)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 0] = mask[1, 3] = mask[1, 5] = False
    sp = s.float().requires_grad_(True)
    ours = relation_sum(sp, t.float(), mask)
    ours.backward()
    ref = _relation_numpy(s.numpy(), t.numpy(), mask.numpy())
    assert float(ours.detach()) == pytest.approx(ref, rel=1e-5)
    # gradient by central differences of the float64 numpy loss
    num = np.zeros(s.shape)
    h = 1e-6
    for idx in np.ndindex(*s.shape):
        a, b = s.numpy().copy(), s.numpy().copy()
        a[idx] += h
        b[idx] -= h
        num[idx] = (_relation_numpy(a, t.numpy(), mask.numpy()) - _relation_numpy(b, t.numpy(), mask.numpy())) / (2 * h)
    np.testing.assert_allclose(sp.grad.double().numpy(), num, atol=2e-5, rtol=1e-4)


def test_relation_is_zero_for_a_rotated_scaled_copy():
    g = torch.Generator().manual_seed(2)
    t = torch.randn(2, 5, 6, generator=g)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g))
    s = 3.0 * t @ q  # cosines are invariant: the relation matrices are equal
    assert float(relation_sum(s, t, torch.ones(2, 5, dtype=torch.bool))) < 1e-10


# --------------------------------------------------------------------------- lens


class _Norm(torch.nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(d) * 0.1, requires_grad=False)

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + self.weight)


@pytest.mark.parametrize("T,cap", [(1.0, None), (2.0, None), (1.0, 5.0)])
def test_lens_matches_unfused_autograd(T, cap):
    g = torch.Generator().manual_seed(3)
    n, d, V = 11, 6, 37
    norm, W = _Norm(d), torch.randn(V, d, generator=g)
    lens = Lens(norm=norm, head_weight=W, softcap=cap)
    pred = torch.randn(n, d, generator=g).requires_grad_(True)
    target = torch.randn(n, d, generator=g) * 30
    mask = torch.rand(n, generator=g) > 0.3
    spec = HeadLossSpec(ce_weight=0.0, kd_weight=1.0, temperature=T, softcap=cap, chunk_tokens=4)
    ours = lens_sum(pred, target, mask, lens, spec)
    ours.backward()
    g_ours = pred.grad.clone()

    p2 = pred.detach().clone().requires_grad_(True)

    def head(x):
        z = norm(x) @ W.T
        return z if cap is None else cap * torch.tanh(z / cap)

    with torch.no_grad():
        logp_t = torch.log_softmax(head(target) / T, -1)
    logq = torch.log_softmax(head(p2) / T, -1)
    ref = ((logp_t.exp() * (logp_t - logq)).sum(-1) * mask).sum() * T * T
    ref.backward()
    assert float(ours.detach()) == pytest.approx(float(ref.detach()), rel=1e-5)
    torch.testing.assert_close(g_ours, p2.grad, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- schedules


def _reference_weights(kind: str, w0: float, final: float, steps: int) -> np.ndarray:
    """The weight at steps 0..steps-1 from computations other than hld's: torch's own LR schedulers for
    linear and cosine (the LR of an optimizer whose base LR is w0, stepped once per step), numpy's
    piecewise-linear interpolation through the knots for wsd (0 -> w0 over warmup, w0, -> final over
    the decay share), float64 throughout."""
    if kind == "constant":
        return np.full(steps, w0)
    if kind == "wsd":
        p = np.arange(steps) / (steps - 1)
        return np.interp(p, [0.0, 0.2, 0.7, 1.0], [0.0, w0, w0, final])
    param = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([param], lr=w0)
    if kind == "linear":
        sched: torch.optim.lr_scheduler.LRScheduler = torch.optim.lr_scheduler.LinearLR(
            opt, start_factor=1.0, end_factor=final / w0, total_iters=steps - 1
        )
    else:
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps - 1, eta_min=final)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return np.array(out)


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine", "wsd"])
def test_weight_schedules_match_independent_schedules(kind):
    sc = ScheduleConfig(kind=kind, final=0.1, warmup_share=0.2, decay_share=0.3)
    w0, steps = 0.9, 21  # p = k / 20 lands on wsd's knots 0.2 and 0.7
    ours = [weight_at(step_progress(k, steps), w0, sc) for k in range(steps)]
    np.testing.assert_allclose(ours, _reference_weights(kind, w0, 0.1, steps), rtol=1e-9, atol=1e-12)
    # progress outside [0, 1] is clamped to the ends
    assert weight_at(-0.5, w0, sc) == weight_at(0.0, w0, sc) and weight_at(1.5, w0, sc) == weight_at(1.0, w0, sc)
    assert step_progress(0, 10) == 0.0 and step_progress(9, 10) == 1.0 and step_progress(0, 1) == 0.0


def test_plan_sets_scheduled_alpha_and_beta():
    proj = Projectors([(1, 2)], d_student=4, d_teacher=6)
    cfg = ObjectiveConfig(
        method="hld-joint",
        alpha=0.6,
        alpha_schedule=ScheduleConfig(kind="linear", final=0.2),
        hidden=HiddenConfig(beta=2.0, beta_schedule=ScheduleConfig(kind="cosine", final=0.0)),
    )
    plan = build_plan(cfg, projectors=proj, chunk_tokens=8)
    kd, hidden = plan.phases[0].objective.parts
    for step in (0, 3, 10):
        _, w = plan.at_step(step, 11, tokens_before=step * 8, tokens_in_step=8, tokens_total=88)
        p = step / 10
        assert w["alpha"] == pytest.approx(0.6 + (0.2 - 0.6) * p)
        assert w["beta"] == pytest.approx(1 + math.cos(math.pi * p))
        assert kd.spec.kd_weight == pytest.approx(w["alpha"]) and kd.spec.ce_weight == pytest.approx(1 - w["alpha"])
        assert hidden.beta == pytest.approx(w["beta"])


# --------------------------------------------------------------------------- hld-first boundary


@pytest.mark.parametrize("share,steps", [(0.2, 12), (0.25, 12), (0.3, 7), (0.5, 2)])
def test_hld_first_hidden_phase_spends_exactly_first_share(share, steps):
    proj = Projectors([(1, 2)], d_student=4, d_teacher=6)
    plan = build_plan(
        ObjectiveConfig(method="hld-first", hidden=HiddenConfig(first_share=share)), projectors=proj, chunk_tokens=8
    )
    T = 10
    hidden_tokens = 0.0
    for k in range(steps):
        ph, _ = plan.at_step(k, steps, tokens_before=k * T, tokens_in_step=T, tokens_total=steps * T)
        if ph.name == "hidden":
            hidden_tokens += T
        elif ph.name == "hidden+kd":
            hidden_tokens += ph.objective.share * T
    assert hidden_tokens == pytest.approx(share * steps * T)
    assert sum(
        plan.at_step(k, steps, tokens_before=k * T, tokens_in_step=T, tokens_total=steps * T)[0].name == "hidden+kd"
        for k in range(steps)
    ) == (0 if abs(share * steps - round(share * steps)) < 1e-9 else 1)


# --------------------------------------------------------------------------- on the tiny teacher


def _build(resources, overrides, *extra):
    from hld.config import load_config
    from hld.train.loop import build

    return build(
        load_config("smoke", [*overrides, "objective.method=hld-joint", *extra]), resources, device=torch.device("cpu")
    )


@pytest.mark.parametrize("loss", ["relation", "lens", "mse"])
def test_each_loss_trains_and_is_counted(resources, overrides, loss):
    from hld.flops import step_cost
    from hld.train.loop import train_step

    s = _build(resources, overrides, f"objective.hidden.loss={loss}")
    hidden = s.plan.phases[0].objective.parts[1]
    n = len(s.projectors.pairs)
    if loss == "relation":  # projector-free: no weights, no projector FLOPs, only the Gram matrices'
        assert s.projectors.n_params() == 0 and hidden.n_pairs == 0
    else:
        assert s.projectors.n_params() == n * s.student.config.hidden_size * s.teacher_lm.config.hidden_size
    kd_only = step_cost(s.student, 32, teacher=s.teacher_lm, teacher_logits=True)
    extra = s.costs["hld-joint"].total - kd_only.total
    d_s, d_t, V, T = s.student.config.hidden_size, s.teacher_lm.config.hidden_size, s.teacher_lm.config.vocab_size, 32
    want = {
        "relation": n * (6 * T * d_s + 2 * T * d_t),
        "mse": n * 6 * d_s * d_t,
        "lens": n * (6 * d_s * d_t + 6 * d_t * V),
    }[loss]
    assert extra == pytest.approx(want)
    m = train_step(s, 0)
    assert not m["skipped"] and math.isfinite(m["train/hidden"]) and m["train/hidden"] > 0


def test_standardize_stats_are_frozen_in_the_run_dir_and_projectors_stay_out_of_the_export(overrides, tmp_path):
    from safetensors.torch import load_file

    from hld.config import load_config
    from hld.train.loop import train

    cfg = load_config("smoke", [*overrides, "objective.method=hld-joint", "objective.hidden.stats_windows=6"])
    assert cfg.objective.hidden.normalize_teacher == "standardize" and cfg.objective.hidden.skip_first_position
    train(cfg, tmp_path / "run", quiet=True)
    stats = load_stats(tmp_path / "run" / "hidden_stats.pt")
    from hld.train.loop import build
    from hld.train.resources import Resources

    s = build(cfg, Resources(), device=torch.device("cpu"))
    masks = torch.cat([s.order.batch(0).mask, s.order.batch(1).mask[:2]])  # the first 6 windows, 4 per batch
    n_valid = int(hidden_mask(masks, skip_first=True).sum())
    assert set(stats) == {2, 3} and all(m.count == n_valid for m in stats.values())
    for t, m in stats.items():  # the run directory's statistics are the ones the run uses
        assert torch.equal(s.plan.phases[0].objective.parts[1].stats[t].mean, m.mean)
    keys = [k for f in (tmp_path / "run" / "student").glob("*.safetensors") for k in load_file(f)]
    assert keys and set(keys) <= set(s.student.state_dict())  # the student's own weights, no projector
    assert not any(k.startswith("proj.") or "_t2" in k or "_t3" in k for k in keys)


@pytest.mark.parametrize("norm", ["standardize", "rms", "none"])
@pytest.mark.slow
def test_every_loss_and_normalisation_runs_with_the_layer_diagnostics(tmp_path, overrides, norm):
    """A whole run (training, validation with CKA and R², cka.json) for each loss under each
    normalisation: `lens` targets the raw teacher state, so standardize estimates no statistics for it
    and the diagnostics' R² must not ask for them (it raised once, in the hld-variants study)."""
    from hld.config import load_config
    from hld.train.loop import train

    for loss in ("mse", "cosine", "relation", "lens"):
        cfg = load_config(
            "smoke",
            [
                *overrides,
                "objective.method=hld-joint",
                f"objective.hidden.loss={loss}",
                f"objective.hidden.normalize_teacher={norm}",
                "train.eval_every_steps=2",
            ],
        )
        summary = train(cfg, tmp_path / f"{norm}-{loss}", quiet=True)
        assert math.isfinite(summary["val/loss"])
        assert any(k.startswith("val/cka/") for k in summary), summary.keys()
        assert (tmp_path / f"{norm}-{loss}" / "cka.json").exists()
