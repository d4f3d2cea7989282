"""Pure loss functions. Every function returns a **sum over valid tokens** (fp32); the caller
normalises once, by the global count of valid tokens of the optimiser step.

Conventions
- Softmax is always taken in fp32.
- Temperature: both distributions are softened by T and the divergence is multiplied by T^2, so
  that its gradient keeps the scale of the CE gradient as T changes (Hinton et al., 2015).
- `forward_kl` = KL(p_teacher || p_student) (mode-covering, the usual KD); `reverse_kl` =
  KL(p_student || p_teacher); `jsd` = beta*KL(p_t || m) + (1-beta)*KL(p_s || m), m = beta*p_t +
  (1-beta)*p_s.
- Top-k teachers: the teacher distribution is the softmax of its k largest logits (renormalised
  over those k tokens, probability 0 elsewhere); the student keeps its full softmax. With k equal to
  the vocabulary this is exactly the dense loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class TeacherLogits:
    """Teacher logits for a set of token rows: dense `(n, V)` or top-k `(n, k)` values + indices."""

    dense: Optional[torch.Tensor] = None  # (n, V)
    values: Optional[torch.Tensor] = None  # (n, k)
    indices: Optional[torch.Tensor] = None  # (n, k) int64
    rest: Optional[torch.Tensor] = None  # (n,) log sum of exp(logit) off the top k (-inf: none); None: unknown

    def top_k(self, k: Optional[int]) -> "TeacherLogits":
        if k is None:
            return self
        if self.dense is None:  # already top-k (sorted descending, as the cache stores them)
            if k >= self.values.shape[-1]:
                return self
            rest = None if self.rest is None else torch.logaddexp(
                self.rest.float(), torch.logsumexp(self.values[:, k:].float(), dim=-1))
            return TeacherLogits(values=self.values[:, :k], indices=self.indices[:, :k], rest=rest)
        if k >= self.dense.shape[-1]:
            return self
        z = self.dense.float()
        v, i = z.topk(k, dim=-1)
        rest = torch.logsumexp(z.scatter(-1, i, float("-inf")), dim=-1)  # (n,) the mass off the top k
        return TeacherLogits(values=v, indices=i, rest=rest)


def softcap(z: torch.Tensor, cap: Optional[float]) -> torch.Tensor:
    return z if cap is None else cap * torch.tanh(z / cap)


def ce_sum(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy summed over rows where `mask` is true. logits (n, V), targets (n,)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    nll = -logp.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)  # (n,)
    return torch.where(mask, nll, 0.0).sum()


def _teacher_logprobs(teacher: TeacherLogits, temperature: float) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """log p_t over the vocabulary (dense) or over the top-k support (with its indices)."""
    if teacher.dense is not None:
        return torch.log_softmax(teacher.dense.float() / temperature, dim=-1), None
    return torch.log_softmax(teacher.values.float() / temperature, dim=-1), teacher.indices


def kd_sum(student_logits: torch.Tensor, teacher: TeacherLogits, mask: torch.Tensor, *,
           temperature: float = 1.0, divergence: str = "forward_kl", jsd_beta: float = 0.5) -> torch.Tensor:
    """T^2 * D(teacher_T, student_T) summed over valid rows. student_logits (n, V)."""
    T = temperature
    logq = torch.log_softmax(student_logits.float() / T, dim=-1)  # (n, V)
    logp, idx = _teacher_logprobs(teacher, T)  # (n, V) or (n, k)
    if idx is not None:  # top-k: the teacher has zero mass off its support
        p = logp.exp()
        logq_s = logq.gather(-1, idx)
        if divergence == "forward_kl":
            per = (p * (logp - logq_s)).sum(-1)
        else:
            dense_logp = torch.full_like(logq, float("-inf")).scatter(-1, idx, logp)
            per = _dense_divergence(dense_logp, logq, divergence, jsd_beta)
    else:
        per = _dense_divergence(logp, logq, divergence, jsd_beta)
    return torch.where(mask, per, 0.0).sum() * T * T


def _xlogy_diff(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """sum p (log p - log q) with 0 * log 0 = 0 (p = exp(logp))."""
    p = logp.exp()
    return torch.where(p > 0, p * (logp - logq), torch.zeros_like(p)).sum(-1)


def _dense_divergence(logp: torch.Tensor, logq: torch.Tensor, divergence: str, beta: float) -> torch.Tensor:
    if divergence == "forward_kl":
        return _xlogy_diff(logp, logq)
    if divergence == "reverse_kl":
        return _xlogy_diff(logq, logp)
    if divergence == "jsd":
        logm = torch.logsumexp(torch.stack([logp + torch.log(torch.tensor(beta)),
                                            logq + torch.log(torch.tensor(1 - beta))]), dim=0)
        return beta * _xlogy_diff(logp, logm) + (1 - beta) * _xlogy_diff(logq, logm)
    raise ValueError(f"unknown divergence {divergence!r}")


def hidden_sum(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, *, loss: str = "mse",
               normalize_teacher: str = "none", eps: float = 1e-6) -> torch.Tensor:
    """Per-token hidden-state loss summed over valid rows. pred, target (n, d_teacher)."""
    pred, target = pred.float(), target.float()
    if normalize_teacher == "rms":
        target = target * torch.rsqrt(target.pow(2).mean(-1, keepdim=True) + eps)
    elif normalize_teacher != "none":
        raise ValueError(f"unknown normalisation {normalize_teacher!r}")
    if loss == "mse":
        per = (pred - target).pow(2).mean(-1)
    elif loss == "nmse":
        per = (pred - target).pow(2).sum(-1) / (target.pow(2).sum(-1) + eps)
    elif loss == "cosine":
        per = 1 - torch.nn.functional.cosine_similarity(pred, target, dim=-1, eps=eps)
    else:
        raise ValueError(f"unknown hidden loss {loss!r}")
    return torch.where(mask, per, 0.0).sum()
