"""Every loss in `hld.distill.losses` (and the per-position hidden losses) against an independent
computation: torch.nn.functional where it has the loss, otherwise the textbook formula in numpy float64.
Values and gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hld.distill.divergences.jsd import Jsd
from hld.distill.hidden import normalize_target
from hld.distill.hidden_losses.registry import row_loss
from hld.distill.losses import ROWS, ce_sum, kd_sum, logsumexp_outside, row_block, softcap
from hld.distill.signals import TeacherLogits
from hld.distill.signals.online import Dense
from hld.distill.signals.topk import TopK

N, V = 7, 11  # rows, vocabulary


def _rows(seed: int, n: int = N, v: int = V, scale: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g, dtype=torch.float64) * scale


def _mask(n: int = N) -> torch.Tensor:
    m = torch.ones(n, dtype=torch.bool)
    m[[1, 4]] = False
    return m


# --------------------------------------------------------------------------- numpy references


def np_log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_kl(logp: np.ndarray, logq: np.ndarray) -> np.ndarray:
    """sum_i p_i (log p_i - log q_i) per row, 0 log 0 = 0."""
    p = np.exp(logp)
    with np.errstate(invalid="ignore"):  # 0 * (-inf) off a top-k support, dropped by the where
        terms = np.where(p > 0, p * (logp - logq), 0.0)
    return terms.sum(-1)


def np_divergence(
    s: np.ndarray,
    t: np.ndarray,
    mask: np.ndarray,
    *,
    T: float,
    divergence: str,
    beta: float = 0.5,
    topk: int | None = None,
) -> float:
    """T^2 * D summed over valid rows; with `topk` the teacher is its softmax over its top-k logits."""
    logq = np_log_softmax(s / T)
    if topk is None:
        logp = np_log_softmax(t / T)
    else:
        logp = np.full_like(t, -np.inf)
        for r in range(t.shape[0]):
            top = np.argsort(-t[r])[:topk]
            logp[r, top] = np_log_softmax(t[r, top] / T)
    p, q = np.exp(logp), np.exp(logq)
    if divergence == "forward_kl":
        per = np_kl(logp, logq)
    elif divergence == "reverse_kl":
        per = np_kl(logq, logp)
    elif divergence == "jsd":
        logm = np.log(beta * p + (1 - beta) * q)
        per = beta * np_kl(logp, logm) + (1 - beta) * np_kl(logq, logm)
    else:
        raise AssertionError(divergence)
    return float((per * mask).sum() * T * T)


def torch_reference_kd(
    s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor, *, T: float, divergence: str, beta: float = 0.5
) -> torch.Tensor:
    """The same formulas written directly in float64 torch (for reference gradients)."""
    p, q = torch.softmax(t / T, -1), torch.softmax(s / T, -1)
    if divergence == "forward_kl":
        per = (p * (p.log() - q.log())).sum(-1)
    elif divergence == "reverse_kl":
        per = (q * (q.log() - p.log())).sum(-1)
    else:
        m = beta * p + (1 - beta) * q
        per = beta * (p * (p.log() - m.log())).sum(-1) + (1 - beta) * (q * (q.log() - m.log())).sum(-1)
    return per[mask].sum() * T * T


def _close(actual: torch.Tensor | float, expected, *, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    actual = torch.as_tensor(actual, dtype=torch.float64)
    expected = torch.as_tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


# --------------------------------------------------------------------------- cross-entropy


def test_ce_sum_matches_torch_cross_entropy_value_and_grad():
    logits = _rows(0).requires_grad_(True)
    targets = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(1))
    mask = _mask()
    targets = torch.where(mask, targets, torch.full_like(targets, -100))  # ignored rows carry IGNORE

    ours = ce_sum(logits, targets, mask)
    ref = F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")
    _close(ours, ref)
    (g_ours,) = torch.autograd.grad(ours, logits)
    (g_ref,) = torch.autograd.grad(ref, logits)
    _close(g_ours, g_ref)
    assert g_ours[~mask].abs().max() == 0


def test_ce_sum_is_a_sum_not_a_mean():
    logits = torch.zeros(4, V)
    ce = ce_sum(logits, torch.zeros(4, dtype=torch.long), torch.tensor([True, True, True, False]))
    _close(ce, 3 * np.log(V))  # uniform logits: -log(1/V) per valid row


# --------------------------------------------------------------------------- KD divergences


@pytest.mark.parametrize("T", [1.0, 2.0, 0.5])
def test_forward_kl_matches_torch_kl_div_and_numpy(T):
    s = _rows(2).requires_grad_(True)
    t = _rows(3).requires_grad_(True)
    mask = _mask()
    ours = kd_sum(s, Dense(t), mask, temperature=T, divergence="forward_kl")
    # F.kl_div(input=log q, target=log p) = sum p (log p - log q) = KL(teacher || student)
    ref = (
        F.kl_div(
            torch.log_softmax(s[mask] / T, -1), torch.log_softmax(t[mask] / T, -1), log_target=True, reduction="sum"
        )
        * T
        * T
    )
    _close(ours, ref)
    _close(ours, np_divergence(s.detach().numpy(), t.detach().numpy(), mask.numpy(), T=T, divergence="forward_kl"))
    g_ours = torch.autograd.grad(ours, (s, t))
    g_ref = torch.autograd.grad(ref, (s, t))
    for a, b in zip(g_ours, g_ref):
        _close(a, b)
    # closed form of the student gradient: T * (softmax(s/T) - softmax(t/T)) on valid rows, 0 elsewhere
    q, p = torch.softmax(s.detach() / T, -1), torch.softmax(t.detach() / T, -1)
    _close(g_ours[0], T * (q - p) * mask[:, None])


def test_forward_and_reverse_kl_differ_on_asymmetric_inputs():
    s, t, mask = _rows(4), _rows(5, scale=4.0), _mask()
    fwd = kd_sum(s, Dense(t), mask, divergence="forward_kl")
    rev = kd_sum(s, Dense(t), mask, divergence="reverse_kl")
    assert abs(float(fwd) - float(rev)) > 0.1 * abs(float(fwd))
    # and each is the one its name says (teacher first for forward)
    _close(fwd, np_divergence(s.numpy(), t.numpy(), mask.numpy(), T=1.0, divergence="forward_kl"))
    _close(rev, np_divergence(s.numpy(), t.numpy(), mask.numpy(), T=1.0, divergence="reverse_kl"))


def test_temperature_scaling_is_t_squared():
    """Both distributions are softened by T and the divergence is multiplied by T^2 (not T, not 1)."""
    s, t, mask = _rows(6), _rows(7), _mask()
    for T in (1.0, 3.0):
        raw = F.kl_div(
            torch.log_softmax(s[mask] / T, -1), torch.log_softmax(t[mask] / T, -1), log_target=True, reduction="sum"
        )
        _close(kd_sum(s, Dense(t), mask, temperature=T), raw * T * T)


@pytest.mark.parametrize(
    "divergence,beta,T",
    [("reverse_kl", 0.5, 1.0), ("reverse_kl", 0.5, 2.0), ("jsd", 0.5, 1.0), ("jsd", 0.1, 1.0), ("jsd", 0.9, 2.0)],
)
def test_reverse_kl_and_jsd_match_numpy_value_and_grad(divergence, beta, T):
    s = _rows(8).requires_grad_(True)
    t = _rows(9, scale=3.0)
    mask = _mask()
    ours = kd_sum(
        s,
        Dense(t),
        mask,
        temperature=T,
        divergence=f"{divergence}(beta={beta})" if divergence == "jsd" else divergence,
    )
    _close(ours, np_divergence(s.detach().numpy(), t.numpy(), mask.numpy(), T=T, divergence=divergence, beta=beta))
    ref = torch_reference_kd(s, t, mask, T=T, divergence=divergence, beta=beta)
    _close(ours, ref)
    (g_ours,) = torch.autograd.grad(ours, s)
    (g_ref,) = torch.autograd.grad(ref, s)
    _close(g_ours, g_ref)
    assert g_ours[~mask].abs().max() == 0


def test_jsd_is_symmetric_at_half_and_bounded():
    s, t, mask = _rows(10), _rows(11, scale=5.0), _mask()
    a = kd_sum(s, Dense(t), mask, divergence="jsd(beta=0.5)")
    b = kd_sum(t, Dense(s), mask, divergence="jsd")
    _close(a, b)
    assert 0 < float(a) <= int(mask.sum()) * np.log(2) + 1e-6


def test_kd_sum_takes_a_divergence_object_as_well_as_its_spec():
    # a Divergence instance (as objectives pass it) is used as given, not parsed again: JSD(0.3) against numpy
    s, t, mask = _rows(12), _rows(13, scale=3.0), _mask()
    want = np_divergence(s.numpy(), t.numpy(), mask.numpy(), T=2.0, divergence="jsd", beta=0.3)
    _close(kd_sum(s, Dense(t), mask, temperature=2.0, divergence=Jsd(beta=0.3)), want)


def test_unknown_divergence_is_an_error():
    with pytest.raises(ValueError):
        kd_sum(_rows(0), Dense(_rows(1)), _mask(), divergence="no_such_divergence")


# --------------------------------------------------------------------------- top-k teachers


def _topk(t: torch.Tensor, k: int, *, rest: bool = True) -> TeacherLogits:
    """The top k of t (sorted: a permutation of the vocabulary when k = V) and, with `rest`, the
    log-sum-exp of the others from the sorted tail (-inf when there are none)."""
    v, i = t.topk(k, dim=-1)
    r = None
    if rest:
        tail = t.sort(dim=-1, descending=True).values[:, k:]
        r = torch.logsumexp(tail, -1).float() if k < t.shape[-1] else torch.full((t.shape[0],), float("-inf"))
    return TopK(values=v, indices=i, rest=r)


def np_bucket_divergence(
    s: np.ndarray, t: np.ndarray, mask: np.ndarray, *, T: float, divergence: str, k: int, beta: float = 0.5
) -> float:
    """T^2 * D on the (k+1)-outcome coarsening, written out per row in float64: the teacher is
    softmax([top-k logits, log sum exp(the others)] / T), the student softmax(s / T) with its
    probabilities off the teacher's top k added up."""
    total = 0.0
    for r in range(s.shape[0]):
        order = np.argsort(-t[r])
        top, others = order[:k], order[k:]
        rest_logit = np.log(np.exp(t[r, others]).sum()) if len(others) else -np.inf
        zt = np.append(t[r, top], rest_logit) / T
        pt = np.exp(zt - zt.max())
        pt /= pt.sum()
        qs = np.exp(s[r] / T - (s[r] / T).max())
        qs /= qs.sum()
        q = np.append(qs[top], qs[others].sum())
        lp = np.log(np.where(pt > 0, pt, 1.0))
        lq = np.log(q)
        kl = lambda a, la, lb: np.where(a > 0, a * (la - lb), 0.0).sum()
        if divergence == "forward_kl":
            per = kl(pt, lp, lq)
        elif divergence == "reverse_kl":
            per = kl(q, lq, np.log(pt)) if (pt > 0).all() else (np.inf if q[pt == 0].sum() > 0 else kl(q, lq, lp))
        else:
            mix = beta * pt + (1 - beta) * q
            per = beta * kl(pt, lp, np.log(mix)) + (1 - beta) * kl(q, lq, np.log(mix))
        total += per * mask[r]
    return float(total * T * T)


