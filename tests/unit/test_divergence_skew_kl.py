"""skew_kl(alpha) = KL(p || alpha p + (1 - alpha) q) against float64 numpy, its gradient against finite
differences, its limits (alpha -> 0 is forward KL; bounded by log 1/alpha), and through every path a
divergence takes: dense, top-k with the rest bucket, a renormalised top-k teacher, the fused head."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hld.distill.chunked import HeadLossSpec, head_loss
from hld.distill.divergences.registry import parse
from hld.distill.losses import kd_sum
from hld.distill.signals.online import Dense
from hld.distill.signals.topk import TopK


def _np_log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_skew_kl(s: np.ndarray, t: np.ndarray, mask: np.ndarray, *, alpha: float, T: float = 1.0) -> float:
    """T^2 sum over valid rows of sum_j p_j log(p_j / (alpha p_j + (1 - alpha) q_j)), in float64."""
    p, q = np.exp(_np_log_softmax(t / T)), np.exp(_np_log_softmax(s / T))
    m = alpha * p + (1 - alpha) * q
    per = np.where(p > 0, p * (np.log(p) - np.log(m)), 0.0).sum(-1)
    return float((per * mask).sum() * T * T)


def _data(seed: int, n: int = 6, V: int = 11):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, V, generator=g, dtype=torch.float64) * 2
    t = torch.randn(n, V, generator=g, dtype=torch.float64) * 3
    mask = torch.tensor([True, True, False, True, True, False][:n])
    return s, t, mask


@pytest.mark.parametrize("alpha,T", [(0.1, 1.0), (0.5, 1.0), (0.9, 2.0)])
def test_value_matches_float64_numpy(alpha, T):
    s, t, mask = _data(0)
    ours = kd_sum(s.float(), Dense(t.float()), mask, temperature=T, divergence=f"skew_kl(alpha={alpha})")
    want = np_skew_kl(s.numpy(), t.numpy(), mask.numpy(), alpha=alpha, T=T)
    assert float(ours) == pytest.approx(want, rel=1e-5)


def test_gradient_matches_finite_differences_of_the_numpy_reference():
    s, t, mask = _data(1)
    alpha, T = 0.2, 1.5
    s32 = s.float().requires_grad_(True)
    ours = kd_sum(s32, Dense(t.float()), mask, temperature=T, divergence=parse(f"skew_kl(alpha={alpha})"))
    (g,) = torch.autograd.grad(ours, s32)
    x, tn, mn = s.numpy(), t.numpy(), mask.numpy()
    fd, eps = np.zeros_like(x), 1e-6
    for i in range(x.shape[0]):
        for j in range(x.shape[1]):
            d = np.zeros_like(x)
            d[i, j] = eps
            up = np_skew_kl(x + d, tn, mn, alpha=alpha, T=T)
            fd[i, j] = (up - np_skew_kl(x - d, tn, mn, alpha=alpha, T=T)) / (2 * eps)
    np.testing.assert_allclose(g.double().numpy(), fd, rtol=1e-4, atol=2e-6)
    assert g[~mask].abs().max() == 0


def test_limits_forward_kl_and_the_bound():
    s, t, mask = _data(2)
    tl = Dense(t)
    near0 = kd_sum(s, tl, mask, divergence="skew_kl(alpha=1e-9)")
    assert float(near0) == pytest.approx(float(kd_sum(s, tl, mask, divergence="forward_kl")), rel=1e-6)
    # a student with (almost) no mass where the teacher has all: forward KL grows without bound, skew KL
    # stays under log(1/alpha) per row
    far = torch.full_like(s, -1e4)
    far[:, 0] = 0.0
    sharp = torch.full_like(t, -1e4)
    sharp[:, 1] = 0.0
    per_row = float(kd_sum(far, Dense(sharp), mask, divergence="skew_kl(alpha=0.1)")) / int(mask.sum())
    assert per_row == pytest.approx(np.log(10), rel=1e-6)
    assert float(kd_sum(far, Dense(sharp), mask, divergence="forward_kl")) > 1e3


def test_topk_paths_match_numpy_on_the_coarsened_and_renormalised_teachers():
    s, t, mask = _data(3)
    k = 4
    vals, idx = t.topk(k, dim=-1)
    off = t.scatter(-1, idx, float("-inf")).logsumexp(-1)
    bucket = kd_sum(s, TopK(values=vals, indices=idx, rest=off), mask, divergence="skew_kl(alpha=0.3)")
    # by hand: both distributions on the k ids + one outcome for the rest
    p = torch.cat([vals, off[:, None]], -1).log_softmax(-1).exp().numpy()
    lq = s.log_softmax(-1)
    q = torch.cat([lq.gather(-1, idx), lq.scatter(-1, idx, float("-inf")).logsumexp(-1)[:, None]], -1).exp().numpy()
    per = (p * (np.log(p) - np.log(0.3 * p + 0.7 * q))).sum(-1)
    assert float(bucket) == pytest.approx(float((per * mask.numpy()).sum()), rel=2e-6)
    renorm = kd_sum(s, TopK(values=vals, indices=idx), mask, divergence="skew_kl(alpha=0.3)", top_k_rest="renormalize")
    pr = vals.log_softmax(-1).exp().numpy()
    qk = lq.gather(-1, idx).exp().numpy()  # the student keeps its full softmax
    per = (pr * (np.log(pr) - np.log(0.3 * pr + 0.7 * qk))).sum(-1)
    assert float(renorm) == pytest.approx(float((per * mask.numpy()).sum()), rel=2e-6)


def test_the_fused_head_takes_it_through_autograd_and_matches_numpy():
    s, t, mask = _data(4, n=6, V=13)
    g = torch.Generator().manual_seed(5)
    h, W = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(13, 5, generator=g, dtype=torch.float64)
    y = torch.where(mask, torch.arange(6) % 13, torch.full((6,), -100))
    spec = HeadLossSpec(ce_weight=0.4, kd_weight=0.6, divergence="skew_kl(alpha=0.2)", chunk_tokens=4)
    assert not spec.divergence.fused
    _, stats = head_loss(h, W, y, mask, spec, lambda sl: Dense(t[sl]))
    want = np_skew_kl((h @ W.T).numpy(), t.numpy(), mask.numpy(), alpha=0.2)
    assert stats["kd"] == pytest.approx(want, rel=2e-6)
