"""Trainable projectors from student width to teacher width, one per layer pair.

They live beside the student (in the optimiser and in checkpoints) and are dropped when the
student is exported: the exported model is an ordinary causal LM. A projector-free loss
(`relation`, `cka`: `HiddenLoss.projector` false) keeps the pairs and no weights (`linear=False`).
"""

from __future__ import annotations

import torch
from torch import nn


def pair_key(pair: tuple[int, int]) -> str:
    return f"s{pair[0]}_t{pair[1]}"


class Projectors(nn.Module):
    def __init__(
        self, pairs: list[tuple[int, int]], *, d_student: int, d_teacher: int, seed: int = 0, linear: bool = True
    ) -> None:
        super().__init__()
        self.pairs = list(pairs)
        self.d_student, self.d_teacher = d_student, d_teacher
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 7919)  # independent of the student's init stream
            self.proj = nn.ModuleDict(
                {pair_key(p): nn.Linear(d_student, d_teacher, bias=False) for p in (pairs if linear else [])}
            )

    @property
    def linear(self) -> bool:
        return len(self.proj) > 0

    def forward(self, pair: tuple[int, int], h: torch.Tensor) -> torch.Tensor:
        return self.proj[pair_key(pair)](h)

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
