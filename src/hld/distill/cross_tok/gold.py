"""GOLD's hybrid (TRL's GOLD trainer): exact KD over the vocabulary both tokenizers share where a chunk
is one token on each side, ULD elsewhere.

Where. A predicted chunk (hld.distill.cross_tok.chunks) that is one token on each side has one realised
token per side, both spelling the chunk's text, so the two next-token distributions that predict it
(teacher row tb[c]-1, student row sb[c]-1, after the same text) put their mass on outcomes that can be
named in both vocabularies: the shared tokens of `hld.distill.cross_tok.vocab`. There we compare them
token by token. Elsewhere (a chunk of several tokens on either side) the realised continuation is
spelled differently by the two tokenizers and we fall back to ULD (hld.distill.cross_tok.uld), which
needs no shared ids.

What the exact part compares (`rest`). The shared ids S cover most of each vocabulary, not all of it.
- `bucket` (default): each side's distribution coarsened to |S| + 1 outcomes, the shared tokens one by
  one and the mass off S as one outcome (for the teacher, R_T = sum of p over its ids off S; for the
  student, R_S likewise over its own); then T^2 * D over those outcomes, D any registered divergence
  (forward KL by default). This is hld's top-k rule (the teacher's rest kept as a bucket): the loss still
  says how much mass the teacher leaves off the shared tokens, it is finite for every divergence, and with
  identical vocabularies (S = everything) it is exactly the dense KD of `hld.distill.losses.kd_sum`.
- `renormalize`: both distributions conditioned on S (softmax over the shared ids alone). The mass each
  side puts off S is ignored.
Neither is exact across tokenizers: the teacher's mass on a token the student lacks ("▁understanding")
corresponds to student mass on a shared prefix token ("▁understand"); the bucket calls that mass "rest",
renormalising drops it. Both coincide with plain KD where the vocabularies agree.

TRL's GOLD splits by *vocabulary entry* instead (matched ids compared directly by a JSD on the unnormalised
probabilities, unmatched ids by sorted L1, at every aligned position, weighted by the matched share of
the teacher's vocabulary); we split by *chunk*, as issue 34 asks, so where both sides realise the same
token the student gets the full KD signal.

Sum: T^2 * D over the one-to-one chunks + `uld_weight` * ULD over the others, each a sum over its chunks,
normalised by the caller. The two terms are in different units (nats, and a distance in [0, 2]).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from hld.distill.cross_tok.chunks import Chunks, as_float
from hld.distill.cross_tok.uld import top_logprobs, uld_from
from hld.distill.cross_tok.vocab import SharedVocab
from hld.distill.divergences.base import Divergence
from hld.distill.divergences.registry import parse as parse_divergence
from hld.distill.signals.topk import TopK

RESTS = ("bucket", "renormalize")
BLOCK_ROWS = 32


def shared_logprobs(
    logits: torch.Tensor,
    ids: torch.Tensor,
    *,
    temperature: float = 1.0,
    rest: str = "bucket",
    block_rows: int = BLOCK_ROWS,
) -> torch.Tensor:
    """log-probabilities of softmax(logits / T) over the shared `ids` (n,): (m, n + 1) with the mass off
    them last (`bucket`; -inf when `ids` cover the vocabulary), or (m, n) conditioned on them
    (`renormalize`). logits (m, V); fp32, differentiable, `block_rows` rows of (rows, V) fp32 at a time."""
    if rest not in RESTS:
        raise ValueError(f"rest={rest!r} is not one of {RESTS}")
    off = torch.ones(logits.shape[1], dtype=torch.bool, device=logits.device)
    off[ids] = False
    any_off = bool(off.any())
    out = []
    for i in range(0, logits.shape[0], block_rows):
        z = as_float(logits[i : i + block_rows]) / temperature  # (b, V)
        zs = z[:, ids]  # (b, n)
        if rest == "renormalize":
            out.append(torch.log_softmax(zs, -1))
            continue
        lse = torch.logsumexp(z, -1, keepdim=True)  # (b, 1)
        if any_off:
            rest_lse = torch.logsumexp(z[:, off], -1, keepdim=True)  # (b, 1)
        else:  # nothing off the shared ids (a constant: logsumexp of no entries would give a nan gradient)
            rest_lse = torch.full_like(lse, float("-inf"))
        out.append(torch.cat([zs, rest_lse], -1) - lse)
    width = len(ids) + (rest == "bucket")
    return torch.cat(out) if out else as_float(logits.new_zeros(0, width))


@dataclass(frozen=True)
class GoldParts:
    """The two sums of `gold_parts` and how many chunks each covers."""

    exact: torch.Tensor  # T^2 * D summed over the one-to-one chunks
    uld: torch.Tensor  # ULD_k summed over the others
    n_exact: int
    n_uld: int

    def total(self, uld_weight: float = 1.0) -> torch.Tensor:
        return self.exact + uld_weight * self.uld


def gold_parts(
    teacher_logits: torch.Tensor,
    student_logits: torch.Tensor,
    chunks: Chunks,
    vocab: SharedVocab,
    *,
    temperature: float = 1.0,
    divergence: Divergence | str = "forward_kl",
    rest: str = "bucket",
    uld_top_k: Optional[int] = 64,
) -> GoldParts:
    """GOLD over predicted `chunks` from flat logits: teacher (B*T_t, V_t), student (B*T_s, V_s) (only
    the rows predicting a chunk are read). Gradient to the student's logits only."""
    if bool(chunks.first.any()):
        raise ValueError("a window's first chunk is predicted by no row: pass chunks.predicted()")
    one = chunks.one_to_one if len(vocab) else torch.zeros_like(chunks.first)
    exact, t_uld = teacher_gold(
        teacher_logits[chunks.teacher_pred_rows], one, vocab, temperature=temperature, rest=rest, uld_top_k=uld_top_k
    )
    return gold_from(
        exact,
        t_uld,
        student_logits,
        chunks,
        vocab,
        temperature=temperature,
        divergence=divergence,
        rest=rest,
        uld_top_k=uld_top_k,
    )


