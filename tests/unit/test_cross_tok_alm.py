"""hld.distill.cross_tok.alm against float64 numpy: token log-likelihoods by a loop over log-softmaxes,
chunk sums by a loop, the binarised divergence by its formula over explicit chunk probabilities, the
large-temperature limit, zero where the likelihoods agree, and gradients by gradcheck through the
whole path (token log-probs -> chunk sums -> binary KL) on chunks of several tokens on one side."""

from __future__ import annotations

import math

import mpmath  # torch needs sympy, which needs mpmath
import numpy as np
import pytest
import torch

from helpers import bounds_alignment
from hld.distill.cross_tok.alm import alm_rows, alm_sum, chunk_logliks, log1mexp, token_logprobs
from hld.distill.cross_tok.chunks import Chunks


def logsoftmax64(z: np.ndarray) -> np.ndarray:
    z = z - z.max()
    return z - np.log(np.exp(z).sum())


def binary_kl(p: float, q: float) -> float:
    return p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))


def test_token_logprobs_against_a_loop():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=g) * 2
    ids = torch.randint(0, 11, (3, 7), generator=g)
    got = token_logprobs(logits, ids, block_rows=5)
    for b in range(3):
        assert float(got[b, 0]) == 0.0
        for k in range(1, 7):
            want = logsoftmax64(logits[b, k - 1].double().numpy())[int(ids[b, k])]
            assert float(got[b, k]) == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_chunk_logliks_against_a_loop():
    lp = torch.randn(20, dtype=torch.float64)
    start, end = torch.tensor([1, 4, 5, 12]), torch.tensor([4, 5, 9, 20])
    got = chunk_logliks(lp, start, end)
    want = [float(lp[s:e].sum()) for s, e in zip(start.tolist(), end.tolist())]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12)


@pytest.mark.parametrize("tau", [1.0, 5.0, 100.0])
def test_alm_rows_is_the_binary_kl_of_tempered_chunk_probabilities(tau):
    lt = np.array([-0.01, -0.7, -3.0, -12.0, -40.0, -2.0])
    ls = np.array([-0.5, -0.7, -1.0, -15.0, -20.0, -2.5])
    got = alm_rows(torch.tensor(lt), torch.tensor(ls), temperature=tau, eps=1e-6).numpy()
    want = [tau * binary_kl(math.exp(a / tau - 1e-6), math.exp(b / tau - 1e-6)) for a, b in zip(lt, ls)]
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
    assert got[1] == 0.0  # the same likelihood: no loss


def test_other_divergences_are_binary_too():
    lt, ls, tau = -1.3, -0.4, 3.0
    p, q = math.exp(lt / tau - 1e-6), math.exp(ls / tau - 1e-6)
    lt64, ls64 = torch.tensor([lt], dtype=torch.float64), torch.tensor([ls], dtype=torch.float64)
    got = alm_rows(lt64, ls64, temperature=tau, divergence="reverse_kl")
    assert float(got) == pytest.approx(tau * binary_kl(q, p), rel=1e-9)


def test_large_temperature_limit_is_the_generalised_kl_of_surprisals():
    a, b = np.array([0.3, 2.0, 7.5]), np.array([0.9, 1.1, 7.5])
    got = alm_rows(torch.tensor(-a), torch.tensor(-b), temperature=1e5, eps=0.0).numpy()
    want = a * np.log(a / b) - a + b
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-9)


def test_log1mexp_on_both_branches():
    x = torch.tensor([-1e-9, -1e-4, -0.5, -math.log(2), -1.0, -30.0], dtype=torch.float64)
    with mpmath.workdps(50):
        want = [float(mpmath.log(1 - mpmath.exp(mpmath.mpf(v)))) for v in x.tolist()]
    np.testing.assert_allclose(log1mexp(x).numpy(), want, rtol=1e-12)


def test_a_certain_student_gives_a_finite_loss_and_gradient():
    ls = torch.tensor([0.0, 1e-7], requires_grad=True)  # fp32 rounding can give log q >= 0
    loss = alm_rows(torch.tensor([-2.0, -2.0]), ls, temperature=100.0).sum()
    loss.backward()
    assert math.isfinite(float(loss.detach())) and bool(torch.isfinite(ls.grad).all())


def problem(dtype=torch.float64):
    """Two windows; chunks of 3 teacher tokens to 1 student token and 1 to 3, and one-to-one ones."""
    als = [bounds_alignment([0, 1, 4, 5, 7], [0, 1, 2, 5, 6]), bounds_alignment([0, 1, 2, 5], [0, 1, 3, 4])]
    T_t, T_s, V_t, V_s = 8, 7, 13, 9
    g = torch.Generator().manual_seed(1)
    t_logits = torch.randn(2, T_t, V_t, generator=g, dtype=dtype) * 2
    s_logits = torch.randn(2, T_s, V_s, generator=g, dtype=dtype) * 2
    t_ids = torch.randint(0, V_t, (2, T_t), generator=g)
    s_ids = torch.randint(0, V_s, (2, T_s), generator=g)
    chunks = Chunks.from_alignments(als, teacher_len=T_t, student_len=T_s).predicted()
    return als, t_logits, s_logits, t_ids, s_ids, chunks


def test_alm_sum_against_explicit_chunk_probabilities():
    als, t_logits, s_logits, t_ids, s_ids, chunks = problem()
    tau = 4.0
    got = alm_sum(
        token_logprobs(t_logits, t_ids).reshape(-1),
        token_logprobs(s_logits, s_ids).reshape(-1),
        chunks,
        temperature=tau,
    )
    want = 0.0
    for b, al in enumerate(als):
        for c in range(1, al.n_chunks):  # chunk 0 of a window: nothing predicts it
            lt = sum(
                logsoftmax64(t_logits[b, k - 1].numpy())[int(t_ids[b, k])]
                for k in range(al.teacher_bounds[c], al.teacher_bounds[c + 1])
            )
            ls = sum(
                logsoftmax64(s_logits[b, k - 1].numpy())[int(s_ids[b, k])]
                for k in range(al.student_bounds[c], al.student_bounds[c + 1])
            )
            want += tau * binary_kl(math.exp(lt / tau - 1e-6), math.exp(ls / tau - 1e-6))
    assert float(got) == pytest.approx(want, rel=1e-10)


def test_gradient_by_gradcheck_through_token_logprobs_and_chunks():
    _, t_logits, s_logits, t_ids, s_ids, chunks = problem()
    t_lp = token_logprobs(t_logits, t_ids).reshape(-1)

    def loss(s):
        return alm_sum(t_lp, token_logprobs(s, s_ids).reshape(-1), chunks, temperature=3.0)

    assert torch.autograd.gradcheck(loss, (s_logits.clone().requires_grad_(True),), eps=1e-6, atol=1e-7)


def test_the_first_chunk_of_a_window_is_refused():
    _, t_logits, s_logits, t_ids, s_ids, chunks = problem()
    als = [bounds_alignment([0, 1, 2], [0, 1, 2])]
    with pytest.raises(ValueError, match="first chunk"):
        alm_sum(torch.zeros(2), torch.zeros(2), Chunks.from_alignments(als, teacher_len=2, student_len=2))
