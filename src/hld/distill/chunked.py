"""Fused, chunked LM head + loss: the student's logits exist one chunk of tokens at a time.

`head_loss` takes the student's final hidden states `h (N, d)` and the head weight `W (V, d)`; for
each chunk of `chunk_tokens` rows it computes the logits `(chunk, V)` in fp32, the CE and KD sums,
and — in the same pass — their gradient with respect to the logits, which it folds straight into
`dL/dh = g @ W` and `dL/dW += g^T @ h`. Backward then only scales those by the incoming gradient.
So no `(N, V)` tensor is ever held, for the student or the teacher (whose logits, when it runs
online, are also produced chunk by chunk through `teacher_chunk`), and the head's matmul is not
recomputed in backward (3 matmuls per chunk, as in an unfused step).

The default (forward KL, no logit soft-capping) has a hand-derived gradient:
  d/dz [w_ce*CE] = w_ce*(softmax(z) - onehot(y))
  d/dz [w_kd*T^2*KL(p_t||softmax(z/T))] = w_kd*T*(softmax(z/T) - p_t)
Other divergences and soft-capped heads use autograd on the chunk's logits (`losses.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from hld.distill.losses import TeacherLogits, ce_sum, kd_sum, softcap

TeacherChunkFn = Callable[[slice], Optional[TeacherLogits]]


@dataclass(frozen=True)
class HeadLossSpec:
    ce_weight: float = 1.0
    kd_weight: float = 0.0
    temperature: float = 1.0
    divergence: str = "forward_kl"
    jsd_beta: float = 0.5
    top_k: Optional[int] = None
    softcap: Optional[float] = None
    chunk_tokens: int = 256


def _bdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise dot product (n, V) x (n, V) -> (n,) without a (n, V) temporary."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def _fast_chunk(z: torch.Tensor, y: torch.Tensor, m: torch.Tensor, teacher: Optional[TeacherLogits],
                spec: HeadLossSpec, want_grad: bool):
    """Forward-KL + CE on one chunk, with the gradient by hand. z (n, V) fp32."""
    n = z.shape[0]
    rows = torch.arange(n, device=z.device)
    lse = torch.logsumexp(z, dim=-1)  # (n,)
    ce = torch.where(m, lse - z[rows, y.clamp_min(0)], 0.0).sum()
    g = None
    if want_grad and spec.ce_weight:
        g = torch.exp(z - lse[:, None]).mul_(spec.ce_weight)  # (n, V)
        g[rows, y.clamp_min(0)] -= spec.ce_weight
    kd = z.new_zeros(())
    if spec.kd_weight and teacher is not None:
        T = spec.temperature
        zT, lseT = (z, lse) if T == 1 else (z / T, torch.logsumexp(z / T, dim=-1))
        if teacher.dense is not None:
            zt = teacher.dense.float() / T  # (n, V)
            lset = torch.logsumexp(zt, dim=-1)
            pt = torch.exp(zt - lset[:, None])
            per = _bdot(pt, zt) - _bdot(pt, zT) - lset + lseT  # sum p_t (log p_t - log q)
        else:
            logpt = torch.log_softmax(teacher.values.float() / T, dim=-1)  # (n, k)
            pt = logpt.exp()
            per = (pt * (logpt - (zT.gather(-1, teacher.indices) - lseT[:, None]))).sum(-1)
        kd = torch.where(m, per, 0.0).sum() * T * T
        if want_grad:
            gk = torch.exp(zT - lseT[:, None])  # q = softmax(z/T)
            if teacher.dense is not None:
                gk.sub_(pt)
            else:
                gk.scatter_add_(-1, teacher.indices, -pt)
            gk.mul_(spec.kd_weight * T)
            g = gk if g is None else g.add_(gk)
    if g is not None:
        g.mul_(m[:, None])
    return ce, kd, g


def _autograd_chunk(z: torch.Tensor, y: torch.Tensor, m: torch.Tensor, teacher: Optional[TeacherLogits],
                    spec: HeadLossSpec, want_grad: bool):
    """Any divergence / soft-capped head: gradient of the chunk's loss by autograd on its logits."""
    with torch.enable_grad():
        zr = z.detach().requires_grad_(want_grad)
        zc = softcap(zr, spec.softcap)
        ce = ce_sum(zc, y, m)
        kd = zc.new_zeros(())
        if spec.kd_weight and teacher is not None:
            kd = kd_sum(zc, teacher, m, temperature=spec.temperature, divergence=spec.divergence,
                        jsd_beta=spec.jsd_beta)
        total = spec.ce_weight * ce + spec.kd_weight * kd
        g = torch.autograd.grad(total, zr)[0] if want_grad else None
    return ce.detach(), kd.detach(), g


class _FusedHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, W, y, m, spec: HeadLossSpec, teacher_chunk: TeacherChunkFn, stats: dict):
        want_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        fast = spec.softcap is None and spec.divergence == "forward_kl"
        chunk_fn = _fast_chunk if fast else _autograd_chunk
        Wc = W.to(h.dtype)
        grad_h = torch.zeros_like(h) if want_grad else None
        grad_W = torch.zeros(W.shape, dtype=torch.float32, device=W.device) if want_grad else None
        ce_tot = h.new_zeros((), dtype=torch.float32)
        kd_tot = h.new_zeros((), dtype=torch.float32)
        for start in range(0, h.shape[0], spec.chunk_tokens):
            sl = slice(start, min(start + spec.chunk_tokens, h.shape[0]))
            if not bool(m[sl].any()):
                continue
            z = (h[sl] @ Wc.T).float()  # (n, V)
            teacher = teacher_chunk(sl) if spec.kd_weight else None
            if teacher is not None:
                teacher = teacher.top_k(spec.top_k)
            ce, kd, g = chunk_fn(z, y[sl], m[sl], teacher, spec, want_grad)
            del z, teacher
            ce_tot += ce
            kd_tot += kd
            if want_grad:
                gc = g.to(h.dtype)
                grad_h[sl] = gc @ Wc  # (n, d)
                if gc.dtype == torch.float32:
                    grad_W.addmm_(gc.T, h[sl])  # (V, d) += (V, n) @ (n, d)
                else:
                    grad_W.add_(gc.T @ h[sl])  # low-precision matmul, fp32 accumulation across chunks
            del g
        stats["ce"] = float(ce_tot)
        stats["kd"] = float(kd_tot)
        if want_grad:
            ctx.save_for_backward(grad_h, grad_W.to(W.dtype))
        return spec.ce_weight * ce_tot + spec.kd_weight * kd_tot

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_W = ctx.saved_tensors
        return grad_h * grad_out.to(grad_h.dtype), grad_W * grad_out.to(grad_W.dtype), None, None, None, None, None


def head_loss(h: torch.Tensor, W: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, spec: HeadLossSpec,
              teacher_chunk: Optional[TeacherChunkFn] = None) -> tuple[torch.Tensor, dict]:
    """Weighted CE + KD **sums** over valid rows, from final hidden states. h (N, d), W (V, d).

    Returns `(w_ce*CE_sum + w_kd*KD_sum, {"ce": CE_sum, "kd": KD_sum})`.
    """
    stats: dict = {}
    fn = teacher_chunk if teacher_chunk is not None else (lambda sl: None)
    total = _FusedHeadLoss.apply(h, W, targets, mask, spec, fn, stats)
    return total, stats
