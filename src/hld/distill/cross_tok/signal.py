"""The teacher's side of the cross-tokenizer losses, per predicted chunk: what each loss reads of the teacher,
from an online teacher's logits (`OnlineChunks`) or from a per-chunk teacher cache (`CachedChunks`, filled by
hld.cache.chunks). The objectives (hld.distill.cross_tok.objectives) ask either through the same calls, so
the loss code is one.

What a loss reads of a predicted chunk (hld.distill.cross_tok.chunks: chunk c, predicted at the last row of
chunk c-1 on each side):
- `alm`: the teacher's log-likelihood of the chunk's tokens (`logliks`, T = 1).
- `uld`: the teacher's k largest log-probabilities of softmax(z / T) at its predicting row, descending, and
  its rest R = 1 - their mass (`uld`); online R is None (`uld_rows` reads 1 - the sum, as ever).
- `gold`: at the chunks of one token a side (`Chunks.one_to_one`) the teacher's log-probabilities over the
  shared outcomes (`shared_logprobs`: the shared ids and, with `bucket`, the mass off them), online all of
  them (n or n + 1 columns), cached their k largest as a `TopK` with the log of the mass off those k; at the
  other chunks the ULD values above (`gold`).
- the hidden objective: the teacher's states pooled per chunk, every chunk of a window (`pooled`).

A cache stores exactly these (hld.cache.chunks), computed by `OnlineChunks` at build time: what a cached run
reads is what the online run computes, up to the storage's rounding (docs/cache-format.md, "Per-chunk caches").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from hld.distill.cross_tok.alm import chunk_logliks
from hld.distill.cross_tok.chunks import Chunks, token_rows
from hld.distill.cross_tok.gold import teacher_gold
from hld.distill.cross_tok.pooling import pool_chunks
from hld.distill.cross_tok.uld import top_logprobs
from hld.distill.cross_tok.vocab import SharedVocab
from hld.distill.signals.base import TeacherSignals
from hld.distill.signals.topk import TopK

UldTeacher = tuple[torch.Tensor, Optional[torch.Tensor]]  # (top log-probs (m, k) descending, rest (m,) or None)
GoldExact = torch.Tensor | TopK  # (m1, n(+1)) log-probs over the shared outcomes, or their top-k


@dataclass(frozen=True)
class ChunkLossSpec:
    """What the teacher's side of a cross-tokenizer loss depends on (and a per-chunk cache's identity)."""

    loss: str  # uld | alm | gold
    uld_top_k: Optional[int] = 64
    temperature: float = 1.0
    gold_rest: str = "bucket"
    vocab: Optional[SharedVocab] = None


class OnlineChunks:
    """The per-chunk teacher signal of an online teacher: its logits (`OnlineLogits.at_rows`) at the rows a
    loss reads, computed when asked, a block of chunks at a time."""

    def __init__(self, source, teacher_ids: torch.Tensor, *, block_rows: int = 256) -> None:
        self.source, self.teacher_ids, self.block_rows = source, teacher_ids, block_rows

    @torch.no_grad()
    def logliks(self, chunks: Chunks) -> torch.Tensor:
        """(m,) the teacher's log-likelihood of each chunk, its head run at the rows [start - 1, end - 1) that
        predict the chunk's tokens, `block_rows` rows at a time."""
        rows, _ = token_rows(chunks.teacher_start - 1, chunks.teacher_end - 1)
        ids = self.teacher_ids.reshape(-1).to(rows.device)
        parts = []
        for i in range(0, len(rows), self.block_rows):
            rb = rows[i : i + self.block_rows]
            zt = self.source.at_rows(rb)  # (b, V_t)
            parts.append(zt.gather(-1, ids[rb + 1][:, None]).squeeze(-1) - torch.logsumexp(zt, -1))
        lp = torch.cat(parts) if parts else torch.zeros(0, device=rows.device)
        tok = lp.new_zeros(ids.numel())  # (B*T_t,): token k's log-prob at k
        tok[rows + 1] = lp
        return chunk_logliks(tok, chunks.teacher_start, chunks.teacher_end)

    @torch.no_grad()
    def uld(self, part: Chunks, sl: slice, spec: ChunkLossSpec) -> UldTeacher:
        zt = self.source.at_rows(part.teacher_pred_rows)  # (m, V_t)
        return top_logprobs(zt, spec.uld_top_k, temperature=spec.temperature), None

    @torch.no_grad()
    def gold(self, part: Chunks, sl: slice, spec: ChunkLossSpec) -> tuple[GoldExact, UldTeacher]:
        """(the one-token chunks' shared log-probs, the other chunks' ULD values), each in chunk order."""
        assert spec.vocab is not None
        zt = self.source.at_rows(part.teacher_pred_rows)  # (m, V_t)
        one = part.one_to_one if len(spec.vocab) else torch.zeros_like(part.first)
        return teacher_gold(
            zt, one, spec.vocab, temperature=spec.temperature, rest=spec.gold_rest, uld_top_k=spec.uld_top_k
        )


