"""Forward KL(p_teacher || p_student): mode-covering, the usual KD (Hinton et al., 2015)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hld.distill.divergences.base import Divergence, xlogy_diff


@dataclass(frozen=True)
class ForwardKL(Divergence):
    name = "forward_kl"
    help = "KL(teacher||student), mode-covering: the usual KD"
    fused = True
    from_samples = True
    teacher_support_only = True

    def rows(self, logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
        return xlogy_diff(logp, logq)