@torch.no_grad()
def teacher_gold(
    teacher_rows: torch.Tensor,
    one: torch.Tensor,
    vocab: SharedVocab,
    *,
    temperature: float,
    rest: str,
    uld_top_k: Optional[int],
) -> tuple[torch.Tensor, tuple[torch.Tensor, None]]:
    """GOLD's teacher side from the teacher's logits at the rows predicting the chunks (m, V_t), `one` (m,)
    the chunks of one token a side: (their log-probs over the shared outcomes, the others' ULD values)."""
    t_ids, _ = vocab.tensors(teacher_rows.device)
    exact = shared_logprobs(teacher_rows[one], t_ids, temperature=temperature, rest=rest)
    return exact, (top_logprobs(teacher_rows[~one], uld_top_k, temperature=temperature), None)


def gold_from(
    teacher_exact: torch.Tensor | TopK,
    teacher_uld: tuple[torch.Tensor, Optional[torch.Tensor]],
    student_logits: torch.Tensor,
    chunks: Chunks,
    vocab: SharedVocab,
    *,
    temperature: float = 1.0,
    divergence: Divergence | str = "forward_kl",
    rest: str = "bucket",
    uld_top_k: Optional[int] = 64,
) -> GoldParts:
    """GOLD from the teacher's side already reduced: `teacher_exact` its log-probs over the shared outcomes
    (`shared_logprobs`) at the one-token chunks, in their order, or their top-k as a `TopK` (a per-chunk
    cache: then D runs over those k outcomes and one for the rest, hld's top-k rule, on both sides);
    `teacher_uld` its ULD values at the others (`uld_from`)."""
    div = parse_divergence(divergence) if isinstance(divergence, str) else divergence
    one = chunks.one_to_one if len(vocab) else torch.zeros_like(chunks.first)
    _, s_ids = vocab.tensors(student_logits.device)
    s_rows = chunks.student_pred_rows
    T = temperature
    exact = student_logits.new_zeros((), dtype=torch.float32)
    if bool(one.any()):
        logq = shared_logprobs(student_logits[s_rows[one]], s_ids, temperature=T, rest=rest)
        if isinstance(teacher_exact, TopK):  # the k outcomes + the rest, the student coarsened alike
            rows = teacher_exact.kd_rows(logq, logq, 1.0, div, "bucket")
        else:
            rows = div.rows(teacher_exact, logq)
        exact = rows.sum() * T * T
    uld = uld_from(teacher_uld, student_logits[s_rows[~one]], top_k=uld_top_k, temperature=T)
    n_other = int((~one).sum())
    return GoldParts(exact=exact, uld=uld, n_exact=len(chunks) - n_other, n_uld=n_other)
