"""hld.distill.cross_tok.uld against a float64 numpy loop over sorted probability vectors (full rows and
top-k with the rest bucket), its properties (zero up to a vocabulary permutation, a lower bound that
grows with k and is exact once k covers both vocabularies), the cached top-k form, and gradients by
torch.autograd.gradcheck in float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hld.distill.cross_tok.uld import top_logprobs, top_of_cache, uld_rows, uld_sum


def softmax64(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


def uld_by_hand(t_logits: np.ndarray, s_logits: np.ndarray, k=None, T: float = 1.0) -> np.ndarray:
    """Per row: sort both probability vectors descending, pad with zeros, sum |differences| over the first
    k ranks, then |teacher mass past rank k - student mass past rank k|."""
    out = []
    for zt, zs in zip(t_logits.astype(np.float64), s_logits.astype(np.float64)):
        p = np.sort(softmax64(zt / T))[::-1]
        q = np.sort(softmax64(zs / T))[::-1]
        width = max(len(p), len(q))
        p = np.concatenate([p, np.zeros(width - len(p))])
        q = np.concatenate([q, np.zeros(width - len(q))])
        kk = width if k is None else min(k, width)
        total = 0.0
        for i in range(kk):
            total += abs(p[i] - q[i])
        total += abs(p[kk:].sum() - q[kk:].sum())
        out.append(total)
    return np.array(out)


def logits(seed: int, m: int, V: int, scale: float = 3.0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(m, V, generator=g, dtype=torch.float64) * scale).to(dtype)


def uld(t, s, k, T=1.0):
    return uld_rows(top_logprobs(t, k, temperature=T), top_logprobs(s, k, temperature=T))


@pytest.mark.parametrize("k", [None, 1, 5, 17, 40, 1000])
@pytest.mark.parametrize("T", [1.0, 2.5])
def test_against_a_hand_loop_with_different_vocabularies(k, T):
    t, s = logits(0, 6, 40), logits(1, 6, 23, scale=2.0)
    got = uld(t, s, k, T)
    want = uld_by_hand(t.numpy(), s.numpy(), k, T)
    np.testing.assert_allclose(got.numpy(), want, rtol=2e-5, atol=1e-6)
    # the student's vocabulary the wider one: the same by symmetry of the formula
    np.testing.assert_allclose(uld(s, t, k, T).numpy(), want, rtol=2e-5, atol=1e-6)


def test_zero_up_to_a_vocabulary_permutation_and_padding():
    s = logits(2, 5, 30)
    perm = torch.randperm(30, generator=torch.Generator().manual_seed(3))
    t = torch.cat([s[:, perm], torch.full((5, 20), float("-inf"))], 1)  # 20 extra ids of no mass
    for k in (None, 4, 30, 64):
        assert float(uld(t, s, k).abs().max()) < 5e-6  # fp32 rounding of sums of exps
    assert float(uld(logits(4, 5, 30), s, None).min()) > 0.05  # and not zero otherwise


def test_top_k_is_a_lower_bound_increasing_in_k_and_exact_past_both_vocabularies():
    t, s = logits(5, 8, 50, scale=1.5), logits(6, 8, 35, scale=1.5)
    full = uld(t, s, None)
    prev = torch.zeros_like(full)
    for k in (1, 2, 4, 8, 16, 34, 35, 49):
        cur = uld(t, s, k)
        assert bool((cur <= full + 1e-6).all()) and bool((cur >= prev - 1e-6).all())
        prev = cur
    # tight where the tails differ with one sign, strict where they cross
    assert float((full - uld(t, s, 8)).max()) > 1e-3
    torch.testing.assert_close(uld(t, s, 50), full, rtol=1e-6, atol=5e-7)


def test_the_cached_form_is_the_dense_form_at_temperature_one():
    """A cache stores the k largest logits and log sum of exp over the rest (hld.distill.signals.topk)."""
    t = logits(7, 4, 60)
    k = 10
    vals, idx = torch.topk(t, k, -1)
    rest = torch.logsumexp(t.scatter(-1, idx, float("-inf")), -1)
    top_c = top_of_cache(vals, rest)
    torch.testing.assert_close(top_c, top_logprobs(t, k), rtol=1e-5, atol=1e-6)
    lp = np.log(np.stack([softmax64(r) for r in t.double().numpy()]))
    np.testing.assert_allclose(top_c.numpy(), np.sort(lp, -1)[:, ::-1][:, :k], rtol=1e-5, atol=1e-5)
    assert float(uld_rows(top_c, top_logprobs(t, k)).abs().max()) < 1e-6


def test_uld_sum_is_the_sum_of_rows_and_reaches_only_the_student():
    t = logits(8, 7, 300).requires_grad_(True)
    s = logits(9, 7, 120).requires_grad_(True)
    got = uld_sum(t, s, top_k=16)
    assert float(got.detach()) == pytest.approx(uld_by_hand(t.detach().numpy(), s.detach().numpy(), 16).sum(), rel=1e-5)
    got.backward()
    assert t.grad is None and s.grad is not None and float(s.grad.abs().sum()) > 0


def test_rows_in_blocks_are_the_rows_at_once():
    t = logits(10, 70, 90)
    a = top_logprobs(t, 9, block_rows=8)
    b = top_logprobs(t, 9, block_rows=1000)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("k", [None, 6])
def test_gradient_by_gradcheck_in_float64(k):
    t = logits(11, 4, 25, dtype=torch.float64)
    s = logits(12, 4, 18, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: uld_sum(t, x, top_k=k, temperature=1.3), (s,), eps=1e-6, atol=1e-7)


def test_gradient_is_the_sign_rule():
    """d ULD / d q_(i) = sign(q_(i) - p_(i)) at the student's rank-i token (full rows): checked through
    the softmax's Jacobian, J = diag(q) - q q^T, so dL/dz = J sign-vector."""
    t, s = logits(13, 1, 12, dtype=torch.float64), logits(14, 1, 12, dtype=torch.float64).requires_grad_(True)
    uld_sum(t, s, top_k=None).backward()
    q = torch.softmax(s.detach()[0], -1).numpy()
    p_sorted = np.sort(torch.softmax(t[0], -1).numpy())[::-1]
    order = np.argsort(-q)
    sign = np.empty(12)
    sign[order] = np.sign(q[order] - p_sorted)
    want = q * sign - q * (q @ sign)
    np.testing.assert_allclose(s.grad[0].numpy(), want, rtol=1e-10, atol=1e-12)
