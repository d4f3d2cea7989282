"""Generalised Jensen-Shannon divergence JSD(beta) = beta KL(p || m) + (1 - beta) KL(q || m) with the
mixture m = beta p + (1 - beta) q (p the teacher, q the student; GKD, Agarwal et al. 2024). Bounded, and
finite whatever either distribution's support."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hld.distill.divergences.base import Divergence, log_mixture, param, xlogy_diff


@dataclass(frozen=True)
class Jsd(Divergence):
    name = "jsd"
    help = "JSD(beta) = beta KL(t||m) + (1-beta) KL(s||m), m = beta p_t + (1-beta) p_s"
    beta: float = param(0.5, "the teacher's weight in the mixture m", lo=0.0, hi=1.0, closed=(False, False))

    def rows(self, logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
        logm = log_mixture(logp, logq, self.beta)
        return self.beta * xlogy_diff(logp, logm) + (1 - self.beta) * xlogy_diff(logq, logm)
