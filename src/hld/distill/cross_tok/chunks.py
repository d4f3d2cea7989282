"""An alignment's chunks as row indices into a batch of windows, and the rows that pair up.

`hld.data.align.Alignment` gives, per text, chunk c = teacher tokens [tb[c], tb[c+1]) and student tokens
[sb[c], sb[c+1]), both spelling text[cb[c]:cb[c+1]]. A batch lays B windows out as (B, T_teacher) and
(B, T_student) rows; `Chunks` holds every chunk of every window as flat indices into the B*T rows of each
side (window b's token k is row b*T + k), so the losses gather rows from flattened tensors.

Which positions pair up (the same for ULD, GOLD and ALM): a chunk c >= 1 of a window is *predicted* by
the last token of chunk c-1 on each side, teacher row tb[c]-1 and student row sb[c]-1. Both rows have
read exactly the same text, text[:cb[c]], and both next-token distributions are over the first token of
the continuation that chunk c starts; their tokens differ, the context does not. Chunk 0 of a window
(the BOS pair under the window protocol) has nothing before it and is predicted by no row. Pairing by
index (ULD's reference code compares the i-th student and i-th teacher positions) would compare
distributions conditioned on different text as soon as one side splits a word the other does not.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from hld.data.align import Alignment


@dataclass(frozen=True)
class Chunks:
    """m chunks of a batch, each as [start, end) rows on each side (int64 (m,) tensors)."""

    teacher_start: torch.Tensor  # (m,) flat teacher row of the chunk's first token
    teacher_end: torch.Tensor  # (m,) one past its last
    student_start: torch.Tensor  # (m,)
    student_end: torch.Tensor  # (m,)
    first: torch.Tensor  # (m,) bool: chunk 0 of its window (no row predicts it)

    @classmethod
    def from_alignments(
        cls,
        alignments: Sequence[Alignment],
        *,
        teacher_len: int,
        student_len: int,
        device: Optional[torch.device] = None,
    ) -> Chunks:
        """The chunks of B windows, window b aligned as `alignments[b]`, laid out as (B, teacher_len)
        and (B, student_len) rows (tokens past an alignment's own are padding, in no chunk)."""
        parts: list[list[np.ndarray]] = [[], [], [], [], []]
        for b, al in enumerate(alignments):
            tb, sb = al.teacher_bounds.astype(np.int64), al.student_bounds.astype(np.int64)
            if tb[-1] > teacher_len or sb[-1] > student_len:
                raise ValueError(
                    f"window {b} has {tb[-1]} teacher / {sb[-1]} student tokens, more than the rows "
                    f"({teacher_len} / {student_len})"
                )
            n = len(tb) - 1
            parts[0].append(tb[:-1] + b * teacher_len)
            parts[1].append(tb[1:] + b * teacher_len)
            parts[2].append(sb[:-1] + b * student_len)
            parts[3].append(sb[1:] + b * student_len)
            parts[4].append(np.arange(n) == 0)
        cat = [np.concatenate(p) if p else np.zeros(0, np.int64) for p in parts]
        ts, te, ss, se = (torch.as_tensor(a, dtype=torch.int64, device=device) for a in cat[:4])
        return cls(ts, te, ss, se, first=torch.as_tensor(cat[4].astype(bool), device=device))

    def __len__(self) -> int:
        return int(self.teacher_start.shape[0])

    def select(self, keep: torch.Tensor | slice) -> Chunks:
        """The chunks where `keep` (m,) bool holds, or those of the slice `keep`."""
        return Chunks(
            self.teacher_start[keep],
            self.teacher_end[keep],
            self.student_start[keep],
            self.student_end[keep],
            self.first[keep],
        )

    def predicted(self) -> Chunks:
        """The chunks some row predicts on both sides (all but each window's first)."""
        return self.select(~self.first)

    @property
    def teacher_pred_rows(self) -> torch.Tensor:
        """(m,) the teacher row predicting each chunk's first token (the last row of the chunk before)."""
        return self.teacher_start - 1

    @property
    def student_pred_rows(self) -> torch.Tensor:
        return self.student_start - 1

    @property
    def one_to_one(self) -> torch.Tensor:
        """(m,) bool: one token on each side (then both tokens spell the same text)."""
        return (self.teacher_end - self.teacher_start == 1) & (self.student_end - self.student_start == 1)


def token_rows(start: torch.Tensor, end: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, chunk of each row) of every token in chunks [start, end): all of chunk 0's rows, then all
    of chunk 1's, ... (int64, both (sum of lengths,))."""
    lengths = end - start
    chunk = torch.repeat_interleave(torch.arange(len(start), device=start.device), lengths)
    offset = torch.arange(len(chunk), device=start.device) - torch.repeat_interleave(
        torch.cumsum(lengths, 0) - lengths, lengths
    )
    return start[chunk] + offset, chunk


def as_float(x: torch.Tensor) -> torch.Tensor:
    """x in fp32 for the arithmetic of a loss (bf16/fp16 logits widened), or kept in fp64 (the tests'
    float64 gradient checks)."""
    return x if x.dtype == torch.float64 else x.float()
