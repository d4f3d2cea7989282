"""The top-k signal: the teacher's k largest logits (sorted descending), their ids and the log of its
mass off them, `rest` = log sum_{j not in top-k} exp(z_j) (after softcap, before temperature). What an
offline cache stores (`teacher.cache_codec` exact or compact) and what `objective.top_k` cuts an online
teacher to.

Loss (hld.distill.losses' conventions): with `top_k_rest="bucket"` both distributions are coarsened to
the k ids + the rest, the teacher being softmax([v_1..v_k, rest] / T); with `renormalize` the teacher is
the softmax of its k values alone (no mass elsewhere).

Fused gradient (`bucket`): outcomes are the k ids K and the rest r. With q = softmax(z/T),
log q_i = z_i/T - lse(z/T) for i in K and log q_r = lse_{j not in K}(z_j/T) - lse(z/T), so
d log q_i/dz_j = (d_ij - q_j)/T and d log q_r/dz_j = ([j not in K] q_j/q_r - q_j)/T. For
KL = sum_{i in K} p_i log(p_i/q_i) + p_r log(p_r/q_r), using sum_K p_i + p_r = 1:
  d/dz_j [T^2*KL] = T*(q_j - p_j)                 for j in K,
  d/dz_j [T^2*KL] = T*q_j*(1 - p_r/q_r)           for j not in K,
(q_j/q_r on j not in K is the student's softmax over the rest, at most 1, so the product is bounded).
At k = V (p_r = 0) this is the dense formula; `renormalize` is the same with p_r = 0 and p_t the
softmax of the k values. q_r is the sum of q over the ids off K after zeroing K in q's buffer, not
1 - sum_K q_i, which cancels when the student's rest is small.

Fidelity: the distribution a top-k signal stands for is its k probabilities with the remaining mass
spread evenly over the other V - k ids (the completion with the most entropy), so
    KL(p || p̂) = sum_{j in top-k} p_j log(p_j / p̂_j) + sum_{j off top-k} p_j log(p_j (V - k) / p̂_rest);
`renormalize` puts no mass off the k ids: its KL is infinite.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Optional

import numpy as np
import torch

from hld.distill.chunked import sum64
from hld.distill.losses import logsumexp_outside
from hld.distill.signals.base import HeadSpec, StudentSoftmax, TeacherLogits

if TYPE_CHECKING:
    from hld.distill.divergences.base import Divergence

# assumed for a compact cache's size (docs/cache-format.md, Cost): the slot width and the share of
# escaped gaps measured on the Gemma 3 vocabulary
COMPACT_SLOT_BITS, COMPACT_ESCAPE_SHARE = 10, 0.16


@dataclass
class TopK(TeacherLogits):
    kind: ClassVar[str] = "topk"
    values: torch.Tensor  # (n, k), descending
    indices: torch.Tensor  # (n, k) int64 (int32 as a cache reads them, until `rows`)
    # (n,) float32, log of the teacher's mass off the k ids; -inf when they cover the vocabulary; None = unknown
    rest: Optional[torch.Tensor] = None

    def rows(self, sl: slice) -> TopK:
        # a cache keeps its ids as int32 until a block of rows is read (half the bytes to the device)
        return TopK(self.values[sl], self.indices[sl].long(), None if self.rest is None else self.rest[sl])

    def to(self, device: torch.device) -> TopK:
        return TopK(
            self.values.to(device), self.indices.to(device), None if self.rest is None else self.rest.to(device)
        )

    def top_k(self, k: Optional[int]) -> TopK:
        if k is None or k >= self.values.shape[-1]:
            return self
        rest = None
        if self.rest is not None:  # the dropped values join the rest
            rest = torch.logaddexp(self.rest.float(), self.values[:, k:].float().logsumexp(-1))
        return TopK(values=self.values[:, :k], indices=self.indices[:, :k], rest=rest)

    def logprobs(self, temperature: float, top_k_rest: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """log p_t over the k ids and the rest (bucket, (n, k+1), the rest last), or over the k ids alone
        (renormalize, (n, k))."""
        v = self.values.to(dtype)
        if top_k_rest == "renormalize":
            return torch.log_softmax(v / temperature, dim=-1)
        if top_k_rest != "bucket":
            raise ValueError(f"unknown top_k_rest {top_k_rest!r} (bucket or renormalize)")
        if self.rest is None:
            raise ValueError(
                "top_k_rest='bucket' needs the teacher's rest mass (TopK.rest: log of the sum of exp(logits) "
                "off the top-k), and this top-k teacher has none; build the signal with it (Dense.top_k "
                "fills it) or use top_k_rest='renormalize'"
            )
        return torch.log_softmax(torch.cat([v, self.rest.to(dtype)[:, None]], -1) / temperature, dim=-1)

    def kd_rows(
        self, s: torch.Tensor, logq: torch.Tensor, temperature: float, div: Divergence, top_k_rest: str
    ) -> torch.Tensor:
        logp = self.logprobs(temperature, top_k_rest)  # (n, k+1) or (n, k)
        idx = self.indices
        if top_k_rest == "bucket":
            return div.rows(logp, student_bucket_logprobs(logq, s, idx))
        if div.teacher_support_only:  # renormalize: the teacher has no mass off its k ids, so read them alone
            return div.rows(logp, logq.gather(-1, idx))
        return div.rows(torch.full_like(logq, float("-inf")).scatter(-1, idx, logp), logq)

    def fused_rows(
        self,
        z: torch.Tensor,
        sl: slice,
        spec: HeadSpec,
        student: StudentSoftmax,
        kd_rows: torch.Tensor,
        want_grad: bool,
    ) -> torch.Tensor:
        T = spec.temperature
        idx = self.indices[sl]
        k = idx.shape[-1]
        bucket = spec.top_k_rest == "bucket"
        logpt = self.rows(sl).logprobs(T, spec.top_k_rest)  # (r, k+1) bucket, (r, k) renormalize
        zK = z.gather(-1, idx)  # (r, k): read before student() overwrites z
        p, q, lseT = student()
        pt = logpt.exp()
        qK = q.gather(-1, idx)  # (r, k)
        pK = qK if q is p else p.gather(-1, idx)
        logqK = zK / T - lseT[:, None]
        per = (pt[:, :k] * (logpt[:, :k] - logqK)).sum(-1, dtype=torch.float64)
        c = None
        if bucket:
            q.scatter_(-1, idx, 0.0)
            qr = sum64(q)  # (r,) the student's tempered mass off the k ids, summed (no 1 - sum cancellation)
            pr, logpr = pt[:, k].double(), logpt[:, k].double()
            per = per + torch.where(pr > 0, pr * (logpr - qr.log()), 0.0)
            c = torch.where(pr > 0, pr / qr.clamp_min(torch.finfo(qr.dtype).tiny), 0.0).float()  # p_r / q_r
        kd_rows[sl] = per
        if not want_grad:
            return p
        wk = spec.kd_weight * T
        if c is None:  # d/dz: w_ce * (p - onehot) + w_kd * T * (q - p_t [on the k ids])
            if T == 1:
                p.mul_(spec.ce_weight + wk)
            else:
                p.mul_(spec.ce_weight).add_(q, alpha=wk)
            p.scatter_add_(-1, idx, pt.mul_(-wk))
            return p
        # off the k ids: w_ce * p_j + w_kd * T * q_j * (1 - p_r / q_r); on them: w_ce * p_j + w_kd * T * (q_j - p_t,j)
        if T == 1:
            p.mul_((spec.ce_weight + wk * (1 - c))[:, None])
        else:
            p.mul_(spec.ce_weight).addcmul_(q, (wk * (1 - c))[:, None])
        p.scatter_(-1, idx, spec.ce_weight * pK + wk * (qK - pt[:, :k]))
        return p

    def fidelity(self, full: torch.Tensor, temperature: float, top_k_rest: str) -> torch.Tensor:
        """KL(p || p̂), p̂ the k probabilities + the rest spread evenly (module docstring)."""
        logp = torch.log_softmax(full.double() / temperature, dim=-1)  # (n, V)
        sig = self.logprobs(temperature, top_k_rest, dtype=torch.float64)  # (n, k+1) or (n, k)
        idx = self.indices.long()
        k, V = idx.shape[-1], logp.shape[-1]
        p = logp.exp()  # an id of logit -inf has p = 0 and adds 0 (0 log 0 = 0, not 0 * -inf = nan)
        p_top = p.gather(-1, idx)
        top = torch.where(p_top > 0, p_top * (logp.gather(-1, idx) - sig[:, :k]), 0.0).sum(-1)  # (n,)
        if top_k_rest == "renormalize" or k >= V:
            off = p.sum(-1) - p_top.sum(-1)
            return torch.where(off > 0, math.inf, top) if k < V else top
        mask = torch.ones_like(p, dtype=torch.bool).scatter_(-1, idx, False)  # the ids off the top k
        off_mass = torch.where(mask, p, 0.0).sum(-1)
        stated = torch.where(off_mass > 0, off_mass * (sig[:, k] - math.log(V - k)), 0.0)
        rest = torch.where(mask & (p > 0), p * logp, 0.0).sum(-1) - stated
        return top + rest

    # ------------------------------------------------------------------------------- in a cache

    @staticmethod
    def cache_logit_bytes(codec, k: int, T: int, vocab: int) -> tuple[float, float]:
        """(estimate, bound) bytes per cached token of the logits: exact k (2 + 4) + 4 (rest); compact
        k (q + b + e ceil(log2 V)) / 8 + 2 (D) + 4 (rest) + 8 / T (offsets), b and e measured on the
        Gemma 3 vocabulary; the bound takes b = ceil(log2 V) with at most one escape per token."""
        if codec.logits == "exact":
            return k * 6 + 4.0, k * 6 + 4.0
        index_bits = max(1, (vocab - 1).bit_length())
        per_entry = (codec.value_bits + COMPACT_SLOT_BITS + COMPACT_ESCAPE_SHARE * index_bits) / 8
        bound = k * (codec.value_bits + index_bits) / 8 + index_bits / 8 + 6 + 9 / T
        return k * per_entry + 6 + 8 / T, bound

    @staticmethod
    def decoded_entry_bytes(codec) -> int:
        """Bytes per logit entry as the cache's reader decodes it: exact float16 values + int32 ids;
        compact float32 values + int64 ids."""
        return 2 + 4 if codec.logits == "exact" else 4 + 8

    @classmethod
    def from_teacher(cls, source, *, k: int, window_ids: np.ndarray, T: int, identity: dict, chunk: int = 256):
        """(values (N, k), ids (N, k), rest (N,)) of an online teacher's rows, `chunk` rows at a time
        (never (N, V) at once)."""
        vals, idx, rest = [], [], []
        n = source.n_rows
        for s in range(0, n, chunk):
            top = source.rows(slice(s, min(s + chunk, n))).as_top_k(k)
            vals.append(top.values)
            idx.append(top.indices)
            rest.append(top.rest)
        return torch.cat(vals), torch.cat(idx), torch.cat(rest)

    @classmethod
    def from_cache(cls, values: np.ndarray, ids: np.ndarray, rest: np.ndarray) -> TopK:
        """The signal as a cache's reader decoded it, (n, k) each: flattened rows, on the CPU."""
        k = values.shape[-1]
        return cls(
            torch.from_numpy(values).reshape(-1, k),
            torch.from_numpy(ids).reshape(-1, k),
            torch.from_numpy(rest).reshape(-1),
        )


def student_bucket_logprobs(logq: torch.Tensor, s_over_T: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The student's tempered log-probs coarsened to the k ids + the rest, (n, k+1), from its logits
    s/T (n, V) and logq = log_softmax(s/T)."""
    rest = logsumexp_outside(s_over_T, idx)[:, None] - torch.logsumexp(s_over_T, -1, keepdim=True)  # (n, 1)
    return torch.cat([logq.gather(-1, idx), rest], -1)