def np_grad(f, x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Central finite differences of a scalar float64 function."""
    g = np.zeros_like(x)
    for ix in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[ix] += eps
        xm[ix] -= eps
        g[ix] = (f(xp) - f(xm)) / (2 * eps)
    return g


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("T", [1.0, 2.0])
@pytest.mark.parametrize("k", [1, 3, 6])
def test_bucket_topk_matches_numpy_value_and_grad(divergence, T, k):
    s = _rows(30).requires_grad_(True)
    t, mask = _rows(31, scale=3.0), _mask()
    ours = kd_sum(
        s, _topk(t, k), mask, temperature=T, divergence="jsd(beta=0.3)" if divergence == "jsd" else divergence
    )
    ref = lambda x: np_bucket_divergence(x, t.numpy(), mask.numpy(), T=T, divergence=divergence, k=k, beta=0.3)
    assert np.isfinite(float(ours.detach()))
    _close(ours, ref(s.detach().numpy()))
    (g,) = torch.autograd.grad(ours, s)
    _close(g, np_grad(ref, s.detach().numpy().copy()), rtol=1e-4, atol=1e-5)
    assert g[~mask].abs().max() == 0


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("T", [1.0, 2.0])
@pytest.mark.parametrize("top_k_rest", ["bucket", "renormalize"])
def test_topk_with_k_equal_vocab_is_dense(divergence, T, top_k_rest):
    s = _rows(12).requires_grad_(True)
    t, mask = _rows(13), _mask()
    dense = kd_sum(s, Dense(t), mask, temperature=T, divergence=divergence)
    sparse = kd_sum(s, _topk(t, V), mask, temperature=T, divergence=divergence, top_k_rest=top_k_rest)
    assert float(_topk(t, V).rest.max()) == float("-inf")
    _close(sparse, dense)
    (g_dense,) = torch.autograd.grad(dense, s)
    (g_sparse,) = torch.autograd.grad(sparse, s)
    assert torch.isfinite(g_sparse).all()
    _close(g_sparse, g_dense)


@pytest.mark.parametrize(
    "divergence,T,k", [("forward_kl", 1.0, 3), ("forward_kl", 2.0, 5), ("jsd", 1.0, 3), ("jsd", 2.0, 6)]
)
def test_topk_renormalize_matches_renormalised_teacher(divergence, T, k):
    s = _rows(14).requires_grad_(True)
    t, mask = _rows(15, scale=3.0), _mask()
    ours = kd_sum(s, _topk(t, k, rest=False), mask, temperature=T, divergence=divergence, top_k_rest="renormalize")
    _close(ours, np_divergence(s.detach().numpy(), t.numpy(), mask.numpy(), T=T, divergence=divergence, topk=k))
    # gradient vs float64 torch with the teacher renormalised over its top k (zero elsewhere)
    v, idx = t.topk(k, dim=-1)
    p = torch.zeros_like(t).scatter(-1, idx, torch.softmax(v / T, -1))
    q = torch.softmax(s / T, -1)
    if divergence == "forward_kl":
        per = (p * (torch.where(p > 0, p, 1.0).log() - q.log())).sum(-1)
    else:
        m = 0.5 * p + 0.5 * q
        per = 0.5 * (p * (torch.where(p > 0, p, 1.0).log() - m.log())).sum(-1) + 0.5 * (q * (q.log() - m.log())).sum(-1)
    ref = per[mask].sum() * T * T
    _close(ours, ref)
    (g_ours,) = torch.autograd.grad(ours, s)
    (g_ref,) = torch.autograd.grad(ref, s)
    _close(g_ours, g_ref)
    dense = kd_sum(s.detach(), Dense(t), mask, temperature=T, divergence=divergence)
    assert float(ours.detach()) != pytest.approx(float(dense), rel=1e-3)  # truncation really happened


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_bucket_and_renormalize_differ_as_they_should(divergence):
    s, t, mask = _rows(32), _rows(33, scale=2.0), _mask()
    k = 3
    bucket = float(kd_sum(s, _topk(t, k), mask, divergence=divergence))
    renorm = float(kd_sum(s, _topk(t, k), mask, divergence=divergence, top_k_rest="renormalize"))
    dense = float(kd_sum(s, Dense(t), mask, divergence=divergence))
    assert np.isfinite(bucket) and bucket != pytest.approx(renorm, rel=1e-2)
    # coarsening can only lose information: the bucketed divergence bounds the dense one from below (T = 1)
    assert 0 < bucket <= dense + 1e-6
    if divergence == "reverse_kl":
        assert renorm == float("inf")
    # a teacher with no mass off its top k: bucket forward KL is the renormalised one
    no_rest = _topk(t, k)
    no_rest.rest = torch.full((N,), float("-inf"))
    if divergence == "forward_kl":
        _close(kd_sum(s, no_rest, mask), renorm)


def test_bucket_student_rest_is_exact_when_nearly_all_mass_is_on_the_top_k():
    """1 - sum(q over the top k) is 0 in fp32 here (rest ~1e-11): log1p(-sum) would give -inf and reverse
    KL nan/inf; the masked logsumexp keeps it."""
    s = torch.zeros(2, V, dtype=torch.float64)
    s[:, :3] = 30.0
    t = _rows(34, n=2)
    t[:, :3] += 20.0  # the teacher's top 3 are ids 0..2 too
    mask = torch.ones(2, dtype=torch.bool)
    for divergence in ("forward_kl", "reverse_kl", "jsd"):
        ours = kd_sum(s, _topk(t, 3), mask, divergence=divergence)
        _close(
            ours, np_bucket_divergence(s.numpy(), t.numpy(), mask.numpy(), T=1.0, divergence=divergence, k=3), rtol=1e-4
        )


def test_bucket_needs_rest_and_checks_its_name():
    s, t, mask = _rows(35), _rows(36), _mask()
    with pytest.raises(ValueError, match="rest"):
        kd_sum(s, _topk(t, 3, rest=False), mask)
    with pytest.raises(ValueError, match="top_k_rest"):
        kd_sum(s, _topk(t, 3), mask, top_k_rest="drop")


def test_reverse_kl_with_renormalised_topk_is_infinite_and_config_refuses_only_that():
    """KL(student || teacher) is infinite where the student has mass and a renormalised top-k teacher
    has none: mathematically so, hence the config refuses that combination instead of training on inf.
    With the rest as one outcome it is finite and accepted."""
    from hld.config import load_config
    from hld.errors import HldError

    s, t, mask = _rows(24), _rows(25), _mask()
    assert float(kd_sum(s, _topk(t, 3), mask, divergence="reverse_kl", top_k_rest="renormalize")) == float("inf")
    assert np.isfinite(float(kd_sum(s, _topk(t, 3), mask, divergence="reverse_kl")))
    with pytest.raises(HldError, match="reverse_kl"):
        load_config(None, ["objective.divergence=reverse_kl", "objective.top_k=8", "objective.top_k_rest=renormalize"])
    load_config(None, ["objective.divergence=reverse_kl", "objective.top_k=8"])  # bucket (default): finite
    load_config(None, ["objective.divergence=jsd", "objective.top_k=8", "objective.top_k_rest=renormalize"])


def test_teacher_logits_top_k_truncates_dense_and_fills_rest_exactly():
    t = _rows(16) * 10  # wide logits: the rest spans many orders of magnitude
    out = Dense(t).top_k(4)
    assert isinstance(out, TopK) and out.values.shape == (N, 4)
    assert out.rest.dtype == torch.float32 and out.rest.shape == (N,)
    tn = t.numpy()
    for r in range(N):
        top = np.argsort(-tn[r])[:4]
        assert set(out.indices[r].tolist()) == set(top.tolist())
        others = np.setdiff1d(np.arange(V), top)
        ref = tn[r, others].max() + np.log(np.exp(tn[r, others] - tn[r, others].max()).sum())
        assert float(out.rest[r]) == pytest.approx(ref, rel=1e-6, abs=1e-5)
    assert Dense(t).top_k(None).logits is t
    assert Dense(t).top_k(V).logits is t
    # k = V - 1: the rest is the one logit left out
    _close(Dense(t).top_k(V - 1).rest, t.min(-1).values.float(), rtol=1e-6, atol=1e-5)


def test_teacher_logits_top_k_truncates_a_cached_top_k():
    """A cache holding the top 6 (sorted descending) serves a run that wants the top 3; the 3 dropped
    values join the rest."""
    t = _rows(26)
    cached = _topk(t, 6).top_k(3)
    direct = _topk(t, 3)
    assert torch.equal(cached.values, direct.values) and torch.equal(cached.indices, direct.indices)
    _close(cached.rest, direct.rest)
    assert _topk(t, 6, rest=False).top_k(3).rest is None
    s, mask = _rows(27), _mask()
    _close(
        kd_sum(s, cached, mask),
        np_bucket_divergence(s.numpy(), t.numpy(), mask.numpy(), T=1.0, divergence="forward_kl", k=3),
    )
    _close(
        kd_sum(s, cached, mask, top_k_rest="renormalize"),
        np_divergence(s.numpy(), t.numpy(), mask.numpy(), T=1.0, divergence="forward_kl", topk=3),
    )
    wide = _topk(t, 6)
    assert wide.top_k(6) is wide and wide.top_k(10) is wide and wide.top_k(None) is wide


# --------------------------------------------------------------------------- masking


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("top_k", [None, 3])
def test_masked_rows_with_extreme_logits_contribute_nothing(divergence, top_k):
    s, t, mask = _rows(17), _rows(18), _mask()
    s_x, t_x = s.clone(), t.clone()
    s_x[~mask] = torch.tensor([1e4, -1e4] * (V // 2) + [3e4], dtype=torch.float64)
    t_x[~mask] = torch.tensor([-2e4, 1e4] * (V // 2) + [-3e4], dtype=torch.float64)
    s_x.requires_grad_(True)
    teacher = (lambda z: Dense(z)) if top_k is None else (lambda z: _topk(z, top_k))
    base = kd_sum(s, teacher(t), mask, divergence=divergence, temperature=2.0)
    ext = kd_sum(s_x, teacher(t_x), mask, divergence=divergence, temperature=2.0)
    _close(ext, base)
    (g,) = torch.autograd.grad(ext, s_x)
    assert torch.isfinite(g).all() and g[~mask].abs().max() == 0

    targets = torch.zeros(N, dtype=torch.long)
    _close(ce_sum(s_x, targets, mask), ce_sum(s, targets, mask))
    (g,) = torch.autograd.grad(ce_sum(s_x, targets, mask), s_x)
    assert torch.isfinite(g).all() and g[~mask].abs().max() == 0


def test_all_rows_masked_gives_zero():
    s, t = _rows(19), _rows(20)
    none = torch.zeros(N, dtype=torch.bool)
    assert float(kd_sum(s, Dense(t), none)) == 0.0
    assert float(ce_sum(s, torch.zeros(N, dtype=torch.long), none)) == 0.0


# --------------------------------------------------------------------------- hidden-state losses


def hidden_sum(pred, target, mask, *, loss="mse", normalize_teacher="none"):
    """A per-position hidden loss (hld.distill.hidden_losses) on the normalised target, as the objective calls it."""
    return row_loss(loss).row_sum(pred, normalize_target(target, normalize_teacher), mask)


def np_hidden(
    pred: np.ndarray, target: np.ndarray, mask: np.ndarray, *, loss: str, norm: str, eps: float = 1e-6
) -> float:
    if norm == "rms":
        target = target / np.sqrt((target**2).mean(-1, keepdims=True) + eps)
    e = pred - target
    if loss == "mse":
        per = (e**2).mean(-1)
    elif loss == "nmse":
        per = (e**2).sum(-1) / ((target**2).sum(-1) + eps)
    else:
        cos = (pred * target).sum(-1) / (np.linalg.norm(pred, axis=-1) * np.linalg.norm(target, axis=-1))
        per = 1 - cos
    return float((per * mask).sum())


@pytest.mark.parametrize("loss", ["mse", "nmse", "cosine"])
@pytest.mark.parametrize("norm", ["none", "rms"])
def test_hidden_sum_matches_numpy_value_and_grad(loss, norm):
    g = torch.Generator().manual_seed(21)
    pred = torch.randn(N, 16, generator=g, dtype=torch.float64).requires_grad_(True)
    target = (torch.randn(N, 16, generator=g, dtype=torch.float64) * 30 + 5).requires_grad_(True)  # Gemma-like scale
    mask = _mask()
    ours = hidden_sum(pred, target, mask, loss=loss, normalize_teacher=norm)
    _close(ours, np_hidden(pred.detach().numpy(), target.detach().numpy(), mask.numpy(), loss=loss, norm=norm))
    g_ours = torch.autograd.grad(ours, (pred, target))
    P, Tg, M = pred.detach().numpy(), target.detach().numpy(), mask.numpy()
    g_pred = np_grad(lambda x: np_hidden(x, Tg, M, loss=loss, norm=norm), P)
    g_target = np_grad(lambda x: np_hidden(P, x, M, loss=loss, norm=norm), Tg)
    for a, b in zip(g_ours, (g_pred, g_target)):
        np.testing.assert_allclose(a.numpy(), b, rtol=1e-5, atol=1e-7)
    assert g_ours[0][~mask].abs().max() == 0


def test_hidden_sum_rms_makes_teacher_scale_irrelevant():
    g = torch.Generator().manual_seed(22)
    pred, target = torch.randn(N, 16, generator=g), torch.randn(N, 16, generator=g)
    mask = _mask()
    a = hidden_sum(pred, target, mask, loss="mse", normalize_teacher="rms")
    b = hidden_sum(pred, 1000 * target, mask, loss="mse", normalize_teacher="rms")
    _close(a, b)
    assert float(hidden_sum(pred, 1000 * target, mask, loss="mse")) > 100 * float(a)


def test_hidden_sum_masked_rows_extreme_values_ignored():
    g = torch.Generator().manual_seed(23)
    pred, target, mask = torch.randn(N, 8, generator=g), torch.randn(N, 8, generator=g), _mask()
    pred_x, target_x = pred.clone(), target.clone()
    pred_x[~mask], target_x[~mask] = 1e15, -1e15
    for loss in ("mse", "nmse", "cosine"):
        _close(hidden_sum(pred_x, target_x, mask, loss=loss), hidden_sum(pred, target, mask, loss=loss))


def test_hidden_sum_unknown_options_are_errors():
    x, m = torch.zeros(2, 4), torch.ones(2, dtype=torch.bool)
    with pytest.raises(ValueError):
        hidden_sum(x, x, m, loss="l1")
    with pytest.raises(ValueError):
        hidden_sum(x, x, m, normalize_teacher="layer")


# --------------------------------------------------------------------------- soft-capping


def test_softcap():
    z = torch.linspace(-100, 100, 9, dtype=torch.float64)
    _close(softcap(z, 30.0), 30.0 * np.tanh(z.numpy() / 30.0))
    assert softcap(z, None) is z
    assert float(softcap(torch.tensor(1e6), 30.0)) == pytest.approx(30.0)


@pytest.mark.parametrize("scale", [1.0, 0.5, 2.0])
def test_logsumexp_outside_matches_float64_with_and_without_a_gradient(scale):
    """log sum over the ids off idx of exp(scale * z), against numpy in float64: the differentiable path
    (a student's logits) and the row-block path (a teacher's, no gradient); -inf where idx covers a row.
    Nine rows: two 4-row blocks and a remainder."""
    g = torch.Generator().manual_seed(5)
    z = torch.randn(9, 13, generator=g) * 4
    idx = torch.stack([torch.randperm(13, generator=g)[:5] for _ in range(9)])
    idx[3] = torch.arange(13)[:5]
    full = torch.arange(13).repeat(9, 1)
    zn, ref = z.double().numpy() * scale, []
    for r in range(9):
        off = np.setdiff1d(np.arange(13), idx[r].numpy())
        ref.append(np.log(np.exp(zn[r, off]).sum()))
    with torch.no_grad():
        fast = logsumexp_outside(z, idx, scale)
    zr = z.clone().requires_grad_(True)
    slow = logsumexp_outside(zr, idx, scale)
    np.testing.assert_allclose(fast.double().numpy(), ref, rtol=1e-6)
    np.testing.assert_allclose(slow.detach().double().numpy(), ref, rtol=1e-6)
    assert torch.isneginf(logsumexp_outside(z, full, scale)).all()
    covered = logsumexp_outside(zr, full, scale)
    assert torch.isneginf(covered).all()
    # the gradient: softmax of scale * z over the ids off idx, times scale (float64 by hand)
    slow.sum().backward()
    want = np.zeros_like(zn)
    for r in range(9):
        off = np.setdiff1d(np.arange(13), idx[r].numpy())
        e = np.exp(zn[r, off] - zn[r, off].max())
        want[r, off] = scale * e / e.sum()
    np.testing.assert_allclose(zr.grad.double().numpy(), want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_logsumexp_outside_with_one_id_left_and_none_left(scale):
    """A row with a single id off idx: the log-sum is that logit (times scale), its gradient scale on it and 0
    elsewhere. A row with none off idx: -inf, and a zero (finite) gradient, not nan."""
    z = torch.tensor([[0.3, -1.2, 2.5, 0.7], [1.0, 2.0, 3.0, 4.0]], dtype=torch.float32)
    idx = torch.tensor([[0, 2, 3], [0, 1, 2]])  # row 0 leaves id 1, row 1 leaves id 3
    covered = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0]])
    with torch.no_grad():
        np.testing.assert_allclose(logsumexp_outside(z, idx, scale).numpy(), [-1.2 * scale, 4.0 * scale], rtol=1e-6)
    zr = z.clone().requires_grad_(True)
    got = logsumexp_outside(zr, idx, scale)
    np.testing.assert_allclose(got.detach().numpy(), [-1.2 * scale, 4.0 * scale], rtol=1e-6)
    got.sum().backward()
    want = np.zeros((2, 4))
    want[0, 1] = want[1, 3] = scale
    np.testing.assert_allclose(zr.grad.numpy(), want, rtol=1e-6, atol=0)
    zc = z.clone().requires_grad_(True)
    out = logsumexp_outside(zc, covered, scale)
    assert torch.isneginf(out).all()
    # what a caller does with it (a masked sum of rows): the covered rows contribute a zero gradient
    torch.where(torch.isfinite(out), out, 0.0).sum().backward()
    assert torch.equal(zc.grad, torch.zeros_like(z))


def test_logsumexp_outside_returns_on_the_device_of_its_logits():
    # a device without values ("meta") stands for a GPU: the result and its buffers are made there, not on the CPU
    z, idx = torch.empty(6, 10, device="meta"), torch.zeros(6, 3, dtype=torch.long, device="meta")
    assert logsumexp_outside(z, idx).device.type == "meta"
    assert logsumexp_outside(z, idx, 2.0).device.type == "meta"


def test_row_block_is_small_on_a_cpu_and_every_row_elsewhere():
    cpu, gpu = torch.device("cpu"), torch.device("meta")  # anything but a CPU: one block of all n rows
    assert [row_block(n, cpu) for n in (1, ROWS, 100)] == [1, ROWS, ROWS]
    assert ROWS < 100 and row_block(100, gpu) == 100 and row_block(1, gpu) == 1


def test_logsumexp_outside_of_no_rows_is_empty():
    """No rows (a block of a per-chunk gold cache build with no one-token chunk): an empty result, not a
    loop stepping by zero rows; one row still equals torch's logsumexp over the other ids."""
    from hld.distill.losses import logsumexp_outside

    z, idx = torch.randn(0, 50), torch.zeros(0, 3, dtype=torch.long)
    assert logsumexp_outside(z, idx).shape == (0,)
    z1, idx1 = torch.randn(1, 50, dtype=torch.float64), torch.tensor([[0, 7, 9]])
    keep = torch.ones(50, dtype=torch.bool)
    keep[[0, 7, 9]] = False
    torch.testing.assert_close(logsumexp_outside(z1.float(), idx1), torch.logsumexp(z1[0, keep], 0).float().reshape(1))
