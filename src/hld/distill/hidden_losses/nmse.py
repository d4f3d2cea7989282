"""`nmse`: ||P s - t||^2 / (||t||^2 + eps) per position, the squared error relative to the target's size."""

from __future__ import annotations

import torch

from hld.distill.hidden_losses.base import RowLoss


class Nmse(RowLoss):
    name = "nmse"

    @staticmethod
    def rows(pred: torch.Tensor, target: torch.Tensor, eps: float) -> torch.Tensor:
        return (pred - target).pow(2).sum(-1) / (target.pow(2).sum(-1) + eps)
