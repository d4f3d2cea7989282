"""Trainable projectors from student width to teacher width, one per layer pair.

They live beside the student (in the optimiser and in checkpoints) and are dropped when the
student is exported: the exported model is an ordinary causal LM. A projector-free loss
(`relation`, `cka`: `HiddenLoss.projector` false) keeps the pairs and no weights (`linear=False`).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


def pair_key(pair: tuple[int, int]) -> str:
    return f"s{pair[0]}_t{pair[1]}"


class Projectors(nn.Module):
    """`identity=True`: the student's layers already live in the teacher's space (a student made of the
    teacher's blocks, `mapping: kept`): no weights; the objective normalises the student state as it
    normalises the teacher's (src/hld/distill/objectives.py). `basis`: a derived student whose residual
    stream is the teacher's in a narrower basis P (d_teacher, d_student; `hld.models.residual_width`: the kept
    channels or the principal directions) is mapped to the teacher's space by that fixed P, h = P s: not
    trained, not saved (it is the derivation's), the identity when the widths match."""

    def __init__(
        self,
        pairs: list[tuple[int, int]],
        *,
        d_student: int,
        d_teacher: int,
        seed: int = 0,
        linear: bool = True,
        identity: bool = False,
        basis: Optional[torch.Tensor] = None,
    ) -> None:
        super().__init__()
        if basis is not None and (not identity or tuple(basis.shape) != (d_teacher, d_student)):
            raise ValueError(f"a basis maps a kept student's {d_student} channels to {d_teacher}, not {basis.shape}")
        if identity and basis is None and d_student != d_teacher:
            raise ValueError(f"an identity projector needs equal widths, not {d_student} -> {d_teacher}")
        self.pairs = list(pairs)
        self.d_student, self.d_teacher = d_student, d_teacher
        self.identity = identity
        self.basis: Optional[torch.Tensor]
        self.register_buffer("basis", None if basis is None else basis.float(), persistent=False)
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
        if self.identity:
            return h if self.basis is None else F.linear(h, self.basis.to(h.device, h.dtype))  # (..., d_t)
        return self.proj[pair_key(pair)](h)

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
