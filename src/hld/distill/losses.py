"""Pure loss functions. Every function returns a **sum over valid tokens** (fp32); the caller
normalises once, by the global count of valid tokens of the optimiser step.

Conventions
- Softmax is always taken in fp32.
- Temperature: both distributions are softened by T and the divergence is multiplied by T^2, so
  that its gradient keeps the scale of the CE gradient as T changes (Hinton et al., 2015).
- Divergences are registered objects (hld.distill.divergences: `forward_kl` = KL(p_teacher ||
  p_student), the usual KD; `reverse_kl`; `jsd(beta)`; ...), each D(p, q) per row over the outcomes.
- Top-k teachers (`TeacherLogits.values/indices`, k < V) keep the teacher's mass off its k ids as
  one extra outcome, "the rest" (`TeacherLogits.rest` = log sum_{j not in top-k} exp(z_j) of the
  teacher's raw logits, after softcap, before temperature). Both distributions are coarsened to
  these k+1 outcomes: the teacher is softmax([v_1..v_k, rest] / T) -- the rest is treated as one
  logit, so at T != 1 its tempered mass is (sum_rest e^z)^(1/T), not sum_rest e^(z/T) (which the
  cache cannot know); exact at T = 1 and at k = V -- and the student is its full softmax(s / T)
  with its mass off the k ids summed into one outcome, log q_rest = logsumexp(s/T over the ids not
  in the top-k) - logsumexp(s/T), an exact masked logsumexp (1 - sum q_k by log1p(-s) would cancel
  to 0 or below whenever the student puts nearly all its mass on the k ids). Forward KL, reverse
  KL and JSD are then finite and exact on that coarsening (a data-processing lower bound of the
  dense divergence) and equal the dense loss at k = V (rest = -inf). `top_k_rest="renormalize"`
  is the older choice: the teacher is the softmax of its k logits alone (zero mass elsewhere) and
  the student keeps its full softmax; reverse KL is then infinite, and the teacher's rest is lost.
- Sampled teachers (`TeacherLogits.weights`, distill/sampled.py): distinct ids drawn from the teacher
  with importance weights w summing to 1; the loss is the estimate sum_i w_i (log w_i - log q_i) of
  forward KL (its gradient T (q - w) has expectation T (q - p) at tau = 1); other divergences refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from hld.distill.divergences.base import Divergence
from hld.distill.divergences.registry import parse as parse_divergence
from hld.distill.sampled import estimate_kl_rows


@dataclass
class TeacherLogits:
    """Teacher logits for a set of token rows: dense `(n, V)` or top-k `(n, k)` values + indices
    (sorted descending) and the log-mass of the rest of the vocabulary."""

    dense: Optional[torch.Tensor] = None  # (n, V)
    values: Optional[torch.Tensor] = None  # (n, k)
    indices: Optional[torch.Tensor] = None  # (n, k) int64
    # (n,) float32, log of sum_{j not in top-k} exp(z_j) over the teacher's raw logits z (after softcap,
    # before temperature); -inf when the top-k covers the vocabulary; None = unknown
    rest: Optional[torch.Tensor] = None
    # (n, slots) float32, a sampled signal (distill/sampled.py): the importance weights of the distinct ids
    # drawn (`indices`), summing to 1 per row (0 in padding slots); values and rest are then None
    weights: Optional[torch.Tensor] = None

    def top_k(self, k: Optional[int]) -> TeacherLogits:
        if k is None or self.weights is not None:  # a sampled signal has no top-k (refused at load)
            return self
        if self.dense is None:  # already top-k (sorted descending, as the cache stores them)
            if k >= self.values.shape[-1]:
                return self
            rest = None
            if self.rest is not None:  # the dropped values join the rest
                rest = torch.logaddexp(self.rest.float(), self.values[:, k:].float().logsumexp(-1))
            return TeacherLogits(values=self.values[:, :k], indices=self.indices[:, :k], rest=rest)
        if k >= self.dense.shape[-1]:
            return self
        v, i = self.dense.topk(k, dim=-1)
        return TeacherLogits(values=v, indices=i, rest=logsumexp_outside(self.dense, i))


def logsumexp_outside(z: torch.Tensor, idx: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """log sum_{j not in idx[r]} exp(scale * z[r, j]) per row, (n,) fp32; -inf where idx covers the row.
    One (n, V) fp32 temporary; differentiable in z with a finite (zero) gradient on covered rows,
    where torch.logsumexp's backward gives nan. Without a gradient to build (a teacher's logits, the
    cache) it runs 4 rows at a time in one small buffer: 7x faster on a CPU than the (n, V) temporaries."""
    if not (z.requires_grad and torch.is_grad_enabled()):
        return _logsumexp_outside_rows(z, idx, scale)
    x = z.float() * scale if scale != 1.0 else z.float().clone()
    x.scatter_(-1, idx, float("-inf"))  # (n, V)
    xmax = x.amax(-1, keepdim=True).detach()  # (n, 1)
    xmax = torch.where(torch.isfinite(xmax), xmax, 0.0)
    total = (x - xmax).exp().sum(-1)  # (n,)
    safe = torch.where(total > 0, total, 1.0)
    return torch.where(total > 0, safe.log() + xmax.squeeze(-1), float("-inf"))


ROWS = 4  # rows per elementwise block on a CPU: a few (ROWS, V) fp32 buffers stay in its L2/L3


def row_block(n: int, device: torch.device) -> int:
    """Rows per elementwise block over (n, V) logits: ROWS on a CPU (the block stays in cache), all n
    elsewhere (on a GPU a launch per op per block would cost more than the memory traffic saved)."""
    return min(ROWS, n) if device.type == "cpu" else n


def _logsumexp_outside_rows(z: torch.Tensor, idx: torch.Tensor, scale: float) -> torch.Tensor:
    n, V = z.shape
    out = torch.empty(n, dtype=torch.float32, device=z.device)
    rows = row_block(n, z.device)
    buf = torch.empty(min(rows, n), V, dtype=torch.float32, device=z.device)
    for i in range(0, n, rows):
        sl = slice(i, min(i + rows, n))
        b = buf[: sl.stop - i]
        torch.mul(z[sl], scale, out=b) if scale != 1.0 else b.copy_(z[sl])
        b.scatter_(-1, idx[sl], float("-inf"))
        out[sl] = torch.logsumexp(b, -1)  # -inf where idx covers the row
    return out


def softcap(z: torch.Tensor, cap: Optional[float]) -> torch.Tensor:
    return z if cap is None else cap * torch.tanh(z / cap)


def ce_sum(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy summed over rows where `mask` is true. logits (n, V), targets (n,)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    nll = -logp.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)  # (n,)
    return torch.where(mask, nll, 0.0).sum()


def teacher_logprobs(teacher: TeacherLogits, temperature: float, top_k_rest: str) -> torch.Tensor:
    """log p_t: over the vocabulary (dense, (n, V)); over the k ids and the rest (bucket, (n, k+1), the
    rest last); or over the k ids alone (renormalize, (n, k))."""
    if teacher.dense is not None:
        return torch.log_softmax(teacher.dense.float() / temperature, dim=-1)
    v = teacher.values.float()
    if top_k_rest == "renormalize":
        return torch.log_softmax(v / temperature, dim=-1)
    if top_k_rest != "bucket":
        raise ValueError(f"unknown top_k_rest {top_k_rest!r} (bucket or renormalize)")
    if teacher.rest is None:
        raise ValueError(
            "top_k_rest='bucket' needs the teacher's rest mass (TeacherLogits.rest: log of the sum "
            "of exp(logits) off the top-k), and this top-k teacher has none; build the signal with "
            "it (TeacherLogits.top_k on dense logits fills it) or use top_k_rest='renormalize'"
        )
    return torch.log_softmax(torch.cat([v, teacher.rest.float()[:, None]], -1) / temperature, dim=-1)


def student_bucket_logprobs(logq: torch.Tensor, s_over_T: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The student's tempered log-probs coarsened to the k ids + the rest, (n, k+1), from its logits
    s/T (n, V) and logq = log_softmax(s/T)."""
    rest = logsumexp_outside(s_over_T, idx)[:, None] - torch.logsumexp(s_over_T, -1, keepdim=True)  # (n, 1)
    return torch.cat([logq.gather(-1, idx), rest], -1)


