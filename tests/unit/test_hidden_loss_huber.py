"""The `huber` hidden loss against torch.nn.functional.smooth_l1_loss in float64 (value and gradient),
masked like every row loss, and robust where MSE is not: one massive-activation dimension."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hld.distill.hidden_losses.registry import REGISTRY, row_loss


def _problem(seed: int = 0, n: int = 9, d: int = 7):
    g = torch.Generator().manual_seed(seed)
    pred = (torch.randn(n, d, generator=g, dtype=torch.float64) * 1.5).requires_grad_(True)
    target = torch.randn(n, d, generator=g, dtype=torch.float64)
    mask = torch.rand(n, generator=g) > 0.3
    return pred, target, mask


def test_huber_is_smooth_l1_mean_over_dims_summed_over_valid_rows():
    pred, target, mask = _problem()
    got = row_loss("huber").row_sum(pred, target, mask)
    per = F.smooth_l1_loss(pred, target, reduction="none", beta=1.0).mean(-1)
    want = per[mask].sum()
    assert float(got) == pytest.approx(float(want), rel=1e-6)
    (g_got,) = torch.autograd.grad(got, pred)
    (g_want,) = torch.autograd.grad(want, pred)
    torch.testing.assert_close(g_got.double(), g_want, rtol=1e-5, atol=1e-7)
    assert float(g_got[~mask].abs().max()) == 0.0  # masked rows get no gradient


def test_both_branches_are_exercised_and_equal_at_the_joint():
    pred, target, _ = _problem(1)
    e = (pred - target).abs()
    assert (e < 1).any() and (e > 1).any()
    at = torch.tensor([[1.0]], dtype=torch.float64)  # |e| = beta: 0.5 from both sides
    assert float(REGISTRY["huber"].rows(at, torch.zeros_like(at), 1e-6)) == pytest.approx(0.5)


def test_a_massive_activation_moves_huber_linearly_and_mse_quadratically():
    """One dimension 100x off (Sun et al.'s massive activations): MSE's gradient there is 100x larger than
    on a unit error, Huber's is the same (bounded by 1/d)."""
    d = 8
    target = torch.zeros(1, d, dtype=torch.float64)
    pred = torch.ones(1, d, dtype=torch.float64)
    pred[0, 0] = 100.0
    pred.requires_grad_(True)
    mask = torch.ones(1, dtype=torch.bool)
    for name, ratio in (("huber", 1.0), ("mse", 100.0)):
        (g,) = torch.autograd.grad(row_loss(name).row_sum(pred, target, mask), pred)
        assert float(g[0, 0] / g[0, 1]) == pytest.approx(ratio)
    (g,) = torch.autograd.grad(row_loss("huber").row_sum(pred, target, mask), pred)
    assert float(g.abs().max()) == pytest.approx(1 / d)
