"""Skew KL (DistiLLM, Ko et al. 2024, arXiv 2402.03898): KL(p || alpha p + (1 - alpha) q), p the
teacher, q the student. Mixing a little of the teacher into the student keeps the divergence and its
gradient bounded (by log 1/alpha) where the student puts almost no mass on a teacher token, the case that
makes forward KL's gradient large and noisy early in training; alpha -> 0 is forward KL."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hld.distill.divergences.base import Divergence, log_mixture, param, xlogy_diff


@dataclass(frozen=True)
class SkewKL(Divergence):
    name = "skew_kl"
    help = "KL(t||alpha p_t + (1-alpha) p_s), bounded by log(1/alpha); alpha -> 0 is forward_kl"
    teacher_support_only = True
    alpha: float = param(0.1, "the teacher's weight in the skewed student", lo=0.0, hi=1.0, closed=(False, False))

    def rows(self, logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
        return xlogy_diff(logp, log_mixture(logp, logq, self.alpha))
