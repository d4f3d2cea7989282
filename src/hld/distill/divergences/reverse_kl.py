"""Reverse KL(p_student || p_teacher): mode-seeking (MiniLLM, Gu et al. 2024)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hld.distill.divergences.base import Divergence, xlogy_diff


@dataclass(frozen=True)
class ReverseKL(Divergence):
    name = "reverse_kl"
    help = "KL(student||teacher), mode-seeking"
    needs_teacher_support = True

    def rows(self, logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
        return xlogy_diff(logq, logp)
