"""`huber`: the mean over dimensions of the Huber (smooth-L1, beta = 1) error of the projected student
state, per position: quadratic for errors under 1, linear beyond. LLM hidden states carry a few
"massive activations" (Sun et al., arXiv 2402.17762: dimensions hundreds of times the others, the same
few in every token); under MSE those dimensions' errors dominate the loss and its gradient, under Huber
each dimension's gradient is bounded by 1/d. On a standardised target (`normalize_teacher`) beta = 1
is one standard deviation of the teacher's state."""

from __future__ import annotations

import torch

from hld.distill.hidden_losses.base import RowLoss

BETA = 1.0


class Huber(RowLoss):
    name = "huber"

    @staticmethod
    def rows(pred: torch.Tensor, target: torch.Tensor, eps: float) -> torch.Tensor:
        e = (pred - target).abs()
        return torch.where(e < BETA, 0.5 * e * e / BETA, e - 0.5 * BETA).mean(-1)
