"""The sampled teacher signal (Random-Sampling KD: Anshumann et al., *Sparse Logit Sampling:
Accelerating Knowledge Distillation in LLMs*, ACL 2025, arXiv 2503.16870).

Per position, K ids are drawn with replacement from a proposal q = softmax(z / tau) of the teacher's
logits z (after softcap); the cache keeps the distinct ids drawn and their importance weights

    w_i = (c_i / K) * (p_i / q_i) / sum_j (c_j / K) * (p_j / q_j),     p = softmax(z),

c_i the number of draws of id i. At tau = 1 (q = p) the ratio is 1 and w_i = c_i / K exactly: E[w_i] =
p_i, so the KD loss read from the cache, sum_i w_i (log w_i - log s_i) (s the student's softmax), has
the cross-entropy part -sum_i w_i log s_i with expectation -sum_i p_i log s_i = H(p, s), and its
gradient with respect to the student's logits, s - w, has expectation s - p: the full-distribution KD
gradient, unbiased. The constant part sum_i w_i log w_i makes the value 0 when s equals w (it has no
gradient). At tau != 1 the normalisation (a self-normalised importance-sampling estimator) makes the
estimate consistent (bias O(1/K)), not unbiased; the unnormalised weights (c_i / K) p_i / q_i are
unbiased (`weights(..., normalise=False)`, tested).

Draws are reproducible: window w's uniforms come from numpy's PCG64 seeded with (SEED, w), consumed in
position order, K per position; an id is the inverse CDF of q (float64 cumulative sums) at u times the
total. So a cache is the same whatever the build's batch size, parts, ranks or resumes.

As a signal (`Sampled`): the loss is the estimate sum_i w_i (log w_i - log q_i) of forward KL (its
gradient T (q - w) has expectation T (q - p) at tau = 1); other divergences are refused. In the fused
head it is `renormalize` top-k with p_t = w: d/dz_j [T^2 * sum_i w_i log(w_i/q_i)] = T*(q_j - w_j)
(w_j = 0 off the ids drawn). Its fidelity is KL(w || p) = sum_i w_i log(w_i / p_i), the KD loss the
teacher itself would get from the signal (KL(p || w) is infinite for any finite number of draws).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Optional

import numpy as np
import torch

from hld.distill.signals.base import HeadSpec, StudentSoftmax, TeacherLogits

if TYPE_CHECKING:
    from hld.distill.divergences.base import Divergence

SEED = 20250321  # the first half of every window's PCG64 seed: (SEED, window id)
ROWS = 32  # positions per sampling block: a (ROWS, V) float64 cumulative sum (64 MiB at V = 262,144)


def window_rng(window_id: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64([SEED, int(window_id)]))


BLOCK = 1024  # ids per block of the two-level inverse CDF


def draw(z: torch.Tensor, u: np.ndarray, *, tau: float) -> torch.Tensor:
    """Ids (n, K) int64 drawn from q = softmax(z / tau) (z (n, V) logits) at uniforms u (n, K) in [0, 1):
    the first id whose cumulative mass exceeds u * total (an id of zero mass is never drawn).

    In two levels, both in float64: the cumulative masses of blocks of BLOCK ids pick the block, then
    the cumulative masses inside the K picked blocks pick the id. The (n, V) float64 cumulative sum of
    a one-level search (one sequential pass) becomes block sums and (n, K, BLOCK) cumulative sums
    (benchmarks/sampled_draw.py times both); the ids are the one-level search's but for rounding at a
    block's edge (an id whose cumulative mass is within ~1e-16 of u * total)."""
    n, V = z.shape
    q = torch.softmax(z.float() / tau if tau != 1 else z.float(), dim=-1)  # (n, V)
    nb = -(-V // BLOCK)
    if nb * BLOCK != V:  # zero mass in the last block's tail: never drawn
        q = torch.nn.functional.pad(q, (0, nb * BLOCK - V))
    qb = q.view(n, nb, BLOCK)
    bcdf = torch.cumsum(qb.sum(-1, dtype=torch.float64), dim=-1)  # (n, nb)
    x = torch.from_numpy(np.ascontiguousarray(u)).to(bcdf.device) * bcdf[:, -1:]  # (n, K)
    blk = torch.searchsorted(bcdf, x, right=True).clamp_max_(nb - 1)  # the first block past x: it has mass
    before = torch.where(blk > 0, bcdf.gather(1, (blk - 1).clamp_min(0)), bcdf.new_zeros(()))
    inner = torch.cumsum(qb[torch.arange(n, device=q.device)[:, None], blk], dim=-1, dtype=torch.float64)
    off = torch.searchsorted(inner, (x - before).unsqueeze(-1), right=True).squeeze(-1)  # (n, K)
    last = (inner < inner[..., -1:]).sum(-1)  # the block's last id of non-zero mass (rounding can overshoot)
    return (blk * BLOCK + torch.minimum(off, last)).clamp_max_(V - 1)


def unique_counts(ids: np.ndarray, *, slots: int) -> tuple[np.ndarray, np.ndarray]:
    """Draws (n, K) -> the distinct ids per row, ascending, in `slots` >= their number of columns (n, slots)
    int64 (padding: id 0), and their draw counts (n, slots) int64 (padding: 0)."""
    n, K = ids.shape
    s = np.sort(ids, axis=1)
    new = np.ones((n, K), dtype=bool)
    new[:, 1:] = s[:, 1:] != s[:, :-1]
    flat = (np.arange(n)[:, None] * slots + np.cumsum(new, axis=1) - 1).reshape(-1)  # each draw's slot
    out = np.zeros(n * slots, dtype=np.int64)
    out[flat] = s.reshape(-1)
    counts = np.bincount(flat, minlength=n * slots).reshape(n, slots)
    return out.reshape(n, slots), counts


def weights(counts: np.ndarray, log_ratio: Optional[np.ndarray], *, normalise: bool = True) -> np.ndarray:
    """Importance weights (n, slots) float64 from draw counts (n, slots) and log(p_i / q_i) at those ids
    (None: tau = 1, ratio 1). Normalised: summing to 1 per row (up to a row constant in log_ratio);
    not: (c_i / K) p_i / q_i (log_ratio must then be exact)."""
    K = counts.sum(axis=1, keepdims=True)  # (n, 1) draws per row
    if log_ratio is None:
        return counts / K
    drawn = counts > 0
    lr = np.where(drawn, log_ratio, -np.inf)
    if not normalise:
        return np.where(drawn, counts / K * np.exp(lr), 0.0)
    w = np.where(drawn, counts * np.exp(lr - lr.max(axis=1, keepdims=True)), 0.0)
    return w / w.sum(axis=1, keepdims=True)


def sampled_rows(
    logits_of: Callable[[slice], torch.Tensor],
    window_ids: np.ndarray,
    T: int,
    *,
    samples: int,
    tau: float,
    slots: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The sampled signal of windows `window_ids` (their T positions each, rows j*T.. of `logits_of`,
    which gives the teacher's logits (r, V) of a slice of rows): ids (n*T, slots) int32 and weights
    (n*T, slots) float32, ROWS positions at a time (never (n*T, V) at once)."""
    ids, ws = [], []
    for j, wid in enumerate(window_ids):
        u = window_rng(int(wid)).random((T, samples))  # (T, K): position order, K per position
        for s in range(0, T, ROWS):
            e = min(s + ROWS, T)
            z = logits_of(slice(j * T + s, j * T + e))  # (r, V)
            uid, counts = unique_counts(draw(z, u[s:e], tau=tau).cpu().numpy(), slots=slots)
            lr = None
            if tau != 1:  # log p_i - log q_i = z_i (1 - 1/tau) + a row constant (cancels in the normalisation)
                zi = z.gather(-1, torch.from_numpy(uid).to(z.device)).double().cpu().numpy()
                lr = zi * (1 - 1 / tau)
            ids.append(uid.astype(np.int32))
            ws.append(weights(counts, lr).astype(np.float32))
    return torch.from_numpy(np.concatenate(ids)), torch.from_numpy(np.concatenate(ws))


def estimate_kl_rows(logs: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The loss a sampled signal gives per row: sum_i w_i (log w_i - log s_i), with log s (n, V) the
    student's log-probs, ids/w (n, slots) (a weight of 0 contributes 0)."""
    w = w.to(logs.dtype)
    return (torch.xlogy(w, w) - w * logs.gather(-1, ids.long())).sum(-1)


@dataclass
class Sampled(TeacherLogits):
    """Distinct ids drawn from the teacher (n, slots) and their importance weights (n, slots), summing to
    1 per row (0 in padding slots)."""

    kind: ClassVar[str] = "sampled"
    indices: torch.Tensor  # (n, slots), int32 as a cache reads them, int64 after `rows`
    weights: torch.Tensor  # (n, slots) float32

    def rows(self, sl: slice) -> Sampled:
        return Sampled(self.indices[sl].long(), self.weights[sl])

    def to(self, device: torch.device) -> Sampled:
        return Sampled(self.indices.to(device), self.weights.to(device))

    def kd_rows(
        self, s: torch.Tensor, logq: torch.Tensor, temperature: float, div: Divergence, top_k_rest: str
    ) -> torch.Tensor:
        if not div.from_samples:
            raise ValueError(f"a sampled teacher signal estimates forward_kl only, not {div.spec()!r}")
        return estimate_kl_rows(logq, self.indices, self.weights)

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
        idx, w = self.indices[sl], self.weights[sl].float()
        zK = z.gather(-1, idx)  # (r, slots): read before student() overwrites z
        p, q, lseT = student()
        logqK = zK / T - lseT[:, None]
        kd_rows[sl] = (torch.xlogy(w, w) - w * logqK).sum(-1, dtype=torch.float64)
        if not want_grad:
            return p
        wk = spec.kd_weight * T
        sw = w.sum(-1, keepdim=True)  # (r, 1)
        if T == 1:
            p.mul_(spec.ce_weight + wk * sw)
        else:
            p.mul_(spec.ce_weight).addcmul_(q, wk * sw)
        p.scatter_add_(-1, idx, w * -wk)
        return p

    def fidelity(self, full: torch.Tensor, temperature: float, top_k_rest: str) -> torch.Tensor:
        """KL(w || p) (module docstring)."""
        logp = torch.log_softmax(full.double() / temperature, dim=-1)
        w = self.weights.double()
        return (torch.xlogy(w, w) - w * logp.gather(-1, self.indices.long())).sum(-1)

    # ------------------------------------------------------------------------------- in a cache

    @staticmethod
    def cache_logit_bytes(codec, k: int, T: int, vocab: int) -> tuple[float, float]:
        """(estimate, bound) bytes per cached token: k slots of an int32 id + a float32 weight, exact (the
        distinct ids drawn are padded to that many)."""
        return k * 8.0, k * 8.0

    @staticmethod
    def decoded_entry_bytes(codec) -> int:
        """Bytes per slot as the cache's reader decodes it: a float32 weight + an int32 id."""
        return 4 + 4

    @classmethod
    def from_teacher(cls, source, *, k: int, window_ids: np.ndarray, T: int, identity: dict):
        """(weights (N, k), ids (N, k), None) of an online teacher's rows, drawn as the module says with
        the identity's draws per token and proposal temperature."""
        ids, w = sampled_rows(
            lambda rows: source.rows(rows).logits,
            window_ids,
            T,
            samples=int(identity["cache_samples"]),
            tau=float(identity["cache_proposal_temperature"]),
            slots=k,
        )
        return w, ids, None

    @classmethod
    def from_cache(cls, values: np.ndarray, ids: np.ndarray, rest: Optional[np.ndarray]) -> Sampled:
        """The signal as a cache's reader decoded it; the weights must be a distribution per token (a
        damaged field whose checksum was rewritten: a ValueError)."""
        w = values
        if w.size and not (np.isfinite(w).all() and (w >= 0).all() and np.abs(w.sum(-1) - 1).max() < 1e-4):
            raise ValueError("holds sampled weights that are not a distribution per token")
        k = w.shape[-1]
        return cls(torch.from_numpy(ids).reshape(-1, k), torch.from_numpy(w).reshape(-1, k))
