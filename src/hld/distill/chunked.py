"""Fused, chunked LM head + loss: the student's logits exist one chunk of tokens at a time.

`head_loss` takes the student's final hidden states `h (N, d)` and the head weight `W (V, d)`; for
each chunk of `chunk_tokens` rows it computes the logits `(chunk, V)` (in the matmul's dtype: fp32,
or `matmul_dtype`), the CE and KD sums in fp32, and — in the same pass — their gradient with respect
to the logits, written over them, which it folds straight into `dL/dh = g @ W` and
`dL/dW += g^T @ h`. Backward then only scales those by the incoming gradient.
So no `(N, V)` tensor is ever held, for the student or the teacher (whose logits, when it runs
online, are also produced chunk by chunk through `teacher_chunk`), and the head's matmul is not
recomputed in backward (3 matmuls per chunk, as in an unfused step).

The default (forward KL, no logit soft-capping) has a hand-derived gradient:
  d/dz [w_ce*CE] = w_ce*(softmax(z) - onehot(y))
  d/dz [w_kd*T^2*KL(p_t||softmax(z/T))] = w_kd*T*(softmax(z/T) - p_t)
Other divergences and soft-capped heads use autograd on the chunk's logits (`losses.py`).

Each teacher-signal kind writes its own part of a row block (`TeacherLogits.fused_rows`: the full
distribution in hld.distill.signals.online, top-k + rest in .topk with its derivation, sampled ids in
.sampled); this module computes the logits, the student's softmaxes and CE, and folds the gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch

from hld.distill.divergences.base import Divergence
from hld.distill.divergences.forward_kl import ForwardKL
from hld.distill.divergences.registry import parse as parse_divergence
from hld.distill.losses import ce_sum, kd_sum, row_block, softcap
from hld.distill.signals.base import TeacherLogits

TeacherChunkFn = Callable[[slice], Optional[TeacherLogits]]


@dataclass(frozen=True)
class HeadLossSpec:
    ce_weight: float = 1.0
    kd_weight: float = 0.0
    temperature: float = 1.0
    divergence: Divergence = ForwardKL()  # hld.distill.divergences
    top_k: Optional[int] = None
    top_k_rest: str = "bucket"  # a top-k teacher's mass off its k ids: one extra outcome, or renormalised away
    softcap: Optional[float] = None
    chunk_tokens: int = 256
    matmul_dtype: Optional[torch.dtype] = None  # e.g. bf16 on GPUs: head matmuls in it, softmax in fp32

    def __post_init__(self) -> None:
        if isinstance(self.divergence, str):  # a spec such as "jsd(beta=0.3)": its registered object
            object.__setattr__(self, "divergence", parse_divergence(self.divergence))


class _Workspace:
    """Reusable (chunk, V) and (ROWS, V) buffers. Fresh multi-hundred-MB tensors per chunk cost more in page faults
    than the arithmetic on a CPU (measured: exp into a new tensor 3x slower than out=; a cast to
    bf16 by `.to()` 10x slower than `copy_` into a kept buffer)."""

    def __init__(self) -> None:
        self.bufs: dict[tuple, torch.Tensor] = {}

    def get(self, name: str, n: int, V: int, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        key = (name, V, device, dtype)
        buf = self.bufs.get(key)
        if buf is None or buf.shape[0] < n:
            buf = torch.empty(n, V, dtype=dtype, device=device)
            self.bufs[key] = buf
        return buf[:n]

    def clear(self) -> None:
        self.bufs.clear()


WORKSPACE = _Workspace()


def softmax_into(z: torch.Tensor, out: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """out <- softmax(z * scale); returns logsumexp(z * scale) (n,). No temporaries of size (n, V).

    torch.softmax is one fused pass (measured on one core: 3x faster than amax, sub, exp, sum, div
    as separate passes); it computes exp(x - max) / sum, so its largest entry is 1 / sum and
    logsumexp = max - log(max(softmax)) exactly up to rounding, read with two cheap amax passes."""
    if scale != 1.0:
        torch.mul(z, scale, out=out)
        z = out
    zmax = z.amax(dim=-1)  # (n,)
    torch.softmax(z, dim=-1, out=out)
    return zmax - out.amax(dim=-1).log()


def sum64(x: torch.Tensor) -> torch.Tensor:
    """Row sums (n,) in float64 of partial fp32 sums over 1024 entries (one fp32 accumulation over
    262,144 terms lost ~5e-4 relative accuracy on a CPU)."""
    parts = x.view(x.shape[0], -1, 1024).sum(-1) if x.shape[1] % 1024 == 0 else x
    return parts.sum(-1, dtype=torch.float64)


def _fast_chunk(
    zbuf: torch.Tensor,
    y: torch.Tensor,
    m: torch.Tensor,
    teacher: Optional[TeacherLogits],
    spec: HeadLossSpec,
    want_grad: bool,
):
    """Forward-KL + CE on one chunk, the gradient by hand. zbuf (n, V): the logits, fp32 or the head's
    matmul dtype, overwritten (with dL/dz in its own dtype when `want_grad`, so the two gradient
    matmuls read it as it is: no (n, V) fp32 gradient buffer, no separate cast pass).

    On a CPU the elementwise work runs ROWS rows at a time in (ROWS, V) fp32 buffers that stay in
    cache, the softmax in place: the logits are read from memory once and the gradient written once,
    where whole-chunk passes (cast, softmax, the teacher's softmax, the KL's products) each went
    through memory (measured on one core, bf16 CE: 0.18 against 0.28 ms per 262,144-wide row)."""
    n, V = zbuf.shape
    T = spec.temperature
    kd_on = bool(spec.kd_weight) and teacher is not None
    cpu = zbuf.device.type == "cpu"
    R = row_block(n, zbuf.device)
    bufs = {
        "z": None if zbuf.dtype == torch.float32 else WORKSPACE.get("z_rows", R, V, zbuf.device),
        "p": None if cpu else WORKSPACE.get("p_rows", R, V, zbuf.device),  # torch's CPU softmax runs in place
        "q": WORKSPACE.get("q_rows", R, V, zbuf.device) if kd_on and T != 1 else None,
    }
    yc = y.clamp_min(0)[:, None]
    zy = zbuf.gather(-1, yc)[:, 0].double()  # read before the softmax overwrites the logits
    lse = torch.empty(n, dtype=torch.float64, device=zbuf.device)
    kd_rows = torch.zeros(n, dtype=torch.float64, device=zbuf.device)
    ce_src = zbuf.new_full((R, 1), -spec.ce_weight, dtype=torch.float32)
    for i in range(0, n, R):
        sl = slice(i, min(i + R, n))
        z = zbuf[sl] if bufs["z"] is None else bufs["z"][: sl.stop - i].copy_(zbuf[sl])  # (r, V) fp32
        p = _rows_loss(z, sl, teacher if kd_on else None, spec, bufs, lse, kd_rows, want_grad)
        if want_grad:
            p.scatter_add_(-1, yc[sl], ce_src[: sl.stop - i])  # rows without a target: _FusedHeadLoss masks
            if p.data_ptr() != zbuf[sl].data_ptr():
                zbuf[sl].copy_(p)
    ce = torch.where(m, lse - zy, 0.0).sum().float()
    kd = (torch.where(m, kd_rows, 0.0).sum() * T * T).float() if kd_on else zbuf.new_zeros((), dtype=torch.float32)
    return ce, kd, (zbuf if want_grad else None)


def _rows_loss(
    z: torch.Tensor,
    sl: slice,
    teacher: Optional[TeacherLogits],
    spec: HeadLossSpec,
    bufs: dict,
    lse: torch.Tensor,
    kd_rows: torch.Tensor,
    want_grad: bool,
) -> torch.Tensor:
    """One row block of `_fast_chunk`: lse[sl] and (by the teacher's kind) kd_rows[sl] (KL before the
    T^2) written, and the block's gradient (without the -w_ce at the targets) returned in p =
    softmax(z)'s buffer (z's own on a CPU). z (r, V) fp32 is the student's logits, destroyed."""
    T, r = spec.temperature, z.shape[0]

    def student() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q = lseT = None
        if T != 1:
            q = bufs["q"][:r]
            lseT = softmax_into(z, q, 1 / T)  # q = softmax(z / T)
        p = z if bufs["p"] is None else bufs["p"][:r]
        lse[sl] = softmax_into(z, p)  # p = softmax(z); z is gone when p is z
        if T == 1:
            return p, p, lse[sl].float()
        return p, q, lseT

    if teacher is None:
        p = z if bufs["p"] is None else bufs["p"][:r]
        lse[sl] = softmax_into(z, p)
        if want_grad and spec.ce_weight != 1:
            p.mul_(spec.ce_weight)
        return p
    return teacher.fused_rows(z, sl, spec, student, kd_rows, want_grad)


