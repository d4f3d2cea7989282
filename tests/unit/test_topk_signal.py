"""The top-k signal's edges (hld.distill.signals.topk): a teacher whose rest has no mass (rest = -inf with
k < V) through the fused head, its fidelity at k = V and with all the teacher's mass on its k ids, its
device moves, its rows read from an online teacher `chunk` rows at a time, and its cache bytes worked out by
hand. Each against a float64 computation written here or hand numbers."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from hld.distill.chunked import HeadLossSpec, head_loss
from hld.distill.signals import TeacherSignals
from hld.distill.signals.online import OnlineLogits
from hld.distill.signals.topk import TopK

N, D, V, K = 9, 6, 14, 4


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_a_rest_without_mass_through_the_fused_head(T):
    """rest = -inf with k < V: the teacher puts all its mass on its k ids, p_r = 0, so the KD gradient off
    the k ids is T * q_j (the student's own mass there is all error), the value sum_K p log(p / q)."""
    g = torch.Generator().manual_seed(11)
    h, W = torch.randn(N, D, generator=g), torch.randn(V, D, generator=g) * 0.7
    y = torch.randint(0, V, (N,), generator=g)
    m = torch.ones(N, dtype=torch.bool)
    vals = torch.randn(N, K, generator=g).sort(-1, descending=True).values
    ids = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(N)])
    sig = TopK(vals, ids.int(), torch.full((N,), -math.inf))

    h64, W64 = h.double().requires_grad_(True), W.double().requires_grad_(True)
    z = h64 @ W64.T
    logq = torch.log_softmax(z / T, -1)
    logp = torch.log_softmax(vals.double() / T, -1)  # the teacher over its k ids, nothing elsewhere
    kl = (logp.exp() * (logp - logq.gather(-1, ids))).sum(-1)
    ce = -torch.log_softmax(z, -1).gather(-1, y[:, None])[:, 0]
    want = (0.4 * ce + 0.6 * T * T * kl).sum()
    gh, gW = torch.autograd.grad(want, (h64, W64))

    spec = HeadLossSpec(ce_weight=0.4, kd_weight=0.6, temperature=T, chunk_tokens=4, top_k_rest="bucket")
    hh, WW = h.clone().requires_grad_(True), W.clone().requires_grad_(True)
    got, _ = head_loss(hh, WW, y, m, spec, TeacherSignals(source=sig).logits)
    got.backward()
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-5)
    torch.testing.assert_close(hh.grad.double(), gh, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(WW.grad.double(), gW, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("top_k_rest", ["bucket", "renormalize"])
def test_fidelity_of_every_logit_is_zero(top_k_rest):
    full = torch.randn(5, V, generator=torch.Generator().manual_seed(3)) * 2
    v, i = full.sort(-1, descending=True)
    sig = TopK(v, i, torch.full((5,), -math.inf))
    kl = sig.fidelity(full, 1.0, top_k_rest)
    assert torch.isfinite(kl).all() and float(kl.abs().max()) < 1e-6


def test_renormalize_fidelity_is_finite_when_the_teacher_has_no_mass_off_its_k_ids():
    # two equal logits, the others -inf: p = (1/2, 1/2, 0, ..) exactly, and the renormalised k = 2 signal is p
    # (two such rows: each row's own mass decides, not the batch's)
    full = torch.full((2, 6), -math.inf)
    full[:, 2] = full[:, 4] = 1.5
    sig = TopK(torch.full((2, 2), 1.5), torch.tensor([[4, 2], [2, 4]]), torch.full((2,), -math.inf))
    assert sig.fidelity(full, 1.0, "renormalize").tolist() == [0.0, 0.0]
    # with mass off the k ids it is infinite
    assert torch.isinf(sig.fidelity(torch.zeros(2, 6), 1.0, "renormalize")).all()


@pytest.mark.parametrize("rest", [None, torch.zeros(3)])
def test_to_moves_every_tensor(rest):
    sig = TopK(torch.zeros(3, 2), torch.zeros(3, 2, dtype=torch.int32), rest)
    moved = sig.to(torch.device("meta"))  # a device without values stands for a GPU
    assert moved.values.device.type == moved.indices.device.type == "meta"
    assert moved.rest is None if rest is None else moved.rest.device.type == "meta"


def test_from_teacher_reads_the_rows_a_chunk_at_a_time():
    g = torch.Generator().manual_seed(8)
    hidden, W = torch.randn(2, 5, D, generator=g), torch.randn(V, D, generator=g)
    src = OnlineLogits(hidden, W)
    vals, ids, rest = TopK.from_teacher(src, k=K, window_ids=None, T=5, identity={}, chunk=3)  # 10 rows: 3+3+3+1
    z = hidden.reshape(10, D).double() @ W.double().T
    want_v, want_i = z.sort(-1, descending=True)
    assert vals.shape == ids.shape == (10, K) and rest.shape == (10,)
    torch.testing.assert_close(vals.double(), want_v[:, :K], rtol=1e-5, atol=1e-5)
    assert torch.equal(ids.long(), want_i[:, :K])
    torch.testing.assert_close(rest.double(), want_v[:, K:].logsumexp(-1), rtol=1e-5, atol=1e-5)


def test_cache_logit_bytes_by_hand():
    # exact: k ids (int32) + k values (fp16) + the rest (fp32) = 6 k + 4
    exact = SimpleNamespace(logits="exact", value_bits=6)
    assert TopK.cache_logit_bytes(exact, 64, 2048, 262144) == (388.0, 388.0)
    # compact, V = 2^18 (18-bit ids), 8-bit values, k = 64, T = 2048:
    # estimate 64 (8 + 10 + 0.16 x 18) / 8 + 6 + 8/2048 = 167.04 + 6 + 0.00390625
    # bound    64 (8 + 18) / 8 + 18/8 + 6 + 9/2048    = 208 + 2.25 + 6 + 0.00439453125
    compact = SimpleNamespace(logits="compact", value_bits=8)
    est, bound = TopK.cache_logit_bytes(compact, 64, 2048, 262144)
    assert est == pytest.approx(173.04390625, abs=1e-9) and bound == pytest.approx(216.25439453125, abs=1e-9)
    # V = 262145 needs 19 bits; a 2-id vocabulary 1 bit (6-bit values, k = 1, T = 1)
    est, bound = TopK.cache_logit_bytes(compact, 64, 2048, 262145)
    assert bound == pytest.approx(64 * 27 / 8 + 19 / 8 + 6 + 9 / 2048)
    est, bound = TopK.cache_logit_bytes(SimpleNamespace(logits="compact", value_bits=6), 1, 1, 2)
    assert est == pytest.approx((6 + 10 + 0.16) / 8 + 6 + 8) and bound == pytest.approx(7 / 8 + 1 / 8 + 6 + 9)
