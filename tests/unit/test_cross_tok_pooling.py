"""hld.distill.cross_tok.pooling against explicit indexing (a loop over chunks), with chunks of several
tokens on one side and one on the other; gradients by gradcheck in float64 and by the rule (the last
token gets the whole gradient, a mean spreads it as 1/length)."""

from __future__ import annotations

import pytest
import torch

from helpers import bounds_alignment
from hld.distill.cross_tok.chunks import Chunks
from hld.distill.cross_tok.pooling import pool_chunks, pool_pair


def problem():
    als = [bounds_alignment([0, 1, 4, 5, 7], [0, 1, 2, 5, 6]), bounds_alignment([0, 1, 2, 6], [0, 3, 4, 5])]
    chunks = Chunks.from_alignments(als, teacher_len=8, student_len=7)
    g = torch.Generator().manual_seed(0)
    t = torch.randn(2, 8, 6, generator=g, dtype=torch.float64)
    s = torch.randn(2, 7, 4, generator=g, dtype=torch.float64)
    return als, chunks, t, s


@pytest.mark.parametrize("how", ["last", "mean"])
def test_pool_pair_against_a_loop_over_chunks(how):
    als, chunks, t, s = problem()
    pt, ps = pool_pair(t, s, chunks, how=how)
    want_t, want_s = [], []
    for b, al in enumerate(als):
        for c in range(al.n_chunks):
            ts = t[b, al.teacher_bounds[c] : al.teacher_bounds[c + 1]]
            ss = s[b, al.student_bounds[c] : al.student_bounds[c + 1]]
            want_t.append(ts[-1] if how == "last" else ts.sum(0) / len(ts))
            want_s.append(ss[-1] if how == "last" else ss.sum(0) / len(ss))
    torch.testing.assert_close(pt, torch.stack(want_t), rtol=1e-12, atol=0)
    torch.testing.assert_close(ps, torch.stack(want_s), rtol=1e-12, atol=0)
    assert pt.shape == (len(chunks), 6) and ps.shape == (len(chunks), 4)


@pytest.mark.parametrize("how", ["last", "mean"])
def test_gradient_by_gradcheck(how):
    _, chunks, t, _ = problem()
    flat = t.reshape(-1, 6).clone().requires_grad_(True)
    w = torch.randn(len(chunks), 6, dtype=torch.float64)

    def f(x):
        return (pool_chunks(x, chunks.teacher_start, chunks.teacher_end, how=how) * w).sum()

    assert torch.autograd.gradcheck(f, (flat,))


def test_gradient_rule():
    _, chunks, t, _ = problem()
    flat = t.reshape(-1, 6).clone().requires_grad_(True)
    pool_chunks(flat, chunks.teacher_start, chunks.teacher_end, how="mean").sum().backward()
    lengths = (chunks.teacher_end - chunks.teacher_start).tolist()
    want = torch.zeros(16)
    for s, n in zip(chunks.teacher_start.tolist(), lengths):
        want[s : s + n] = 1.0 / n
    torch.testing.assert_close(flat.grad[:, 0].float(), want)  # padding rows (past a window's tokens): none
    flat.grad = None
    pool_chunks(flat, chunks.teacher_start, chunks.teacher_end, how="last").sum().backward()
    assert sorted(torch.nonzero(flat.grad[:, 0]).flatten().tolist()) == (chunks.teacher_end - 1).tolist()


def test_unknown_pooling_is_refused():
    _, chunks, t, _ = problem()
    with pytest.raises(ValueError, match="not one of"):
        pool_chunks(t.reshape(-1, 6), chunks.teacher_start, chunks.teacher_end, how="max")
