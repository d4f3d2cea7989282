"""`cka` (projector-free; after Zhou et al., *Rethinking Centered Kernel Alignment in Knowledge
Distillation*, IJCAI 2024): per layer pair, over the n valid positions of the batch, X = the student
states (n, d_s) and Y = the teacher target (n, d_t), both centred over the rows;

    CKA = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)    (linear CKA, in [0, 1])

and the pair's sum is (1 - CKA) * n, so that divided by the batch's target count, as the objective
divides every loss, it is 1 - CKA (times the share of targets the hidden mask keeps, as for every
hidden loss). CKA is a statistic of the whole batch, not a sum of per-position terms: micro-batches
(and ranks) each take their own, so unlike the other losses its gradient depends on how a step is
split (docs/decisions.md). Invariant to an orthogonal rotation and an isotropic scaling of either
side, so no projector is needed. Fewer than 2 valid rows, or no spread on either side (all rows
equal): nothing to align, the pair's sum is 0 (no NaN, zero gradient).
"""

from __future__ import annotations

import torch

from hld.distill.hidden_losses.base import Dims, HiddenLoss


def _centred(x: torch.Tensor, mask: torch.Tensor, n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x (N, d) fp32 centred over its valid rows and scaled to ||x||_F = 1 (CKA cannot tell), its masked
    rows exactly 0 whatever they held (inf included); whether it has any spread). mask (N,), n = mask.sum()."""
    x = torch.where(mask[:, None], x.float(), 0.0)
    x = torch.where(mask[:, None], x - x.sum(0) / n.clamp_min(1), 0.0)
    sq = x.pow(2).sum()
    return x * torch.where(sq > 0, sq, 1.0).rsqrt(), sq > 0


def cka(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(linear CKA over the valid rows, n_valid); CKA is 1 where it is undefined (n < 2, no spread), so
    that 1 - CKA is 0 there. x (N, d_s), y (N, d_t), mask (N,) bool."""
    n = mask.sum().float()
    xc, x_spread = _centred(x, mask, n)  # (N, d_s)
    with torch.no_grad():
        yc, y_spread = _centred(y.detach(), mask, n)  # (N, d_t)
        ny = (yc.T @ yc).norm()  # ||Y^T Y||_F
    cross = (yc.T @ xc).pow(2).sum()  # ||Y^T X||_F^2
    nx2 = (xc.T @ xc).pow(2).sum()  # ||X^T X||_F^2 >= ||X||_F^4 / d_s = 1 / d_s once X has spread
    ok = (n >= 2) & x_spread & y_spread
    den = torch.where(ok, nx2, 1.0).sqrt() * torch.where(ok, ny, 1.0)  # no sqrt(0): its gradient is inf
    return torch.where(ok, cross / den, 1.0), n


class Cka(HiddenLoss):
    name = "cka"
    projector = False

    def cost_dims(self, *, d_student: int, d_teacher: int, seq_len: int) -> Dims:
        """Per token: Y^T X forward and its input gradient (4*d_s*d_t: Y takes none), the student's
        Gram X^T X trained (6*d_s^2), the teacher's Y^T Y forward only (2*d_t^2). The centring and the
        norms are O(d) per token and not counted."""
        return ((d_student, d_teacher * 2 / 3), (d_student, d_student), (d_teacher, d_teacher / 3))

    def pair_sum(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        value, n = cka(pred.reshape(-1, pred.shape[-1]), target.reshape(-1, target.shape[-1]), mask.reshape(-1))
        return (1 - value) * n
