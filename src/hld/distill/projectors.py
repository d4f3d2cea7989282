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
    """`identity=True`: the student's layers already live in the teacher's space (a student made of the
    teacher's blocks, `mapping: kept`): no weights; the objective normalises the student state as it
    normalises the teacher's (src/hld/distill/objectives.py)."""

    def __init__(
        self,
        pairs: list[tuple[int, int]],
        *,
        d_student: int,
        d_teacher: int,
        seed: int = 0,
        linear: bool = True,
        identity: bool = False,
    ) -> None:
        super().__init__()
        if identity and d_student != d_teacher:
            raise ValueError(f"an identity projector needs equal widths, not {d_student} -> {d_teacher}")
        self.pairs = list(pairs)
        self.d_student, self.d_teacher = d_student, d_teacher
        self.identity = identity
        linear = linear and not identity
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 7919)  # independent of the student's init stream
            self.proj = nn.ModuleDict(
                {pair_key(p): nn.Linear(d_student, d_teacher, bias=False) for p in (pairs if linear else [])}
            )

    @property
    def linear(self) -> bool:
        return len(self.proj) > 0

    @property
    def maps(self) -> bool:
        """The student state is put in the teacher's space before the loss (a trained Linear or the identity)."""
        return self.linear or self.identity

    def forward(self, pair: tuple[int, int], h: torch.Tensor) -> torch.Tensor:
        return h if self.identity else self.proj[pair_key(pair)](h)

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
