"""Time per token of the fused LM head + loss (forward + backward) against its own floor: the
head's three matmuls (logits h @ W.T, dL/dh = g @ W, dL/dW = g.T @ h) in the same dtype, timed in
the same run on the same shapes. The ratio is what the elementwise work (softmax, KL, gradient,
casts) costs on top of the arithmetic that cannot be avoided. A second ratio adds to the floor one
fp32 softmax over every logit (one exp each, in cache): at a small width (d = 64) that exp costs a
third of the bf16 matmuls, so no softmax-based loss gets near the matmul floor alone there.

Cases: CE only; CE + forward KL with a dense teacher; CE + forward KL with a top-k teacher (values,
indices and rest, as a cache serves them). The teacher's logits for one chunk are made once and
served for every chunk, so its own head is not in the figure. fp32 always; bf16 where the CPU has
native bf16 (`hld.precision.cpu_has_fast_bf16`) or on CUDA. Each figure is the minimum over
`--repeats` (the machine may be shared).

    python benchmarks/head.py                       # d=64, V=262144, 256-token chunks, 1 thread
    python benchmarks/head.py --json
"""

from __future__ import annotations

import argparse
import json

import _measure as M
import torch


def make(*, n_tokens: int, vocab_size: int, d_model: int, dtype: torch.dtype, dev: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n_tokens, d_model, generator=g).to(dev, dtype).requires_grad_()  # (N, d)
    W = (torch.randn(vocab_size, d_model, generator=g) * 0.05).to(dev, dtype).requires_grad_()  # (V, d)
    y = torch.randint(0, vocab_size, (n_tokens,), generator=g).to(dev)  # (N,)
    return h, W, y


def teacher_fn(kind: str, *, chunk: int, vocab_size: int, top_k: int, dev: torch.device):
    """teacher_chunk for head_loss: the same (chunk, V) logits, or their top-k + rest, for every chunk."""
    from hld.distill.signals import TeacherLogits
    from hld.distill.signals.online import Dense

    if kind == "ce":
        return None
    g = torch.Generator().manual_seed(1)
    zt = (torch.randn(chunk, vocab_size, generator=g) * 2.0).to(dev)  # (chunk, V) fp32
    t = Dense(zt) if kind == "dense" else Dense(zt).top_k(top_k)

    def fn(rows: slice) -> TeacherLogits:
        return t.rows(slice(0, rows.stop - rows.start))

    return fn


def head_step(kind: str, dtype: torch.dtype, args, dev: torch.device):
    """One forward + backward of the fused head on N tokens, as a closure."""
    from hld.distill.chunked import HeadLossSpec, head_loss

    h, W, y = make(n_tokens=args.tokens, vocab_size=args.vocab_size, d_model=args.d_model, dtype=dtype, dev=dev)
    mask = torch.ones(args.tokens, dtype=torch.bool, device=dev)
    fn = teacher_fn(kind, chunk=args.chunk_tokens, vocab_size=args.vocab_size, top_k=args.top_k, dev=dev)
    spec = HeadLossSpec(
        ce_weight=1.0 if kind == "ce" else 0.5, kd_weight=0.0 if kind == "ce" else 0.5, chunk_tokens=args.chunk_tokens
    )

    def step():
        loss, _ = head_loss(h, W, y, mask, spec, fn)
        return torch.autograd.grad(loss, (h, W))

    return step


