"""Universal Logit Distillation (Boizard et al., arXiv 2402.12030): a distance between a teacher's and
a student's next-token distributions that needs no shared vocabulary.

Definition. Sort each distribution's probabilities in descending order, pad the shorter vocabulary with
zeros, and sum the absolute differences rank by rank:

    ULD(p, q) = sum_i |p_(i) - q_(i)|,    p_(1) >= p_(2) >= ...,  q_(1) >= q_(2) >= ...

The paper obtains it as a Wasserstein-1 distance between the two distributions in which tokens are
matched by rank rather than by identity; it is what its reference code (Nicolas-BZRD/llm-recipes,
`DistillationLoss`) and TRL's ULD loss compute, on full rows. It is invariant to any permutation of either
vocabulary (so it compares only the *shape* of the two distributions: how peaked, how long the tail),
zero exactly when the sorted vectors agree, and at most 2. Its gradient with respect to the student's
probabilities is sign(q_(i) - p_(i)) at the student's rank-i token.

Top-k (`top_k`, default 64). Sorting a 262,144-wide teacher row costs far more than the rest of the loss
(222 rows of 262,144 against a 32,000-wide student, forward + backward on one thread of a shared 2-core
Xeon: 14.6 s for full rows, 1.1 s at k = 64; benchmarks/cross_tok_losses.py). We keep each side's k
largest probabilities and its *rest* R = 1 - the sum of those k, and compute

    ULD_k(p, q) = sum_{i <= k} |p_(i) - q_(i)| + |R_p - R_q|,

the tails treated as one outcome each, the way hld's top-k KD keeps the teacher's rest as one bucket
(hld.distill.losses). By the triangle inequality ULD_k <= ULD_{k+1} <= ULD: a lower bound, increasing in
k, exact once k covers both vocabularies (R = 0). A tail bucket pushes the student's tail mass towards
the teacher's; the other natural truncation, |R_p| + |R_q| (an upper bound), would always push the
student's tail mass down and make it more peaked than its teacher. k = 64 is also what the offline
cache keeps (`teacher.cache_top_k`), with the teacher's rest: ULD_64 needs nothing the cache lacks
(`top_of_cache`). The reference code sorts full rows; `top_k=None` does too (exact, slow). R is read as
1 - sum (an fp32 rounding of ~1e-7 where the k ids hold everything), not as a logsumexp over the other
V - k ids, which would cost the teacher a second pass over its row.

Temperature: both distributions are softmax(z / T). ULD has no T^2 factor (the reference code has none).
"""

from __future__ import annotations

from typing import Optional

import torch

from hld.distill.cross_tok.chunks import as_float

BLOCK_ROWS = 32  # rows of a (rows, V) fp32 temporary at a time: 32 MiB at V = 262,144


def top_logprobs(
    logits: torch.Tensor, k: Optional[int], *, temperature: float = 1.0, block_rows: int = BLOCK_ROWS
) -> torch.Tensor:
    """Log-probabilities of each row's k most likely outcomes under softmax(logits / T), descending,
    (m, min(k, V)) fp32; `k=None`: every outcome, sorted. Differentiable; rows are processed `block_rows`
    at a time so no (m, V) fp32 copy of the logits exists."""
    m, V = logits.shape
    kk = V if k is None else min(k, V)
    tops = []
    for i in range(0, m, block_rows):
        z = as_float(logits[i : i + block_rows])  # (b, V)
        z = z / temperature if temperature != 1.0 else z
        val = torch.sort(z, -1, descending=True).values if kk == V else torch.topk(z, kk, -1).values  # (b, kk)
        tops.append(val - torch.logsumexp(z, -1, keepdim=True))
    return torch.cat(tops) if tops else as_float(logits.new_zeros(0, kk))


def top_of_cache(values: torch.Tensor, rest: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """`top_logprobs` of a cached top-k teacher (`TopK.values` (m, k) descending, `TopK.rest` (m,) the log
    of its mass off them): softmax([v_1..v_k, rest] / T) at the k ids, the rest read as one logit as in
    hld's top-k KD (exact at T = 1)."""
    z = torch.cat([as_float(values), as_float(rest).unsqueeze(-1)], -1) / temperature  # (m, k+1)
    return torch.log_softmax(z, -1)[:, :-1]


def uld_rows(
    teacher_top: torch.Tensor, student_top: torch.Tensor, teacher_rest: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """ULD_k per row (m,) from each side's `top_logprobs`: the sum over ranks of |p_(i) - q_(i)|, the
    narrower side padded with zero probabilities, plus |R_p - R_q| with R = 1 - the sum of a side's k
    probabilities (fp32 rounding leaves |R| ~ 1e-7 where the k cover the vocabulary). `teacher_rest`: R_p
    as stored (a per-chunk cache keeps the k probabilities in float16 and R_p apart, in float32)."""
    p, q = as_float(teacher_top).exp(), as_float(student_top).exp()  # (m, k_t), (m, k_s)
    if teacher_rest is None:
        tail = (q.sum(-1) - p.sum(-1)).abs()  # |R_p - R_q|, each R = 1 - sum
    else:
        tail = (as_float(teacher_rest) - (1 - q.sum(-1))).abs()
    width = max(p.shape[1], q.shape[1])
    p = torch.nn.functional.pad(p, (0, width - p.shape[1]))
    q = torch.nn.functional.pad(q, (0, width - q.shape[1]))
    return (p - q).abs().sum(-1) + tail


def uld_sum(
    teacher_logits: torch.Tensor,
    student_logits: torch.Tensor,
    *,
    top_k: Optional[int] = 64,
    temperature: float = 1.0,
) -> torch.Tensor:
    """ULD_k summed over rows: teacher_logits (m, V_t) and student_logits (m, V_s) at the paired rows
    (`Chunks.teacher_pred_rows`, `student_pred_rows`). Gradient to the student's logits only."""
    with torch.no_grad():
        t_top = top_logprobs(teacher_logits, top_k, temperature=temperature)
    return uld_from((t_top, None), student_logits, top_k=top_k, temperature=temperature)


def uld_from(
    teacher: tuple[torch.Tensor, Optional[torch.Tensor]],
    student_logits: torch.Tensor,
    *,
    top_k: Optional[int] = 64,
    temperature: float = 1.0,
) -> torch.Tensor:
    """`uld_sum` from the teacher's side already reduced: (its `top_logprobs`, its rest R_p or None)."""
    s_top = top_logprobs(student_logits, top_k, temperature=temperature)
    return uld_rows(teacher[0], s_top, teacher[1]).sum()
