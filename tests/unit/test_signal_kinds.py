"""Every registered teacher-signal kind (hld.distill.signals.registry) through the fused head and
through `kd_sum`, against a float64 computation of the distribution the kind states, gradients
included. A kind registered without a builder here fails `test_every_registered_kind_is_tested`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hld.distill.chunked import HeadLossSpec, head_loss
from hld.distill.losses import kd_sum
from hld.distill.signals import TeacherSignals
from hld.distill.signals.online import Dense, OnlineLogits
from hld.distill.signals.registry import KINDS
from hld.distill.signals.sampled import Sampled, draw, unique_counts, weights
from hld.distill.signals.topk import TopK

N, D, V, K = 19, 12, 40, 6


def _dense(zt: torch.Tensor) -> Dense:
    return Dense(zt)


def _topk(zt: torch.Tensor) -> TopK:
    v, i = zt.topk(K, dim=-1)
    off = torch.ones_like(zt, dtype=torch.bool).scatter(-1, i, False)
    rest = torch.where(off, zt.double(), -torch.inf).logsumexp(-1).float()
    return TopK(v, i.int(), rest)  # int32 ids, as a cache reads them


def _sampled(zt: torch.Tensor) -> Sampled:
    ids, counts = unique_counts(draw(zt, np.random.default_rng(3).random((zt.shape[0], K)), tau=1.0).numpy(), slots=K)
    return Sampled(torch.from_numpy(ids).int(), torch.from_numpy(weights(counts, None)).float())


BUILDERS = {"online": _dense, "topk": _topk, "sampled": _sampled}


def _stated_kl(z: torch.Tensor, sig, T: float) -> torch.Tensor:
    """KL per row (float64) of the student's softmax(z / T) from the distribution `sig` states, written
    from the signal's raw tensors: the full softmax; the k ids + the rest; or the estimate sum w log(w/q)."""
    logq = torch.log_softmax(z / T, -1)
    if isinstance(sig, Dense):
        logp = torch.log_softmax(sig.logits.double() / T, -1)
        return (logp.exp() * (logp - logq)).sum(-1)
    idx = sig.indices.long()
    if isinstance(sig, Sampled):
        w = sig.weights.double()
        return (torch.xlogy(w, w) - w * logq.gather(-1, idx)).sum(-1)
    logp = torch.log_softmax(torch.cat([sig.values.double(), sig.rest.double()[:, None]], -1) / T, -1)
    off = torch.ones_like(logq, dtype=torch.bool).scatter(-1, idx, False)
    logq_rest = torch.where(off, logq, -torch.inf).logsumexp(-1, keepdim=True)
    logq_c = torch.cat([logq.gather(-1, idx), logq_rest], -1)
    return (logp.exp() * (logp - logq_c)).sum(-1)


def test_every_registered_kind_is_tested():
    assert set(BUILDERS) == set(KINDS)
    for name, build in BUILDERS.items():
        assert type(build(torch.randn(2, V))) is KINDS[name] and KINDS[name].kind == name


