"""The `cka` hidden loss against independent computations: linear CKA in its kernel form (HSIC with
the centring matrix, float64 numpy; the code uses the feature form) for the value, central finite
differences of that form for the gradient, and the invariances, the mask and n < 2 by construction."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hld.data.packing import IGNORE, Batch
from hld.distill.hidden_losses.cka import Cka
from hld.distill.objectives import HiddenObjective
from hld.distill.projectors import Projectors
from hld.distill.signals import StudentOutputs, TeacherSignals

B, T, D_S, D_T = 2, 7, 5, 9


def np_cka_loss(x: np.ndarray, y: np.ndarray, mask: np.ndarray) -> float:
    """(1 - CKA) * n over the valid rows, CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) with linear
    kernels K = X X^T, L = Y Y^T and HSIC(K, L) = tr(K H L H), H = I - 11^T / n. x (..., d_s), y (..., d_t)."""
    xv = x.reshape(-1, x.shape[-1])[mask.reshape(-1)].astype(np.float64)
    yv = y.reshape(-1, y.shape[-1])[mask.reshape(-1)].astype(np.float64)
    n = xv.shape[0]
    H = np.eye(n) - np.ones((n, n)) / n
    K, L = xv @ xv.T, yv @ yv.T

    def hsic(a, b):
        return np.trace(a @ H @ b @ H)

    return float((1 - hsic(K, L) / np.sqrt(hsic(K, K) * hsic(L, L))) * n)


def _inputs(seed: int, p_valid: float = 0.7):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, D_S, generator=g)
    y = torch.randn(B, T, D_T, generator=g) * 30 + 5  # Gemma-like scale and offset
    y[..., :D_S] += 20 * x  # some shared structure: CKA well inside (0, 1)
    mask = torch.rand(B, T, generator=g) < p_valid
    return x, y, mask


def _ours(x, y, mask) -> torch.Tensor:
    return Cka().pair_sum(x, y, mask)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cka_value_matches_the_kernel_form_in_float64(seed):
    x, y, mask = _inputs(seed)
    ref = np_cka_loss(x.numpy(), y.numpy(), mask.numpy())
    assert 0.05 * mask.sum() < ref < 0.95 * mask.sum()  # a value that can be wrong
    assert float(_ours(x, y, mask)) == pytest.approx(ref, rel=1e-5)


def test_cka_gradient_matches_finite_differences_of_the_kernel_form():
    x, y, mask = _inputs(3)
    xr = x.clone().requires_grad_(True)
    _ours(xr, y, mask).backward()
    xn, yn, mn = x.double().numpy(), y.double().numpy(), mask.numpy()
    fd = np.zeros_like(xn)
    h = 1e-6
    for idx in np.ndindex(*xn.shape):
        up, down = xn.copy(), xn.copy()
        up[idx] += h
        down[idx] -= h
        fd[idx] = (np_cka_loss(up, yn, mn) - np_cka_loss(down, yn, mn)) / (2 * h)
    assert np.abs(fd).max() > 1e-2  # a gradient that can be wrong
    np.testing.assert_allclose(xr.grad.double().numpy(), fd, rtol=1e-3, atol=1e-4 * np.abs(fd).max())
    assert xr.grad[~mask].abs().max() == 0  # masked rows get no gradient


def test_cka_ignores_isotropic_scaling_rotation_and_translation_of_the_student():
    x, y, mask = _inputs(4)
    q, _ = torch.linalg.qr(torch.randn(D_S, D_S, generator=torch.Generator().manual_seed(5), dtype=torch.float64))
    moved = (x.double() @ q * 7.3 + torch.arange(D_S, dtype=torch.float64)).float()
    base = float(_ours(x, y, mask))
    assert float(_ours(moved, y, mask)) == pytest.approx(base, rel=1e-5)
    assert float(_ours(x * 1e-3, y * 1e3, mask)) == pytest.approx(base, rel=1e-5)
    assert float(_ours(x, y + 100, mask)) == pytest.approx(base, rel=1e-5)


def test_cka_of_a_rotated_scaled_copy_is_zero_and_of_unrelated_states_is_not():
    x, _, mask = _inputs(6)
    q, _ = torch.linalg.qr(torch.randn(D_T, D_T, generator=torch.Generator().manual_seed(7)))
    y = torch.cat([x, torch.zeros(B, T, D_T - D_S)], -1) @ q * 40  # Y = X embedded, rotated and scaled
    assert abs(float(_ours(x, y, mask))) < 1e-4 * float(mask.sum())
    unrelated = torch.randn(B, T, D_T, generator=torch.Generator().manual_seed(8))
    assert float(_ours(x, unrelated, mask)) > 0.1


def test_cka_masked_rows_change_nothing():
    x, y, mask = _inputs(9)
    x2, y2 = x.clone(), y.clone()
    x2[~mask] = torch.randn(int((~mask).sum()), D_S) * 1e6
    y2[~mask] = float("inf")
    x2r = x2.clone().requires_grad_(True)
    a, b = _ours(x, y, mask), _ours(x2r, y2, mask)
    assert float(a) == pytest.approx(float(b.detach()), rel=1e-6)
    b.backward()
    assert torch.isfinite(x2r.grad).all() and x2r.grad[~mask].abs().max() == 0


@pytest.mark.parametrize("valid", [0, 1])
def test_cka_with_fewer_than_two_rows_is_zero_without_nan(valid):
    x, y, _ = _inputs(10)
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask.view(-1)[:valid] = True
    xr = x.clone().requires_grad_(True)
    out = _ours(xr, y, mask)
    out.backward()
    assert float(out.detach()) == 0.0 and torch.isfinite(xr.grad).all() and xr.grad.abs().max() == 0


def test_cka_with_no_spread_on_one_side_is_zero_without_nan():
    x, y, mask = _inputs(11)
    for xs, ys in ((torch.ones_like(x) * 3, y), (x, torch.ones_like(y) * 3)):
        xr = xs.clone().requires_grad_(True)
        out = _ours(xr, ys, mask)
        out.backward()
        assert float(out.detach()) == 0.0 and torch.isfinite(xr.grad).all()


def test_cka_through_the_objective_is_beta_times_the_mean_over_pairs():
    """Projector-free, the teacher target normalised (rms here), divided by the batch's targets."""
    pairs = [(1, 2), (2, 3)]
    proj = Projectors(pairs, d_student=D_S, d_teacher=D_T, linear=False)
    obj = HiddenObjective(proj, loss="cka", normalize_teacher="rms", beta=0.5, skip_first_position=True)
    g = torch.Generator().manual_seed(12)
    ids = torch.randint(0, 50, (B, T), generator=g)
    labels = torch.roll(ids, -1, dims=1)
    labels[:, -1] = IGNORE
    batch = Batch(ids, labels)
    s = {k: torch.randn(B, T, D_S, generator=g) for k in (1, 2)}
    t = {k: torch.randn(B, T, D_T, generator=g) * 10 for k in (2, 3)}
    student = StudentOutputs(final_hidden=torch.zeros(B, T, D_S), hidden=s, head_weight=torch.zeros(3, D_S))
    value, n, _ = obj(batch, student, TeacherSignals(hidden=t))
    mask = batch.mask.numpy().copy()
    mask[:, 0] = False
    rms = {
        k: v.double().numpy() / np.sqrt((v.double().numpy() ** 2).mean(-1, keepdims=True) + 1e-6) for k, v in t.items()
    }
    expected = 0.5 * np.mean([np_cka_loss(s[a].numpy(), rms[b], mask) for a, b in pairs])
    assert n == batch.n_targets and float(value) == pytest.approx(expected, rel=1e-5)
    assert obj.n_pairs == 0 and obj.wants_stats is False  # rms: no statistics; no projector trained


def test_cka_cost_dims_are_the_cross_product_and_the_two_grams():
    dims = Cka().cost_dims(d_student=64, d_teacher=640, seq_len=128)
    flops = sum(6 * a * b for a, b in dims)
    assert flops == pytest.approx(4 * 64 * 640 + 6 * 64 * 64 + 2 * 640 * 640)
