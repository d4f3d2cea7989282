"""`relation` (projector-free, MiniLM-v2 style): per window, R_ij = cos(x_i, x_j) for the student layer
and for the (normalised) teacher layer; for each valid query position i the loss is
mean_{valid j <= i} (R^s_ij - R^t_ij)^2, summed over valid i. Causal rows: position i only ever
relates to what it can attend to. The diagonal (always 1) contributes 0. Bounded in [0, 4] per
token, whatever either model's width, so no projector is needed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hld.distill.hidden_losses.base import Dims, HiddenLoss


def relations(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Token-to-token cosine similarities per window. x (B, T, d) -> (B, T, T) fp32."""
    u = F.normalize(x.float(), dim=-1, eps=eps)
    return u @ u.transpose(1, 2)


def relation_sum(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum over valid query i of mean over valid keys j <= i of (R^s_ij - R^t_ij)^2.
    student (B, T, d_s), teacher (B, T, d_t), mask (B, T) bool."""
    T = student.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=student.device).tril()
    keys = causal[None] & mask[:, None, :] & mask[:, :, None]  # (B, T, T): valid query row, valid key column
    diff = (relations(student) - relations(teacher).detach()).pow(2)
    diff = torch.where(keys, diff, 0.0)
    per = diff.sum(-1) / keys.sum(-1).clamp_min(1)  # (B, T)
    return torch.where(mask, per, 0.0).sum()


class Relation(HiddenLoss):
    name = "relation"
    projector = False

    def cost_dims(self, *, d_student: int, d_teacher: int, seq_len: int) -> Dims:
        """The student's T x T Gram matrix trained (6*T*d_s) and the teacher's forward only (2*T*d_t)."""
        return ((seq_len, d_student), (seq_len, d_teacher / 3))

    def pair_sum(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return relation_sum(pred, target, mask)