@pytest.mark.parametrize("T", [1.0, 2.0])
@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_fused_head_and_kd_sum_equal_the_stated_distribution_in_float64(kind, T):
    g = torch.Generator().manual_seed(7)
    h, W = torch.randn(N, D, generator=g), torch.randn(V, D, generator=g) * 0.6
    y = torch.randint(0, V, (N,), generator=g)
    m = torch.rand(N, generator=g) > 0.2
    zt = torch.randn(N, V, generator=g) * 2
    sig = BUILDERS[kind](zt)
    h64, W64 = h.double().requires_grad_(True), W.double().requires_grad_(True)
    z = h64 @ W64.T
    ce = -torch.log_softmax(z, -1).gather(-1, y[:, None])[:, 0]
    want = torch.where(m, 0.3 * ce + 0.7 * T * T * _stated_kl(z, sig, T), 0.0).sum()
    gh, gW = torch.autograd.grad(want, (h64, W64))

    spec = HeadLossSpec(ce_weight=0.3, kd_weight=0.7, temperature=T, chunk_tokens=5)
    hh, WW = h.clone().requires_grad_(True), W.clone().requires_grad_(True)
    got, stats = head_loss(hh, WW, y, m, spec, TeacherSignals(source=sig).logits)
    got.backward()
    assert float(got.detach()) == pytest.approx(float(want), rel=2e-5)
    torch.testing.assert_close(hh.grad.double(), gh, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(WW.grad.double(), gW, rtol=1e-4, atol=1e-5)
    # the unfused path (autograd over the kind's kd_rows) states the same KD sum
    zs = (h @ W.T).requires_grad_(True)
    kd = kd_sum(zs, sig.rows(slice(0, N)), m, temperature=T)
    assert float(kd) == pytest.approx(float(stats["kd"]), rel=2e-5)
    (g_kd,) = torch.autograd.grad(kd, zs)
    zd = (h.double() @ W.double().T).requires_grad_(True)
    (g_want,) = torch.autograd.grad(torch.where(m, T * T * _stated_kl(zd, sig, T), 0.0).sum(), zd)
    torch.testing.assert_close(g_kd.double(), g_want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_rows_and_to_keep_the_signal(kind):
    zt = torch.randn(N, V, generator=torch.Generator().manual_seed(1))
    sig = BUILDERS[kind](zt)
    a = sig.rows(slice(3, 11)).rows(slice(2, 5))  # rows 5..7
    b = sig.rows(slice(5, 8)).to(torch.device("cpu"))
    s, every = torch.randn(3, V, dtype=torch.float64), torch.ones(3, dtype=torch.bool)
    assert float(kd_sum(s, a, every)) == float(kd_sum(s, b, every))
    c = sig.rows(slice(0, 3))  # other rows: another value
    assert float(kd_sum(s, c, every)) != float(kd_sum(s, a, every))


def test_online_logits_give_dense_rows_of_the_head():
    g = torch.Generator().manual_seed(2)
    hidden, W = torch.randn(2, 5, D, generator=g), torch.randn(V, D, generator=g)
    src = OnlineLogits(hidden, W, softcap=3.0)
    got = src.rows(slice(4, 9))
    want = 3.0 * torch.tanh(hidden.reshape(10, D)[4:9].double() @ W.double().T / 3.0)
    torch.testing.assert_close(got.logits.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_fidelity_is_zero_only_for_the_full_distribution(kind):
    zt = torch.randn(N, V, generator=torch.Generator().manual_seed(4)) * 2
    kl = BUILDERS[kind](zt).fidelity(zt, 1.0, "bucket")
    assert kl.dtype == torch.float64 and kl.shape == (N,)
    if kind == "online":
        assert float(kl.abs().max()) < 1e-10
    else:
        assert (kl > 1e-4).all()


@pytest.mark.parametrize("k", [K, V, V + 5])
def test_dense_as_top_k_sorts_the_logits_and_keeps_the_log_mass_off_them(k):
    """What a cache stores of an online teacher: its k largest logits in descending order, their ids and
    logsumexp of the others (-inf when k covers the vocabulary: every logit, sorted), against numpy."""
    zt = torch.randn(N, V, generator=torch.Generator().manual_seed(5)) * 3
    got = Dense(zt).as_top_k(k)
    z = zt.double().numpy()
    order = np.argsort(-z, axis=-1)[:, : min(k, V)]  # continuous random logits: no ties
    assert np.array_equal(got.indices.long().numpy(), order)
    assert np.array_equal(got.values.double().numpy(), np.take_along_axis(z, order, -1))
    off = np.ones_like(z, dtype=bool)
    np.put_along_axis(off, order, False, -1)
    rest = np.array([np.logaddexp.reduce(row[o]) if o.any() else -np.inf for row, o in zip(z, off)])
    assert got.rest.shape == (N,)
    np.testing.assert_allclose(got.rest.double().numpy(), rest, rtol=1e-6)
