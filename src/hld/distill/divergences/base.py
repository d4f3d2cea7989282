"""What a divergence is: D(p, q) per row over the last axis, from the teacher's log-probabilities `logp`
and the student's `logq` — over the vocabulary, or over the k+1 outcomes of a top-k teacher with its rest
bucket (hld.distill.losses) — plus what the rest of hld needs to know of it, declared, never asked by name.

A divergence's parameters are its dataclass fields, each with a range; `objective.divergence` names one
with them: `jsd` (its defaults) or `jsd(beta=0.3)`. Temperature (the T^2 factor), the ignore mask and the
sum over tokens are the caller's: a divergence is one row's number."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import torch


def param(default: float, help: str, *, lo: float, hi: float, closed: tuple[bool, bool] = (True, True)):
    """A divergence parameter: its default, its help and its range [lo, hi] (`closed`: which ends are in)."""
    return dataclasses.field(default=default, metadata={"help": help, "range": (lo, hi, *closed)})


@dataclass(frozen=True)
class Divergence:
    name: ClassVar[str]
    help: ClassVar[str]
    # the fused head computes this divergence's gradient by hand (hld.distill.chunked); others use autograd
    fused: ClassVar[bool] = False
    # sampled teacher ids (importance-weighted, hld.distill.signals.sampled) estimate it without bias
    from_samples: ClassVar[bool] = False
    # infinite wherever the student has mass the teacher lacks: refused with a renormalised top-k teacher
    needs_teacher_support: ClassVar[bool] = False
    # a sum over the teacher's support alone (outcomes of zero teacher mass add nothing): a renormalised
    # top-k teacher is then read on its k ids, without a (n, V) scatter
    teacher_support_only: ClassVar[bool] = False

    def rows(self, logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
        """D(p, q) per row (n,) from log-probabilities (n, K) in fp32; -inf entries are outcomes of zero
        probability, whose gradient must be zero, never nan."""
        raise NotImplementedError

    def spec(self) -> str:
        """How a config names this divergence with its parameters: `jsd(beta=0.3)`, or `forward_kl`."""
        values = [f"{f.name}={getattr(self, f.name):g}" for f in dataclasses.fields(self)]
        return f"{self.name}({','.join(values)})" if values else self.name


def xlogy_diff(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """sum p (log p - log q) per row with 0 * log 0 = 0 (p = exp(logp)); the masked entries get a zero,
    not a nan, gradient (both logs are replaced before the product)."""
    p = logp.exp()
    pos = p > 0
    diff = torch.where(pos, logp, 0.0) - torch.where(pos, logq, 0.0)
    return torch.where(pos, p * diff, 0.0).sum(-1)


def log_mixture(logp: torch.Tensor, logq: torch.Tensor, w: float) -> torch.Tensor:
    """log(w p + (1 - w) q) elementwise, 0 < w < 1; where neither has mass the logs are read as 0 (the
    mixture's term is then multiplied by a zero probability), so the gradient stays finite."""
    both0 = torch.isneginf(logp) & torch.isneginf(logq)  # log m is -inf there: its gradient would be nan
    lp, lq = torch.where(both0, 0.0, logp), torch.where(both0, 0.0, logq)
    return torch.logaddexp(lp + math.log(w), lq + math.log(1 - w))
