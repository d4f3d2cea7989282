"""hld.distill.cross_tok.gold: with identical vocabularies and one-token chunks it is the KD of
torch.nn.functional.kl_div; over a partial shared vocabulary, the bucket and renormalised forms against
float64 numpy; chunks of several tokens on either side go to ULD (against a numpy loop over sorted
vectors); gradients by gradcheck in float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import bounds_alignment
from hld.distill.cross_tok.chunks import Chunks
from hld.distill.cross_tok.gold import gold_parts, shared_logprobs
from hld.distill.cross_tok.vocab import SharedVocab


def softmax64(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


def vocab(t_ids, s_ids, V_t, V_s) -> SharedVocab:
    return SharedVocab(np.asarray(t_ids, np.int64), np.asarray(s_ids, np.int64), V_t, V_s)


def randn(seed, *shape, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype) * 2


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_identical_vocabularies_and_tokens_give_torch_kl_div(T):
    V, n = 17, 9
    als = [bounds_alignment(list(range(n + 1)), list(range(n + 1)))]  # every chunk one token each side
    chunks = Chunks.from_alignments(als, teacher_len=n, student_len=n).predicted()
    t, s = randn(0, n, V, dtype=torch.float32), randn(1, n, V, dtype=torch.float32)
    parts = gold_parts(t, s, chunks, vocab(range(V), range(V), V, V), temperature=T)
    rows = torch.arange(n - 1)  # rows 0..n-2 predict chunks 1..n-1
    want = F.kl_div(F.log_softmax(s[rows] / T, -1), F.softmax(t[rows] / T, -1), reduction="sum") * T * T
    assert float(parts.exact) == pytest.approx(float(want), rel=1e-5)
    assert (parts.n_exact, parts.n_uld, float(parts.uld)) == (n - 1, 0, 0.0)


def partial_problem():
    V_t, V_s = 12, 9
    t_ids, s_ids = [0, 2, 3, 7, 8, 11], [5, 1, 0, 2, 8, 3]  # teacher id -> student id, permuted
    return vocab(t_ids, s_ids, V_t, V_s), randn(2, 4, V_t), randn(3, 4, V_s)


@pytest.mark.parametrize("rest", ["bucket", "renormalize"])
def test_shared_logprobs_against_numpy(rest):
    v, t, s = partial_problem()
    for logits, ids in ((t, v.teacher_ids), (s, v.student_ids)):
        got = shared_logprobs(logits, torch.as_tensor(ids), temperature=1.5, rest=rest, block_rows=3).numpy()
        for r in range(logits.shape[0]):
            p = softmax64(logits[r].numpy() / 1.5)
            shared = p[ids]
            want = np.append(shared, 1 - shared.sum()) if rest == "bucket" else shared / shared.sum()
            np.testing.assert_allclose(np.exp(got[r]), want, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("rest", ["bucket", "renormalize"])
def test_exact_part_over_a_partial_vocabulary_against_numpy(rest):
    v, t, s = partial_problem()
    als = [bounds_alignment([0, 1, 2, 3, 4], [0, 1, 2, 3, 4])]
    chunks = Chunks.from_alignments(als, teacher_len=4, student_len=4).predicted()
    parts = gold_parts(t, s, chunks, v, temperature=1.0, rest=rest)
    want = 0.0
    for r in range(3):
        p, q = softmax64(t[r].numpy())[v.teacher_ids], softmax64(s[r].numpy())[v.student_ids]
        if rest == "bucket":
            p, q = np.append(p, 1 - p.sum()), np.append(q, 1 - q.sum())
        else:
            p, q = p / p.sum(), q / q.sum()
        want += float((p * np.log(p / q)).sum())
    assert float(parts.exact) == pytest.approx(want, rel=1e-10)


def sorted_l1(zt: np.ndarray, zs: np.ndarray) -> float:
    p, q = np.sort(softmax64(zt))[::-1], np.sort(softmax64(zs))[::-1]
    w = max(len(p), len(q))
    return float(np.abs(np.pad(p, (0, w - len(p))) - np.pad(q, (0, w - len(q)))).sum())


def test_chunks_of_several_tokens_fall_back_to_uld():
    v, _, _ = partial_problem()
    # chunks: 0 (1|1), 1 (1|1), 2 (3|1), 3 (1|2), 4 (1|1), 5 (2|1)
    als = [bounds_alignment([0, 1, 2, 5, 6, 7, 9], [0, 1, 2, 3, 5, 6, 7])]
    chunks = Chunks.from_alignments(als, teacher_len=9, student_len=7).predicted()
    t, s = randn(4, 9, 12), randn(5, 7, 9)
    parts = gold_parts(t, s, chunks, v, uld_top_k=None)
    assert (parts.n_exact, parts.n_uld) == (2, 3)
    # predicting rows: chunk c's first token's predecessor, teacher tb[c]-1 and student sb[c]-1
    uld_rows = [(1, 1), (4, 2), (6, 5)]  # chunks 2, 3, 5
    want_uld = sum(sorted_l1(t[a].numpy(), s[b].numpy()) for a, b in uld_rows)
    assert float(parts.uld) == pytest.approx(want_uld, rel=1e-10)
    want_exact = 0.0
    for a, b in [(0, 0), (5, 4)]:  # chunks 1 and 4
        p, q = softmax64(t[a].numpy())[v.teacher_ids], softmax64(s[b].numpy())[v.student_ids]
        p, q = np.append(p, 1 - p.sum()), np.append(q, 1 - q.sum())
        want_exact += float((p * np.log(p / q)).sum())
    assert float(parts.exact) == pytest.approx(want_exact, rel=1e-10)
    assert float(parts.total(0.5)) == pytest.approx(want_exact + 0.5 * want_uld, rel=1e-10)


def test_no_shared_vocabulary_is_all_uld():
    als = [bounds_alignment([0, 1, 2, 3], [0, 1, 2, 3])]
    chunks = Chunks.from_alignments(als, teacher_len=3, student_len=3).predicted()
    t, s = randn(6, 3, 12), randn(7, 3, 9)
    parts = gold_parts(t, s, chunks, vocab([], [], 12, 9), uld_top_k=None)
    assert (parts.n_exact, parts.n_uld, float(parts.exact)) == (0, 2, 0.0)
    assert float(parts.uld) == pytest.approx(sum(sorted_l1(t[r].numpy(), s[r].numpy()) for r in (0, 1)), rel=1e-10)


@pytest.mark.parametrize("rest", ["bucket", "renormalize"])
def test_gradient_by_gradcheck_and_only_to_the_student(rest):
    v, _, _ = partial_problem()
    als = [bounds_alignment([0, 1, 2, 5, 6, 7, 9], [0, 1, 2, 3, 5, 6, 7])]
    chunks = Chunks.from_alignments(als, teacher_len=9, student_len=7).predicted()
    t, s = randn(8, 9, 12).requires_grad_(True), randn(9, 7, 9).requires_grad_(True)

    def loss(x):
        return gold_parts(t, x, chunks, v, temperature=1.7, rest=rest, uld_top_k=4).total(0.7)

    assert torch.autograd.gradcheck(loss, (s,), eps=1e-6, atol=1e-7)
    loss(s).backward()
    assert t.grad is None
