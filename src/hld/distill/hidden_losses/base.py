"""What a hidden loss is: its declarations and the sum it computes for one layer pair.

`HiddenObjective` (src/hld/distill/objectives.py) hands `pair_sum` the student state, projected to
teacher width when the loss declares `projector`, and the teacher target, normalised as
`objective.hidden.normalize_teacher` says when it declares `normalized_target` (else the raw
teacher state). Every loss returns a **sum over the valid positions** (fp32), which the objective
divides by the batch's target count, like `hld.distill.losses`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

Dims = tuple[tuple[float, float], ...]  # (a, b) pairs, 6*a*b FLOPs per token each (`flops.step_cost`)


class HiddenLoss(ABC):
    """One hidden loss. `name` is its `objective.hidden.loss` value."""

    name: ClassVar[str]
    projector: ClassVar[bool] = True  # the student state is mapped to teacher width by a trained Linear
    normalized_target: ClassVar[bool] = True  # False: the raw teacher state, whatever normalize_teacher says
    teacher_head: ClassVar[bool] = False  # reads the teacher's final norm and head (`build(lens=...)`)

    @classmethod
    def build(cls, *, lens: Any = None, lens_spec: Any = None) -> HiddenLoss:
        """The loss, given what it declares it needs (`lens`, `lens_spec`: `teacher_head` losses only)."""
        return cls()

    def cost_dims(self, *, d_student: int, d_teacher: int, seq_len: int) -> Dims:
        """FLOPs per token of one pair's loss matmuls, beyond the projector (the objective adds that)."""
        return ()

    @abstractmethod
    def pair_sum(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The loss summed over `mask`. pred (B, T, d) (d_t after a projector, else d_s), target (B, T, d_t),
        mask (B, T) bool."""


class RowLoss(HiddenLoss):
    """A loss per position of the projected student state against its target, summed over the valid ones."""

    @staticmethod
    @abstractmethod
    def rows(pred: torch.Tensor, target: torch.Tensor, eps: float) -> torch.Tensor:
        """The loss of each row, (n,) fp32. pred, target (n, d_t) fp32."""

    def row_sum(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
        """`rows` summed over the rows where `mask` holds. pred, target (n, d_t), mask (n,)."""
        per = self.rows(pred.float(), target.float(), eps)  # (n,)
        return torch.where(mask, per, 0.0).sum()

    def pair_sum(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        d = pred.shape[-1]
        return self.row_sum(pred.reshape(-1, d), target.reshape(-1, target.shape[-1]), mask.reshape(-1))