@dataclass
class CachedChunks:
    """A batch's per-chunk teacher signal read from a per-chunk cache: rows in the batch's chunk order (its
    windows in batch order, each window's predicted chunks in order; `pooled` every chunk)."""

    loglik: Optional[torch.Tensor] = None  # (M,) float32: alm
    uld_top: Optional[torch.Tensor] = None  # (M_uld, k) float32 log-probs (of float16 probabilities)
    uld_rest: Optional[torch.Tensor] = None  # (M_uld,) float32
    gold_top: Optional[TopK] = None  # (M_one, k) over the shared outcomes: values log-probs, rest log of the rest
    pooled: Optional[dict[int, torch.Tensor]] = None  # layer -> (M_all, d) bfloat16
    one_before: Optional[torch.Tensor] = None  # (M + 1,) gold: the one-token chunks among the first i (`bind`)

    def logliks(self, chunks: Chunks) -> torch.Tensor:
        assert self.loglik is not None
        return self.loglik

    def uld(self, part: Chunks, sl: slice, spec: ChunkLossSpec) -> UldTeacher:
        assert self.uld_top is not None and self.uld_rest is not None
        return self.uld_top[sl], self.uld_rest[sl]

    def gold(self, part: Chunks, sl: slice, spec: ChunkLossSpec) -> tuple[GoldExact, UldTeacher]:
        assert self.gold_top is not None and self.uld_top is not None and self.uld_rest is not None
        if self.one_before is None:
            raise ValueError("CachedChunks.bind(chunks) first: gold's rows are found by the batch's chunks")
        a, b = int(self.one_before[sl.start]), int(self.one_before[sl.stop])  # one-token chunks before
        return self.gold_top.rows(slice(a, b)), (
            self.uld_top[sl.start - a : sl.stop - b],
            self.uld_rest[sl.start - a : sl.stop - b],
        )

    def bind(self, chunks: Chunks) -> CachedChunks:
        """These signals for the batch's predicted `chunks` (gold: where its one-token chunks lie), the
        counts checked against what the cache holds for the batch's windows."""
        one = chunks.one_to_one.cpu()
        n = len(chunks)
        held = {
            "loglik": (self.loglik, n),
            "uld": (self.uld_top, n if self.gold_top is None else n - int(one.sum())),
            "gold": (None if self.gold_top is None else self.gold_top.values, int(one.sum())),
        }
        for what, (x, want) in held.items():
            if x is not None and x.shape[0] != want:
                raise ValueError(f"the cache holds {x.shape[0]} {what} rows for this batch, its chunks need {want}")
        before = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(one.long(), 0)])
        return CachedChunks(self.loglik, self.uld_top, self.uld_rest, self.gold_top, self.pooled, before)

    def to(self, device: torch.device) -> CachedChunks:
        def mv(x):
            return None if x is None else x.to(device)

        return CachedChunks(
            loglik=mv(self.loglik),
            uld_top=mv(self.uld_top),
            uld_rest=mv(self.uld_rest),
            gold_top=mv(self.gold_top),
            pooled=None if self.pooled is None else {k: v.to(device) for k, v in self.pooled.items()},
            one_before=self.one_before,
        )


@dataclass
class ChunkSignals(TeacherSignals):
    """`TeacherSignals` of a per-chunk cache: its values per chunk (`chunks`), no states per token, no logits."""

    chunks: Optional[CachedChunks] = None

    def to(self, device: torch.device) -> ChunkSignals:
        return ChunkSignals(chunks=None if self.chunks is None else self.chunks.to(device))


def chunk_source(
    teacher: Optional[TeacherSignals], teacher_ids: torch.Tensor, chunks: Chunks, *, block_rows: int
) -> OnlineChunks | CachedChunks:
    """The per-chunk signal of a batch's teacher signals for its predicted `chunks` (on the host): a cache's
    own, or an online teacher's logits."""
    if isinstance(teacher, ChunkSignals) and teacher.chunks is not None:
        return teacher.chunks.bind(chunks)
    source = teacher.source if teacher is not None else None
    if source is None or not hasattr(source, "at_rows"):
        raise ValueError("a cross-tokenizer logit loss reads the online teacher's logits (OnlineLogits)")
    return OnlineChunks(source, teacher_ids, block_rows=block_rows)


def pooled_teacher(teacher: TeacherSignals, layer: int, chunks: Chunks, *, how: str) -> torch.Tensor:
    """(M_all, d_t) the teacher's layer `layer` pooled over every chunk of the batch (`chunks`, all of them)."""
    if isinstance(teacher, ChunkSignals):
        pooled = (teacher.chunks.pooled if teacher.chunks is not None else None) or {}
        if layer not in pooled or pooled[layer].shape[0] != len(chunks):
            raise ValueError(f"the per-chunk cache holds no pooled layer {layer} for this batch's chunks")
        return pooled[layer]
    h = teacher.hidden[layer]
    return pool_chunks(h.reshape(-1, h.shape[-1]), chunks.teacher_start, chunks.teacher_end, how=how)