def _autograd_chunk(
    z: torch.Tensor,
    y: torch.Tensor,
    m: torch.Tensor,
    teacher: Optional[TeacherLogits],
    spec: HeadLossSpec,
    want_grad: bool,
):
    """Any divergence / soft-capped head: gradient of the chunk's loss by autograd on its logits."""
    with torch.enable_grad():
        zr = z.detach().requires_grad_(want_grad)
        zc = softcap(zr, spec.softcap)
        ce = ce_sum(zc, y, m)
        kd = zc.new_zeros(())
        if spec.kd_weight and teacher is not None:
            kd = kd_sum(
                zc,
                teacher,
                m,
                temperature=spec.temperature,
                divergence=spec.divergence,
                top_k_rest=spec.top_k_rest,
            )
        total = spec.ce_weight * ce + spec.kd_weight * kd
        g = torch.autograd.grad(total, zr)[0] if want_grad else None
    return ce.detach(), kd.detach(), g


def logits_into(h: torch.Tensor, W: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out <- h @ W.T in fp32 (n, V); low-precision inputs are multiplied in their dtype, into a
    kept buffer of that dtype (a fresh (n, V) product per chunk costs page faults), then copied."""
    if h.dtype == torch.float32:
        return torch.mm(h, W.T, out=out)
    low = WORKSPACE.get("low", h.shape[0], W.shape[0], h.device, h.dtype)  # shared with the gradient's cast
    return out.copy_(torch.mm(h, W.T, out=low))


def _fold_grad(
    g: torch.Tensor,
    h: torch.Tensor,
    Wc: torch.Tensor,
    sl: slice,
    grad_h: torch.Tensor,
    grad_W: Optional[torch.Tensor],
    first: bool,
) -> None:
    """dL/dh[sl] = g @ W and dL/dW (=, when `first`, else +=) g^T @ h[sl], in h's dtype; g (n, V) fp32
    or already in h's dtype (the fast path writes it there). `grad_W` None: a frozen head, dL/dh only."""
    if h.dtype == torch.float32:
        torch.mm(g, Wc, out=grad_h[sl])  # (n, d)
        if grad_W is None:
            return
        if first:
            torch.mm(g.T, h[sl], out=grad_W)  # (V, d) = (V, n) @ (n, d)
        else:
            grad_W.addmm_(g.T, h[sl])
        return
    gc = g if g.dtype == h.dtype else WORKSPACE.get("low", g.shape[0], g.shape[1], g.device, h.dtype).copy_(g)
    torch.mm(gc, Wc, out=grad_h[sl])
    if grad_W is None:
        return
    V, block = Wc.shape[0], 16384  # dL/dW in vocabulary blocks: a (block, d) low-precision temporary, not (V, d)
    part = WORKSPACE.get("gW_low", min(block, V), Wc.shape[1], g.device, h.dtype)
    for v in range(0, V, block):
        vb = slice(v, min(v + block, V))
        pv = torch.mm(gc[:, vb].T, h[sl], out=part[: vb.stop - v])  # low-precision matmul, fp32 accumulation
        grad_W[vb].copy_(pv) if first else grad_W[vb].add_(pv)


class _FusedHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, W, y, m, spec: HeadLossSpec, teacher_chunk: TeacherChunkFn, stats: dict, grad_mode: bool):
        # grad_mode: whether autograd was on at the call (inside forward it is always off); under
        # torch.no_grad (validation) the gradient is not built, which halves the head's work
        want_grad = grad_mode and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1])
        fast = spec.softcap is None and spec.divergence.fused
        chunk_fn = _fast_chunk if fast else _autograd_chunk
        h_dtype = h.dtype
        if spec.matmul_dtype is not None:
            h = h.to(spec.matmul_dtype)
        Wc = W.to(h.dtype)
        grad_h = torch.zeros_like(h) if want_grad else None
        # rows without a target get a (finite) gradient row in the fast path; they are dropped at (n, d)
        # cost instead of (n, V): zero rows of h for dL/dW, and dL/dh masked at the end. Deciding on the
        # host which rows or chunks to skip would read the mask back: a host sync per chunk on a GPU.
        hm = h * m[:, None].to(h.dtype) if want_grad else h  # (N, d)
        # dL/dW is written by the first chunk with a target, added to by the others: no (V, d) zero fill
        want_W = want_grad and ctx.needs_input_grad[1]  # a frozen head (train.freeze_embedding): no dL/dW
        grad_W = torch.empty(W.shape, dtype=torch.float32, device=W.device) if want_W else None
        first = True
        ce_tot = h.new_zeros((), dtype=torch.float32)
        kd_tot = h.new_zeros((), dtype=torch.float32)
        for start in range(0, h.shape[0], spec.chunk_tokens):
            sl = slice(start, min(start + spec.chunk_tokens, h.shape[0]))
            n = sl.stop - sl.start
            if fast and h.dtype != torch.float32:  # the logits stay in the matmul's dtype; the gradient replaces them
                z = torch.mm(h[sl], Wc.T, out=WORKSPACE.get("z_low", n, W.shape[0], W.device, h.dtype))
            else:
                z = logits_into(h[sl], Wc, WORKSPACE.get("z", n, W.shape[0], W.device))
            teacher = teacher_chunk(sl) if spec.kd_weight else None
            if teacher is not None:
                teacher = teacher.top_k(spec.top_k)
            ce, kd, g = chunk_fn(z, y[sl], m[sl], teacher, spec, want_grad)
            del z, teacher
            ce_tot += ce
            kd_tot += kd
            if want_grad:
                _fold_grad(g, hm, Wc, sl, grad_h, grad_W, first)
                first = False
            del g
        if want_W and first:  # no row had a target
            grad_W.zero_()
        stats["ce"] = ce_tot.detach()  # tensors: read back by the caller when it logs (no sync per chunk)
        stats["kd"] = kd_tot.detach()
        if want_grad:
            grad_h.mul_(m[:, None].to(grad_h.dtype))
            ctx.save_for_backward(grad_h.to(h_dtype), grad_W.to(W.dtype) if want_W else None)
        return spec.ce_weight * ce_tot + spec.kd_weight * kd_tot

    @staticmethod
    def backward(ctx, grad_out):
        return (*scaled_saved_grads(ctx, grad_out, "the fused head loss"), None, None, None, None, None, None)


