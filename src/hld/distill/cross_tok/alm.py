r"""Approximate Likelihood Matching (ALM; Minixhofer, Vulić & Ponti, arXiv 2503.20083): match the
likelihood each model gives each aligned chunk of the text it reads.

Derivation. A chunk c (hld.distill.cross_tok.chunks) is a run of teacher tokens t_a..t_b and a run of
student tokens s_a'..s_b' that spell the same text x_c after the same prefix x_<c. Under teacher forcing
each side gives its tokens of the chunk a log-likelihood,

    l_T(c) = sum_{k=a..b} log p_T(t_k | t_<k),      l_S(c) = sum_{k=a'..b'} log p_S(s_k | s_<k),

the log-probability that the model continues x_<c with exactly these tokens: approximately log P(x_c |
x_<c) (approximately: another tokenization of the same text has some mass too, and the next chunk's
first token can be fused with this one's text on one side only; the paper's "tokenization bias"). The
distributions over every possible continuation cannot be compared (their outcomes are all strings), so
ALM *binarises*: the event "the continuation is x_c" against its complement, a Bernoulli on each side,

    p = exp(l_T(c) / tau),   q = exp(l_S(c) / tau),

tempered by tau (a long chunk's probability is tiny, and two Bernoulli(~0) are close whatever their
ratio; p^(1/tau) lifts both towards 1 and compares them in ratio). The loss of a chunk is a binary
f-divergence, here any registered divergence over the two outcomes {x_c, not x_c}:

    D(c) = D([p, 1 - p] || [q, 1 - q]),   forward KL by default:
         = p log(p/q) + (1 - p) log((1 - p)/(1 - q)).

The ALM reference code (tokenkit, `alm_diff_fn: binary_ce`, `binarization_temp: 100`) minimises the
binary cross-entropy -p log q - (1 - p) log(1 - q), which is this KL plus the teacher's binary entropy:
the same gradient, and ours is 0 when the likelihoods agree.

Scale: we return tau * D(c). With a = -l_T(c) and b = -l_S(c) (both >= 0), p = 1 - a/tau + O(tau^-2) and

    tau * KL -> a log(a/b) - a + b     as tau -> infinity,

the generalised KL between the two chunk surprisals, so the loss keeps its scale when tau changes (the
role of T^2 in token-level KD); tokenkit's loss is ours divided by tau, up to that constant.

Numerics (as tokenkit): log-likelihoods are clipped at 0 (fp32 rounding can give a log-softmax of +1e-7)
and shifted by -eps (1e-6) after the division by tau, so q < 1 and log(1 - q) stays finite when a
confident side puts all its fp32 mass on a chunk; log(1 - e^x) is computed as log(-expm1(x)) near 0 and
log1p(-e^x) below log(1/2).

Which chunks: every predicted chunk (not a window's first), the finest alignment (tokenkit's
"unconstrained" chunks); the paper's debiased chunk selection is not done. The loss is a sum over chunks;
tokenkit averages per chunk (`distill_main_path_numerator/denominator: chunk_count`).
"""

from __future__ import annotations

import math

import torch

from hld.distill.cross_tok.chunks import Chunks, as_float, token_rows
from hld.distill.divergences.base import Divergence
from hld.distill.divergences.registry import parse as parse_divergence

BLOCK_ROWS = 32
LOG_HALF = -math.log(2.0)


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor, *, block_rows: int = BLOCK_ROWS) -> torch.Tensor:
    """log p(ids[b, k] | ids[b, <k]) at (b, k), read from logits[b, k-1]; (B, T) fp32, 0 at k = 0 (no
    row predicts a window's first token). logits (B, T, V), ids (B, T). Differentiable; `block_rows`
    rows of (rows, V) fp32 at a time."""
    B, T, V = logits.shape
    z = logits[:, :-1].reshape(-1, V)  # (B*(T-1), V): row (b, k-1) predicts token (b, k)
    y = ids[:, 1:].reshape(-1)
    out = []
    for i in range(0, z.shape[0], block_rows):
        zb = as_float(z[i : i + block_rows])
        out.append(zb.gather(-1, y[i : i + block_rows, None]).squeeze(-1) - torch.logsumexp(zb, -1))
    lp = torch.cat(out) if out else as_float(z.new_zeros(0))
    return torch.cat([lp.new_zeros(B, 1), lp.view(B, T - 1)], 1)


def chunk_logliks(token_logp: torch.Tensor, start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
    """(m,) the sum of `token_logp` (flat, (N,)) over each chunk's rows [start, end)."""
    rows, chunk = token_rows(start, end)
    per_token = as_float(token_logp[rows])
    return per_token.new_zeros(len(start)).index_add(0, chunk, per_token)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - e^x) for x < 0, accurate on both sides of log(1/2)."""
    return torch.where(x > LOG_HALF, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def binarised(loglik: torch.Tensor, temperature: float, eps: float) -> torch.Tensor:
    """(m, 2): log [p, 1 - p] with p = exp(min(l, 0) / tau - eps)."""
    x = as_float(loglik).clamp_max(0.0) / temperature - eps
    return torch.stack([x, log1mexp(x)], -1)


def alm_rows(
    teacher_loglik: torch.Tensor,
    student_loglik: torch.Tensor,
    *,
    temperature: float = 100.0,
    divergence: Divergence | str = "forward_kl",
    eps: float = 1e-6,
) -> torch.Tensor:
    """tau * D(Bernoulli(p) || Bernoulli(q)) per chunk (m,) fp32, from each side's chunk log-likelihoods."""
    div = parse_divergence(divergence) if isinstance(divergence, str) else divergence
    logp = binarised(teacher_loglik, temperature, eps)
    logq = binarised(student_loglik, temperature, eps)
    return div.rows(logp, logq) * temperature


def alm_sum(
    teacher_token_logp: torch.Tensor,
    student_token_logp: torch.Tensor,
    chunks: Chunks,
    *,
    temperature: float = 100.0,
    divergence: Divergence | str = "forward_kl",
    eps: float = 1e-6,
) -> torch.Tensor:
    """ALM summed over `chunks` (hld.distill.cross_tok.chunks.Chunks, the predicted ones: a window's
    first chunk has no likelihood) from each side's `token_logprobs`, flattened ((B*T_t,), (B*T_s,))."""
    if bool(chunks.first.any()):
        raise ValueError("a window's first chunk has no likelihood: pass chunks.predicted()")
    with torch.no_grad():
        lt = chunk_logliks(teacher_token_logp, chunks.teacher_start, chunks.teacher_end)
    ls = chunk_logliks(student_token_logp, chunks.student_start, chunks.student_end)
    return alm_rows(lt, ls, temperature=temperature, divergence=divergence, eps=eps).sum()
