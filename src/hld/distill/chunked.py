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
    matmul_dtype: Optional[torch.dtype] = None  # e.g. bf16 on GPUs: head matmuls in it, softmax in fp32


def _bdot(a: torch.Tensor, b: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """Row-wise dot product (n, V) x (n, V) -> (n,) without a (n, V) temporary. The vocabulary is
    cut into blocks whose partial sums are added in float64: one fp32 dot over 262,144 terms lost
    ~5e-4 relative accuracy on a CPU."""
    n, V = a.shape
    if V % block or not (a.is_contiguous() and b.is_contiguous()):
        block = V
    nb = V // block
    parts = torch.bmm(a.reshape(n * nb, 1, block), b.reshape(n * nb, block, 1))  # (n*nb, 1, 1)
    return parts.view(n, nb).sum(-1, dtype=torch.float64).to(a.dtype)


class _Workspace:
    """Reusable (chunk, V) fp32 buffers. Fresh multi-hundred-MB tensors per chunk cost more in page
    faults than the arithmetic on a CPU (measured: exp into a new tensor 3x slower than out=)."""

    def __init__(self) -> None:
        self.bufs: dict[tuple, torch.Tensor] = {}

    def get(self, name: str, n: int, V: int, device: torch.device) -> torch.Tensor:
        key = (name, V, device)
        buf = self.bufs.get(key)
        if buf is None or buf.shape[0] < n:
            buf = torch.empty(n, V, dtype=torch.float32, device=device)
            self.bufs[key] = buf
        return buf[:n]

    def clear(self) -> None:
        self.bufs.clear()


WORKSPACE = _Workspace()


def _softmax_into(z: torch.Tensor, out: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """out <- softmax(z * scale); returns logsumexp(z * scale) (n,). No temporaries of size (n, V)."""
    zmax = z.amax(dim=-1, keepdim=True)  # (n, 1)
    torch.sub(z, zmax, out=out)
    if scale != 1.0:
        out.mul_(scale)
    out.exp_()
    total = out.sum(dim=-1, keepdim=True)  # (n, 1)
    out.div_(total)
    return (zmax * scale + total.log()).squeeze(-1)


def _fast_chunk(z: torch.Tensor, y: torch.Tensor, m: torch.Tensor, teacher: Optional[TeacherLogits],
                spec: HeadLossSpec, want_grad: bool):
    """Forward-KL + CE on one chunk, the gradient by hand, in reused buffers. z (n, V) fp32, kept intact."""
    n, V = z.shape
    rows = torch.arange(n, device=z.device)
    yc = y.clamp_min(0)
    T = spec.temperature
    kd_on = bool(spec.kd_weight) and teacher is not None
    p = WORKSPACE.get("p", n, V, z.device)
    lse = _softmax_into(z, p)  # p = softmax(z)
    ce = torch.where(m, lse - z[rows, yc], 0.0).sum()
    kd = z.new_zeros(())
    g = p if want_grad else None  # the gradient is built in p's buffer
    if kd_on:
        q, lseT = (p, lse) if T == 1 else (WORKSPACE.get("q", n, V, z.device), None)
        if T != 1:
            lseT = _softmax_into(z, q, 1 / T)  # q = softmax(z / T)
        if teacher.dense is not None:
            zt = teacher.dense.float()  # (n, V)
            pt = WORKSPACE.get("pt", n, V, z.device)
            lset = _softmax_into(zt, pt, 1 / T)
            # KL(p_t || q) = sum p_t log p_t - sum p_t log q, with log p_t = zt/T - lset, log q = z/T - lseT
            per = (_bdot(pt, zt) - _bdot(pt, z)) / T - lset + lseT
        else:
            logpt = torch.log_softmax(teacher.values.float() / T, dim=-1)  # (n, k)
            pt = logpt.exp()
            per = (pt * (logpt - (z.gather(-1, teacher.indices) / T - lseT[:, None]))).sum(-1)
        kd = torch.where(m, per, 0.0).sum() * T * T
        if want_grad:
            # d/dz: w_ce * (p - onehot) + w_kd * T * (q - p_t)
            wk = spec.kd_weight * T
            if T == 1:
                g.mul_(spec.ce_weight + wk)
            else:
                g.mul_(spec.ce_weight).add_(q, alpha=wk)
            if teacher.dense is not None:
                g.sub_(pt, alpha=wk)
            else:
                g.scatter_add_(-1, teacher.indices, pt.mul_(-wk))
    elif want_grad:
        g.mul_(spec.ce_weight)
    if want_grad:
        g[rows, yc] -= spec.ce_weight
        if not bool(m.all()):
            g[~m] = 0.0
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


def logits_into(h: torch.Tensor, W: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out <- h @ W.T in fp32 (n, V); low-precision inputs are multiplied in their dtype."""
    if h.dtype == torch.float32:
        return torch.mm(h, W.T, out=out)
    return out.copy_(h @ W.T)


class _FusedHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, W, y, m, spec: HeadLossSpec, teacher_chunk: TeacherChunkFn, stats: dict, grad_mode: bool):
        # grad_mode: whether autograd was on at the call (inside forward it is always off); under
        # torch.no_grad (validation) the gradient is not built, which halves the head's work
        want_grad = grad_mode and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1])
        fast = spec.softcap is None and spec.divergence == "forward_kl"
        chunk_fn = _fast_chunk if fast else _autograd_chunk
        h_dtype = h.dtype
        if spec.matmul_dtype is not None:
            h = h.to(spec.matmul_dtype)
        Wc = W.to(h.dtype)
        grad_h = torch.zeros_like(h) if want_grad else None
        grad_W = torch.zeros(W.shape, dtype=torch.float32, device=W.device) if want_grad else None
        ce_tot = h.new_zeros((), dtype=torch.float32)
        kd_tot = h.new_zeros((), dtype=torch.float32)
        for start in range(0, h.shape[0], spec.chunk_tokens):
            sl = slice(start, min(start + spec.chunk_tokens, h.shape[0]))
            if not bool(m[sl].any()):
                continue
            z = logits_into(h[sl], Wc, WORKSPACE.get("z", sl.stop - sl.start, W.shape[0], W.device))
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
            ctx.save_for_backward(grad_h.to(h_dtype), grad_W.to(W.dtype))
        return spec.ce_weight * ce_tot + spec.kd_weight * kd_tot

    @staticmethod
    def backward(ctx, grad_out):
        if getattr(ctx, "done", False):  # the saved gradients were scaled in place below
            raise RuntimeError("the fused head loss supports one backward pass (no retain_graph reuse)")
        ctx.done = True
        grad_h, grad_W = ctx.saved_tensors
        if float(grad_out) != 1.0:  # in place: a second (V, d) copy of dL/dW would cost memory
            grad_h.mul_(grad_out.to(grad_h.dtype))
            grad_W.mul_(grad_out.to(grad_W.dtype))
        return grad_h, grad_W, None, None, None, None, None, None


def head_loss(h: torch.Tensor, W: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, spec: HeadLossSpec,
              teacher_chunk: Optional[TeacherChunkFn] = None) -> tuple[torch.Tensor, dict]:
    """Weighted CE + KD **sums** over valid rows, from final hidden states. h (N, d), W (V, d).

    Returns `(w_ce*CE_sum + w_kd*KD_sum, {"ce": CE_sum, "kd": KD_sum})`.
    """
    stats: dict = {}
    fn = teacher_chunk if teacher_chunk is not None else (lambda sl: None)
    total = _FusedHeadLoss.apply(h, W, targets, mask, spec, fn, stats, torch.is_grad_enabled())
    return total, stats
