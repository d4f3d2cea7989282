"""Pure loss functions. Every function returns a **sum over valid tokens** (fp32); the caller
normalises once, by the global count of valid tokens of the optimiser step.

Conventions
- Softmax is always taken in fp32.
- Temperature: both distributions are softened by T and the divergence is multiplied by T^2, so
  that its gradient keeps the scale of the CE gradient as T changes (Hinton et al., 2015).
- Each teacher-signal kind computes its own rows of the divergence (`TeacherLogits.kd_rows`);
  `kd_sum` never asks which kind it holds.
- Divergences are registered objects (hld.distill.divergences: `forward_kl` = KL(p_teacher ||
  p_student), the usual KD; `reverse_kl`; `jsd(beta)`; ...), each D(p, q) per row over the outcomes.
- Top-k teachers (hld.distill.signals.topk, k < V) keep the teacher's mass off its k ids as
  one extra outcome, "the rest" (`TopK.rest` = log sum_{j not in top-k} exp(z_j) of the
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
- Sampled teachers (hld.distill.signals.sampled): distinct ids drawn from the teacher
  with importance weights w summing to 1; the loss is the estimate sum_i w_i (log w_i - log q_i) of
  forward KL (its gradient T (q - w) has expectation T (q - p) at tau = 1); other divergences refused.
"""

from __future__ import annotations

from typing import Optional

import torch

from hld.distill.divergences.base import Divergence
from hld.distill.divergences.registry import parse as parse_divergence
from hld.distill.signals.base import TeacherLogits


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
    return max(1, min(ROWS, n) if device.type == "cpu" else n)  # >= 1: a loop over no rows steps by 1


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
    per = teacher.kd_rows(s, logq, T, div, top_k_rest)
    return torch.where(mask, per, 0.0).sum() * T * T