def scaled_saved_grads(ctx, grad_out: torch.Tensor, what: str) -> tuple[Optional[torch.Tensor], ...]:
    """The backward of a head whose forward saved its gradients (dL/dh, dL/dW; None where not wanted, e.g. a
    frozen head): scaled by the incoming gradient in place, so once only. In place: a second (V, d) copy of
    dL/dW would cost memory. Always: testing grad_out == 1 first would read it back to the host (the training
    loop's grad_out is 1 / the global count anyway)."""
    if getattr(ctx, "done", False):  # the saved gradients were scaled in place below
        raise RuntimeError(f"{what} supports one backward pass (no retain_graph reuse)")
    ctx.done = True
    grads = ctx.saved_tensors
    for g in grads:
        if g is not None:
            g.mul_(grad_out.to(g.dtype))
    return tuple(grads)


def head_loss(
    h: torch.Tensor,
    W: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    spec: HeadLossSpec,
    teacher_chunk: Optional[TeacherChunkFn] = None,
) -> tuple[torch.Tensor, dict]:
    """Weighted CE + KD **sums** over valid rows, from final hidden states. h (N, d), W (V, d).

    Returns `(w_ce*CE_sum + w_kd*KD_sum, {"ce": CE_sum, "kd": KD_sum})`, the sums as detached 0-dim
    tensors on h's device (a float would read them back to the host at every call).
    """
    stats: dict = {}
    fn = teacher_chunk if teacher_chunk is not None else (lambda sl: None)
    total = _FusedHeadLoss.apply(h, W, targets, mask, spec, fn, stats, torch.is_grad_enabled())
    return total, stats
