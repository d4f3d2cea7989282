"""`mse`: the mean over dimensions of the squared error of the projected student state, per position."""

from __future__ import annotations

import torch

from hld.distill.hidden_losses.base import RowLoss


class Mse(RowLoss):
    name = "mse"

    @staticmethod
    def rows(pred: torch.Tensor, target: torch.Tensor, eps: float) -> torch.Tensor:
        return (pred - target).pow(2).mean(-1)