def kd_sum(
    student_logits: torch.Tensor,
    teacher: TeacherLogits,
    mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    divergence: Divergence | str = "forward_kl",
    top_k_rest: str = "bucket",
) -> torch.Tensor:
    """T^2 * D(teacher_T, student_T) summed over valid rows. student_logits (n, V); `divergence` a
    registered one (hld.distill.divergences) or its spec (`jsd(beta=0.3)`)."""
    T = temperature
    div = parse_divergence(divergence) if isinstance(divergence, str) else divergence
    s = student_logits.float() / T  # (n, V)
    logq = torch.log_softmax(s, dim=-1)  # (n, V)
    if teacher.weights is not None:  # sampled: the estimate sum_i w_i (log w_i - log q_i) of forward KL
        if not div.from_samples:
            raise ValueError(f"a sampled teacher signal estimates forward_kl only, not {div.spec()!r}")
        per = estimate_kl_rows(logq, teacher.indices, teacher.weights)
        return torch.where(mask, per, 0.0).sum() * T * T
    logp = teacher_logprobs(teacher, T, top_k_rest)  # (n, V), (n, k+1) or (n, k)
    idx = teacher.indices
    if teacher.dense is not None:
        per = div.rows(logp, logq)
    elif top_k_rest == "bucket":
        per = div.rows(logp, student_bucket_logprobs(logq, s, idx))
    elif div.teacher_support_only:  # renormalize: the teacher has no mass off its k ids, so read them alone
        per = div.rows(logp, logq.gather(-1, idx))
    else:
        dense_logp = torch.full_like(logq, float("-inf")).scatter(-1, idx, logp)
        per = div.rows(dense_logp, logq)
    return torch.where(mask, per, 0.0).sum() * T * T