def floor_steps(dtype: torch.dtype, args, dev: torch.device) -> list:
    """The three matmuls of every chunk as the head calls them, in `dtype` (fp32: logits into a kept
    fp32 buffer, dL/dW by addmm_; low precision: products in that dtype into kept buffers), and a
    fourth step that is not a matmul: one fp32 softmax over every logit, in cache-resident row blocks as
    the head runs it (one exp per logit: the least elementwise work any softmax loss does)."""
    from hld.distill.losses import row_block

    h, W, _ = make(n_tokens=args.tokens, vocab_size=args.vocab_size, d_model=args.d_model, dtype=dtype, dev=dev)
    h, W = h.detach(), W.detach()
    n = args.chunk_tokens
    z = torch.randn(n, args.vocab_size, device=dev).to(dtype)  # (chunk, V)
    gW = torch.zeros(W.shape, dtype=dtype, device=dev)
    gh = torch.empty(n, args.d_model, dtype=dtype, device=dev)
    chunks = [slice(c, c + n) for c in range(0, args.tokens, n)]

    def logits():
        for sl in chunks:
            torch.mm(h[sl], W.T, out=z)

    def grad_h():
        for _ in chunks:
            torch.mm(z, W, out=gh)

    def grad_W():
        for sl in chunks:
            torch.mm(z.T, h[sl], out=gW) if dtype != torch.float32 else gW.addmm_(z.T, h[sl])

    rows = row_block(n, dev)
    blk = torch.randn(rows, args.vocab_size, device=dev)  # (rows, V) fp32

    def softmax():
        for _ in chunks:
            for _ in range(0, n, rows):
                torch.softmax(blk, -1, out=blk)

    return [logits, grad_h, grad_W, softmax]


def measure(dtype: torch.dtype, args, dev: torch.device) -> dict:
    """Seconds per token: min over repeats, the floor's matmuls and each case interleaved in every
    repeat so that a neighbour's load hits both alike."""
    work = {f"mm{i}": f for i, f in enumerate(floor_steps(dtype, args, dev))}
    work.update({kind: head_step(kind, dtype, args, dev) for kind in ("ce", "dense", "topk")})
    for f in work.values():
        f()  # warm-up: the workspace buffers are allocated once
    best = {k: float("inf") for k in work}
    for _ in range(args.repeats):
        for k, f in work.items():
            best[k] = min(best[k], M.timed(f, dev)[0] / args.tokens)
    return best


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=512, help="N, tokens (rows) per forward+backward")
    p.add_argument("--vocab-size", type=int, default=262144)
    p.add_argument("--d-model", type=int, default=64, help="the student's width (the demo's)")
    p.add_argument("--chunk-tokens", type=int, default=256, help="rows per chunk (train.loss_chunk_tokens)")
    p.add_argument("--top-k", type=int, default=64, help="k of the top-k teacher case")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats; the minimum is reported")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated; bfloat16 only where native")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    dev = M.device()
    from hld.precision import cpu_has_fast_bf16

    native = dev.type == "cuda" or cpu_has_fast_bf16()
    dtypes = [d for d in (torch.float32, torch.bfloat16) if d == torch.float32 or native]
    dtypes = [d for d in dtypes if str(d).replace("torch.", "") in args.dtypes.split(",")]
    rows, out = [], {"machine": M.machine(), "args": vars(args), "results": []}
    for dtype in dtypes:
        best = measure(dtype, args, dev)
        parts = [best[f"mm{i}"] for i in range(3)]
        floor = sum(parts)
        sm = best["mm3"]  # the softmax step
        for kind in ("ce", "dense", "topk"):
            t = best[kind]
            r = {
                "dtype": str(dtype).replace("torch.", ""),
                "case": kind,
                "ms_per_token": t * 1e3,
                "floor_ms_per_token": floor * 1e3,
                "floor_parts_ms": [x * 1e3 for x in parts],
                "ratio_to_floor": t / floor,
                "softmax_ms_per_token": sm * 1e3,
                "ratio_to_floor_and_softmax": t / (floor + sm),
            }
            out["results"].append(r)
            rows.append(
                [
                    r["dtype"],
                    kind,
                    f"{t * 1e3:.3f}",
                    f"{floor * 1e3:.3f}",
                    " / ".join(f"{x * 1e3:.3f}" for x in parts),
                    f"{t / floor:.2f}",
                    f"{sm * 1e3:.3f}",
                    f"{t / (floor + sm):.2f}",
                ]
            )
    print(
        f"{out['machine']}\nN={args.tokens} V={args.vocab_size} d={args.d_model} chunk={args.chunk_tokens} "
        f"threads={args.threads}, min of {args.repeats}"
    )
    print(
        M.table(
            rows,
            ["dtype", "case", "head ms/tok", "floor ms/tok", "3 matmuls", "ratio", "softmax", "ratio to floor+softmax"],
        )
    )
    if args.json:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
