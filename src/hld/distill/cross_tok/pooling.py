"""Hidden states pooled per aligned chunk (issue 34, item 3): one vector per chunk on each side, so a
teacher layer and a student layer with different token counts can be matched chunk by chunk through the
usual projector and hidden losses (hld.distill.hidden_losses: `RowLoss.row_sum` on the (m, d) rows).

- `last` (default): the state at the chunk's last token. On both sides that state has read exactly the
  text up to the chunk's end, text[:cb[c+1]], and nothing after it: the two states condition on the same
  information, as the same-tokenizer HLD's states at one position do. It is also the state the next-token
  prediction of the following chunk is made from (hld.distill.cross_tok.chunks), and it costs a gather.
- `mean`: the mean of the chunk's token states. Smoother when a side splits a word into many pieces, but
  its earlier tokens have read only part of the chunk's text, and how much depends on the tokenizer, so
  the two means average over different information.
Differentiable in the states (a gather, or an index_add divided by each chunk's length).
"""

from __future__ import annotations

import torch

from hld.distill.cross_tok.chunks import Chunks, token_rows

POOLINGS = ("last", "mean")


def pool_chunks(states: torch.Tensor, start: torch.Tensor, end: torch.Tensor, *, how: str = "last") -> torch.Tensor:
    """(m, d) one state per chunk [start, end) of the flat rows of `states` (N, d), in its dtype."""
    if how == "last":
        return states[end - 1]
    if how == "mean":
        rows, chunk = token_rows(start, end)
        total = states.new_zeros(len(start), states.shape[-1]).index_add(0, chunk, states[rows])
        return total / (end - start).unsqueeze(-1).to(states.dtype)
    raise ValueError(f"pooling {how!r} is not one of {POOLINGS}")


def pool_pair(
    teacher_states: torch.Tensor, student_states: torch.Tensor, chunks: Chunks, *, how: str = "last"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(teacher (m, d_t), student (m, d_s)) pooled over `chunks` (hld.distill.cross_tok.chunks.Chunks)
    from states of a batch, (B, T_t, d_t) and (B, T_s, d_s) or already flat."""
    t = teacher_states.reshape(-1, teacher_states.shape[-1])
    s = student_states.reshape(-1, student_states.shape[-1])
    return (
        pool_chunks(t, chunks.teacher_start, chunks.teacher_end, how=how),
        pool_chunks(s, chunks.student_start, chunks.student_end, how=how),
    )
