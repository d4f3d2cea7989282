r"""The training objectives for a teacher with another tokenizer (issue 34, items 2, 3 and 8): the protocol of
hld.distill.objectives (`needs`, `student_layers`, `uses_head`, `n_pairs`, `cost_dims`, `set_progress`,
`(batch, student, teacher) -> (loss sum, batch.n_targets, metric sums)`) on a batch of paired windows
(`hld.data.packing.make_paired_batch`: the student's rows `input_ids`, the teacher's rows of the same text
`teacher_ids`, each window's `Alignment`), so `Plan` and the training loop serve them unchanged.

`CrossTokLogitObjective`: (1 - alpha) * CE + alpha * XT, two sums. CE is the student's next-token
cross-entropy over `batch.mask` (its own tokens, nothing of the teacher). XT is a cross-tokenizer loss
summed over the batch's *predicted* chunks (hld.distill.cross_tok.chunks: chunk c is predicted by the last
row of chunk c-1 on each side, rows that have both read text[:cb[c]]; a window's first chunk, the BOS
pair, by none):
- `uld`: ULD_k between the two next-token distributions at those rows, softmax(z / T) with
  T = `objective.temperature`, no T^2 (hld.distill.cross_tok.uld);
- `gold`: T^2 * D over the shared vocabulary at the chunks of one token a side and `uld_weight` * ULD_k at
  the others, D = `objective.divergence` (hld.distill.cross_tok.gold);
- `alm`: tau * D(Bernoulli(p) || Bernoulli(q)) of each chunk's tempered likelihoods, tau = `alm_temperature`,
  D = `objective.divergence` (hld.distill.cross_tok.alm). A chunk's likelihood on a side is the sum of its
  tokens' log-probabilities, token k's read at row k-1, whose label is token k: on the student's side
  that is -CE of row k-1, which the CE pass computes anyway. The likelihoods are the models' own (T = 1):
  `objective.temperature` does not enter ALM, tau plays its part.

The student's head, in one pass (the way of the fused head, hld.distill.chunked): the logits exist one
block of rows at a time; each block's CE and XT and their gradient g = dL/dz are computed together
(autograd on the block's logits alone), folded at once into dL/dh = g W and dL/dW += g^T h, and the block
freed; backward only scales the two by the incoming gradient. Memory is O(block_rows * V) and no matmul of
the head runs twice: forward plus the two gradient matmuls, 6 d_s V_s per row, what `flops.step_cost`
charges every arm with a head. A block must hold everything its rows' losses depend on: ULD and GOLD read
one row per chunk, but ALM's loss of a chunk is a function of the summed log-probabilities of its rows
[start - 1, end - 1), so ALM's blocks are cut only between those spans (`row_blocks`; a block grows past
`block_rows` to the end of a span it would cut). The alternative, torch.utils.checkpoint per block, would
run the head's forward twice (2 d_s V_s more per row) and, for GOLD, keep every block's teacher rows over the
shared vocabulary until backward (or run the teacher's head twice too).

The teacher's head runs under no_grad, a block at a time, at the rows a loss reads (`OnlineLogits.at_rows`):
for ULD and GOLD one row per predicted chunk (the row predicting it), for ALM every row that predicts a
token of a predicted chunk. `flops.step_cost` charges the teacher's forward with its head at every token;
ULD and GOLD run the head on one teacher row per chunk, so that charge is an upper bound for them (ALM reads
nearly every row).

`CrossTokHiddenObjective`: `HiddenObjective` on states pooled per chunk (hld.distill.cross_tok.pooling,
`last` or `mean`): pred = projector(pooled student layer), target = the normalised pooled teacher layer (the
standardisation statistics, per teacher layer, applied to the pooled states unchanged). The chunks are laid
out as (B, C) rows, window b's chunk c at (b, c) (C = the most chunks of a window, the rest masked), so a
loss that relates positions within a window (`relation`) relates the chunks of one window, causally, as it
relates one window's tokens; a row loss sums over the chunks. With `skip_first_position` the first chunk of
each window (the BOS pair) is left out, position 0 of that layout.

Normalisation, as for every objective: the loss is a sum and the count returned is `batch.n_targets`, the
student's next-token targets. The hidden loss sums over chunks, not student tokens: a window of m kept
chunks and n targets adds m terms, each weighing what one head-loss position weighs, so the hidden term is
m / n (<= 1, a chunk holds at least one student token) of what a same-tokenizer hidden loss of the same beta
over n positions would be, about the ratio of chunks to student tokens of the tokenizer pair.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from hld.config import ObjectiveConfig, ScheduleConfig
from hld.data.packing import Batch
from hld.distill.chunked import scaled_saved_grads
from hld.distill.cross_tok.alm import alm_rows, chunk_logliks
from hld.distill.cross_tok.chunks import Chunks, as_float
from hld.distill.cross_tok.gold import RESTS, gold_from
from hld.distill.cross_tok.pooling import POOLINGS, pool_chunks
from hld.distill.cross_tok.signal import CachedChunks, ChunkLossSpec, OnlineChunks, chunk_source, pooled_teacher
from hld.distill.cross_tok.uld import uld_from
from hld.distill.cross_tok.vocab import SharedVocab
from hld.distill.divergences.base import Divergence
from hld.distill.divergences.registry import parse as parse_divergence
from hld.distill.hidden import hidden_mask
from hld.distill.losses import softcap
from hld.distill.objectives import (
    HiddenObjective,
    LogitObjective,
    Phase,
    Plan,
    Result,
    hidden_objective,
    logit_spec,
    method_plan,
)
from hld.distill.projectors import Projectors
from hld.distill.schedule import weight_at
from hld.distill.signals import Needs, StudentOutputs, TeacherSignals

LOSSES = ("uld", "alm", "gold")
BLOCK_ROWS = 256  # student rows of logits at a time (build_cross_plan passes objective.chunk_tokens)


# --------------------------------------------------------------------------- row blocks


@dataclass(frozen=True)
class RowBlock:
    """Student rows [rows.start, rows.stop) of the flattened (B*T_s) batch, and the predicted chunks (a
    range of them, chunks being in row order) whose predicting row lies in it."""

    rows: slice
    chunks: slice


def row_blocks(span_start: np.ndarray, span_end: np.ndarray, *, n_rows: int, block_rows: int) -> list[RowBlock]:
    """Consecutive blocks of about `block_rows` rows covering [0, n_rows), never cutting a span
    [span_start[c], span_end[c]) (ascending and disjoint: the rows a chunk's loss reads), each with the spans
    that start in it. A block that would cut a span ends at the span's end instead."""
    start = np.asarray(span_start, np.int64)
    end = np.maximum(np.asarray(span_end, np.int64), start + 1)
    cover = np.zeros(n_rows + 2, np.int64)
    np.add.at(cover, start + 1, 1)
    np.add.at(cover, end, -1)
    cuts = np.flatnonzero(np.cumsum(cover)[: n_rows + 1] == 0)  # positions no span straddles (0 and n_rows too)
    out, r0 = [], 0
    while r0 < n_rows:
        r1 = int(cuts[np.searchsorted(cuts, min(r0 + block_rows, n_rows))])
        c0, c1 = np.searchsorted(start, [r0, r1])
        out.append(RowBlock(slice(r0, r1), slice(int(c0), int(c1))))
        r0 = r1
    return out


BlockLoss = Callable[[torch.Tensor, RowBlock], torch.Tensor]  # (block logits (b, V) fp32, block) -> loss


class _BlockedHead(torch.autograd.Function):
    """sum over `blocks` of block_loss(h[rows] @ W^T, block), its gradient computed block by block in forward
    (the module docstring): dL/dh and dL/dW are kept, backward scales them."""

    @staticmethod
    def forward(ctx, h, W, blocks, block_loss: BlockLoss, grad_mode: bool, matmul_dtype):
        # grad_mode: whether autograd was on at the call (inside forward it is always off)
        want_h = grad_mode and ctx.needs_input_grad[0]
        want_W = grad_mode and ctx.needs_input_grad[1]
        acc = torch.float64 if h.dtype == torch.float64 else torch.float32  # the gradients' accumulation
        hc = h.to(matmul_dtype or h.dtype)
        Wc = W.to(hc.dtype)
        Wa = W.to(acc) if want_h else W  # dL/dh's operand (a copy only for a low-precision W)
        grad_h = torch.zeros(h.shape, dtype=acc, device=h.device) if want_h else None
        grad_W = torch.zeros(W.shape, dtype=acc, device=W.device) if want_W else None
        total = torch.zeros((), dtype=acc, device=h.device)
        for blk in blocks:
            z = as_float(torch.mm(hc[blk.rows], Wc.T))  # (b, V)
            with torch.enable_grad():
                loss = block_loss(z.requires_grad_(want_h or want_W), blk)
            if (want_h or want_W) and loss.requires_grad:
                (g,) = torch.autograd.grad(loss, z)  # (b, V)
                if grad_h is not None:
                    grad_h[blk.rows] = g.to(acc) @ Wa
                if grad_W is not None:
                    grad_W.addmm_(g.to(acc).T, h[blk.rows].to(acc))
            total = total + loss.detach()
            del z
        ctx.save_for_backward(
            grad_h.to(h.dtype) if grad_h is not None else None, grad_W.to(W.dtype) if grad_W is not None else None
        )
        return total

    @staticmethod
    def backward(ctx, grad_out):
        return (*scaled_saved_grads(ctx, grad_out, "the cross-tokenizer head loss"), None, None, None, None)


# --------------------------------------------------------------------------- the paired batch


def _paired(batch: Batch) -> tuple[list, torch.Tensor]:
    if batch.alignments is None or batch.teacher_ids is None:
        raise ValueError("a cross-tokenizer objective reads a batch of paired windows (make_paired_batch)")
    return batch.alignments, batch.teacher_ids


def batch_chunks(batch: Batch, device: Optional[torch.device] = None) -> Chunks:
    """Every chunk of the batch's windows, as flat rows of its (B, T_t) teacher and (B, T_s) student rows."""
    alignments, teacher_ids = _paired(batch)
    return Chunks.from_alignments(
        alignments, teacher_len=teacher_ids.shape[1], student_len=batch.input_ids.shape[1], device=device
    )


def _on(ch: Chunks, device: torch.device) -> Chunks:
    to = [t.to(device) for t in (ch.teacher_start, ch.teacher_end, ch.student_start, ch.student_end, ch.first)]
    return Chunks(to[0], to[1], to[2], to[3], first=to[4])


# --------------------------------------------------------------------------- the logit objective


class CrossTokLogitObjective:
    """(1 - alpha) * CE + alpha * XT over a batch of paired windows (the module docstring). With an alpha
    schedule, alpha(p) at progress p (`set_progress`), as `LogitObjective`.

    Returns (loss sum, batch.n_targets, {"ce": CE sum, "kd": XT sum}), the metrics detached 0-dim tensors."""

    needs = Needs(logits=True)
    student_layers: tuple[int, ...] = ()
    uses_head = True
    n_pairs = 0

    def __init__(
        self,
        *,
        loss: str,
        alpha: float,
        temperature: float = 1.0,
        divergence: Divergence | str = "forward_kl",
        vocab: Optional[SharedVocab] = None,
        uld_top_k: Optional[int] = 64,
        alm_temperature: float = 100.0,
        uld_weight: float = 1.0,
        gold_rest: str = "bucket",
        block_rows: int = BLOCK_ROWS,
        matmul_dtype: Optional[torch.dtype] = None,
        schedule: Optional[ScheduleConfig] = None,
    ) -> None:
        """`loss`: uld | alm | gold. `vocab`: the shared vocabulary (hld.distill.cross_tok.vocab), for gold
        only. `uld_top_k`: each side's k most likely outcomes in ULD (None: full sorted rows). `gold_rest`:
        the mass off the shared ids (hld.distill.cross_tok.gold). `block_rows`: student rows of logits at a
        time. `matmul_dtype`: the head's matmul dtype (bf16 on GPUs), the losses in fp32."""
        if loss not in LOSSES:
            raise ValueError(f"cross-tokenizer loss {loss!r} is not one of {LOSSES}")
        if loss == "gold" and (vocab is None or len(vocab) == 0):
            raise ValueError(
                "the gold loss needs the tokenizers' shared vocabulary (SharedVocab), and it is "
                + ("missing" if vocab is None else "empty: no token spells the same text on both sides")
            )
        if gold_rest not in RESTS:
            raise ValueError(f"gold_rest={gold_rest!r} is not one of {RESTS}")
        if uld_top_k is not None and uld_top_k < 1:
            raise ValueError(f"uld_top_k={uld_top_k} must be >= 1 (or None: full rows)")
        if temperature <= 0 or alm_temperature <= 0 or block_rows < 1:
            raise ValueError("temperature, alm_temperature and block_rows must be positive")
        self.loss = loss
        self.alpha0 = self.alpha = alpha
        self.schedule = schedule
        self.temperature = temperature
        self.divergence = parse_divergence(divergence) if isinstance(divergence, str) else divergence
        self.vocab = vocab
        self.uld_top_k, self.alm_temperature, self.uld_weight = uld_top_k, alm_temperature, uld_weight
        self.gold_rest = gold_rest
        self.block_rows = block_rows
        self.matmul_dtype = matmul_dtype

    def cost_dims(self, seq_len: int) -> tuple[tuple[float, float], ...]:
        """None beyond the student's head: one forward and two gradient matmuls per row (the one pass of the
        module docstring), as `flops.step_cost` counts for `uses_head`. Sorting, top-k and the gathers are
        not matmuls (not counted, like a softmax). The teacher's head is charged with the teacher's forward."""
        return ()

    def set_progress(self, progress: float) -> dict[str, float]:
        if self.schedule is None:
            return {}
        self.alpha = weight_at(progress, self.alpha0, self.schedule)
        return {"alpha": self.alpha}

    def __call__(self, batch: Batch, student: StudentOutputs, teacher: Optional[TeacherSignals]) -> Result:
        _, teacher_ids = _paired(batch)
        h = student.final_hidden.reshape(-1, student.final_hidden.shape[-1])  # (B*T_s, d_s)
        host = batch_chunks(batch).predicted()
        source = chunk_source(teacher, teacher_ids, host, block_rows=self.block_rows)
        chunks = _on(host, h.device)
        pred = host.student_start.numpy() - 1  # each chunk's predicting row
        span_end = host.student_end.numpy() - 1 if self.loss == "alm" else pred + 1  # the rows its loss reads
        blocks = row_blocks(pred, span_end, n_rows=h.shape[0], block_rows=self.block_rows)
        t_loglik = source.logliks(chunks) if self.loss == "alm" else None
        labels, mask = batch.labels.reshape(-1), batch.mask.reshape(-1)
        a = self.alpha
        sums: dict[str, Any] = {"ce": 0.0, "kd": 0.0}

        def block_loss(z: torch.Tensor, blk: RowBlock) -> torch.Tensor:
            z = softcap(z, student.softcap)  # (b, V_s)
            y = labels[blk.rows].clamp_min(0)
            nll = torch.logsumexp(z, -1) - z.gather(-1, y[:, None]).squeeze(-1)  # (b,)
            ce = torch.where(mask[blk.rows], nll, 0.0).sum()
            if blk.chunks.stop > blk.chunks.start:
                part = chunks.select(blk.chunks)
                lt = t_loglik[blk.chunks] if t_loglik is not None else None
                xt = self.xt_sum(z, nll, part, blk.rows.start, source, lt, blk.chunks)
            else:
                xt = ce.new_zeros(())
            sums["ce"] = sums["ce"] + ce.detach()
            sums["kd"] = sums["kd"] + xt.detach()
            return (1 - a) * ce + a * xt

        loss = _BlockedHead.apply(
            h, student.head_weight, blocks, block_loss, torch.is_grad_enabled(), self.matmul_dtype
        )
        zero = h.new_zeros((), dtype=loss.dtype)
        return loss, batch.n_targets, {k: (zero + v).detach() for k, v in sums.items()}

    @property
    def spec(self) -> ChunkLossSpec:
        """What the teacher's side of this loss depends on (a per-chunk cache's identity)."""
        return ChunkLossSpec(self.loss, self.uld_top_k, self.temperature, self.gold_rest, self.vocab)

    def xt_sum(
        self,
        z: torch.Tensor,
        nll: torch.Tensor,
        part: Chunks,
        r0: int,
        source: OnlineChunks | CachedChunks,
        teacher_loglik: Optional[torch.Tensor],
        sl: slice,
    ) -> torch.Tensor:
        """XT over the chunks `part` (the batch's predicted chunks `sl`) of one block of student rows starting
        at flat row r0: z (b, V_s) its soft-capped logits, nll (b,) each row's CE (of its label, the next
        token); the teacher's side read from `source` (online or a per-chunk cache, hld.distill.cross_tok.signal)."""
        if self.loss == "alm":
            assert teacher_loglik is not None
            tok = torch.cat([nll.new_zeros(1), -nll])  # (b + 1,): local token k's log-prob, read at row k-1
            ls = chunk_logliks(tok, part.student_start - r0, part.student_end - r0)  # (m,)
            return alm_rows(teacher_loglik, ls, temperature=self.alm_temperature, divergence=self.divergence).sum()
        spec = self.spec
        if self.loss == "uld":
            t_uld = source.uld(part, sl, spec)
            return uld_from(t_uld, z[part.student_pred_rows - r0], top_k=self.uld_top_k, temperature=self.temperature)
        # gold: the block's chunks re-indexed to these rows (the student's bounds local to the block; gold reads
        # nothing of the teacher's bounds but each chunk's length, which `one_to_one` keeps)
        exact, t_uld = source.gold(part, sl, spec)
        local = Chunks(
            part.teacher_start,
            part.teacher_end,
            part.student_start - r0,
            part.student_end - r0,
            first=torch.zeros_like(part.first),
        )
        assert self.vocab is not None
        parts = gold_from(
            exact,
            t_uld,
            z,
            local,
            self.vocab,
            temperature=self.temperature,
            divergence=self.divergence,
            rest=self.gold_rest,
            uld_top_k=self.uld_top_k,
        )
        return parts.total(self.uld_weight)


# --------------------------------------------------------------------------- the hidden objective


def chunk_layout(alignments: Sequence) -> tuple[np.ndarray, int]:
    """(slot (m,), C): chunk c of window b at slot b * C + c of a (B, C) layout, C the most chunks of a window
    (at least 1), the chunks in `Chunks.from_alignments`' order."""
    counts = [len(al.teacher_bounds) - 1 for al in alignments]
    C = max([1, *counts])
    slot = np.concatenate([b * C + np.arange(n) for b, n in enumerate(counts)] or [np.zeros(0, np.int64)])
    return slot.astype(np.int64), C


class CrossTokHiddenObjective(HiddenObjective):
    """`HiddenObjective` on each layer pair's states pooled per chunk (the module docstring): beta * mean over
    pairs of the hidden loss summed over the kept chunks, laid out (B, C) by window. Takes `HiddenObjective`'s
    arguments and `pooling` (last | mean). `cost_dims` is `HiddenObjective`'s, per student token: the projector
    runs on m chunks, at most the student's tokens, so it is an upper bound."""

    def __init__(self, projectors: Projectors, *, pooling: str = "last", **kwargs: Any) -> None:
        if pooling not in POOLINGS:
            raise ValueError(f"pooling {pooling!r} is not one of {POOLINGS}")
        super().__init__(projectors, **kwargs)
        self.pooling = pooling

    def __call__(self, batch: Batch, student: StudentOutputs, teacher: Optional[TeacherSignals]) -> Result:
        if teacher is None:
            raise ValueError("the hidden objective reads the teacher's hidden states")
        alignments, _ = _paired(batch)
        B = batch.input_ids.shape[0]
        device = student.final_hidden.device
        chunks = batch_chunks(batch, device)
        slot_np, C = chunk_layout(alignments)
        slot = torch.as_tensor(slot_np, device=device)
        mask = torch.zeros(B * C, dtype=torch.bool, device=device)
        mask[slot] = True
        mask = hidden_mask(mask.view(B, C), skip_first=self.skip_first)  # (B, C): chunk 0 = the BOS pair

        def laid_out(x: torch.Tensor) -> torch.Tensor:  # (m, d) -> (B, C, d), empty slots 0
            return x.new_zeros(B * C, x.shape[-1]).index_copy(0, slot, x).view(B, C, -1)

        total = student.final_hidden.new_zeros((), dtype=torch.float32)
        for pair in self.projectors.pairs:
            s, t = pair
            t_pooled = pooled_teacher(teacher, t, chunks, how=self.pooling)
            s_pooled = pool_chunks(
                student.hidden[s].reshape(-1, student.hidden[s].shape[-1]),
                chunks.student_start,
                chunks.student_end,
                how=self.pooling,
            )
            total = total + self.pair_sum(pair, laid_out(s_pooled), laid_out(t_pooled), mask)
        total = total / len(self.projectors.pairs)
        return self.beta * total, batch.n_targets, {"hidden": total.detach()}


# --------------------------------------------------------------------------- the plan


def build_cross_plan(
    cfg: ObjectiveConfig,
    *,
    projectors: Optional[Projectors],
    vocab: Optional[SharedVocab],
    loss: str = "uld",
    uld_top_k: Optional[int] = 64,
    alm_temperature: float = 100.0,
    pooling: str = "last",
    uld_weight: float = 1.0,
    gold_rest: str = "bucket",
    chunk_tokens: int = BLOCK_ROWS,
    matmul_dtype: Optional[torch.dtype] = None,
    teacher_lm: Optional[torch.nn.Module] = None,
) -> Plan:
    """`build_plan` for a teacher with another tokenizer: ce is `LogitObjective`'s CE on the student's own
    tokens; kd is `CrossTokLogitObjective` (`loss`: uld | alm | gold, alpha, T, divergence and the alpha
    schedule from `cfg`); hld-joint is kd + the pooled hidden objective; hld-first the pooled hidden
    objective for `cfg.hidden.first_share` of the tokens, then kd. `chunk_tokens` is the head's block of rows.
    `cfg.top_k` and `cfg.top_k_rest` (a same-tokenizer teacher's truncation) are not read: ULD's is `uld_top_k`."""
    method = cfg.method
    if method == "ce":
        spec = logit_spec(cfg, chunk_tokens=chunk_tokens, kd=False, matmul_dtype=matmul_dtype)
        return Plan([Phase("ce", 1.0, LogitObjective(spec))])
    kd = CrossTokLogitObjective(
        loss=loss,
        alpha=cfg.alpha,
        temperature=cfg.temperature,
        divergence=cfg.divergence,
        vocab=vocab,
        uld_top_k=uld_top_k,
        alm_temperature=alm_temperature,
        uld_weight=uld_weight,
        gold_rest=gold_rest,
        block_rows=chunk_tokens,
        matmul_dtype=matmul_dtype,
        schedule=cfg.alpha_schedule if cfg.alpha_schedule.kind != "constant" else None,
    )
    if method == "kd":
        return Plan([Phase("kd", 1.0, kd)])
    hidden = hidden_objective(
        cfg,
        projectors,
        chunk_tokens=chunk_tokens,
        matmul_dtype=matmul_dtype,
        teacher_lm=teacher_lm,
        kind=CrossTokHiddenObjective,
        pooling=pooling,
    )
    return method_plan(method, kd, hidden, first_share=cfg.hidden.first_share)
