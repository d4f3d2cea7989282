"""`cosine`: 1 - cos(P s, t) per position (the direction of the projected student state, not its size)."""

from __future__ import annotations

import torch

from hld.distill.hidden_losses.base import RowLoss


class Cosine(RowLoss):
    name = "cosine"

    @staticmethod
    def rows(pred: torch.Tensor, target: torch.Tensor, eps: float) -> torch.Tensor:
        return 1 - torch.nn.functional.cosine_similarity(pred, target, dim=-1, eps=eps)
