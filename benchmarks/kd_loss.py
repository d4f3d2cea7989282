"""Peak memory and time of forward+backward of CE + KD over a Gemma-3-sized vocabulary.

loss = (1-alpha) * CE + alpha * T^2 * KL(p_teacher || p_student), alpha = 0.5, T = 1, the student's
logits from final hidden states h (N, d) and its head W (V, d), the teacher's (dense) from its own
hidden states (N, d_t) and head (V, d_t), as an online teacher gives them. Variants:

- ours: `hld.distill.chunked.head_loss` (fused, chunked: no (N, V) tensor is ever held);
- naive: full logits of both models, F.cross_entropy + F.kl_div(log_softmax, log_softmax,
  log_target=True), backward — what most distillation code does;
- torchtune: `ForwardKLWithChunkedOutputLoss` + `CEWithChunkedOutputLoss` (its KD recipe). They take
  the logits as a list of chunks, so the student's (and teacher's) full logits still exist, and
  autograd keeps every chunk's softmax for backward. Its "forward KL" is the cross-entropy to the
  teacher, -sum p_t log q: KL minus the teacher's entropy, which the agreement check adds back.

Each variant runs in its own process (peaks must not mix); see `_measure.py` for how peak memory is
read. The naive variant holds ~8 (N, V) fp32 tensors (4 GiB each at N=4096), more than this
machine's RAM, so it is measured at `--naive-tokens` and every ratio is taken at that size.

    python benchmarks/kd_loss.py                   # N=4096 ours, N=2048 everyone
    python benchmarks/kd_loss.py --tokens 512 --json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import traceback

import _measure as M
import torch
import torch.nn.functional as F

ALPHA, TEMPERATURE = 0.5, 1.0


def make_inputs(
    *,
    n_tokens: int,
    vocab_size: int,
    d_student: int,
    d_teacher: int,
    dev: torch.device,
    dtype: torch.dtype,
    seed: int = 0,
) -> dict:
    """Hidden states and heads of a student and a teacher, at the scale of real models' final layers
    (unit-RMS hidden states after the final norm, heads with std 0.05)."""
    g = torch.Generator().manual_seed(seed)
    mk = lambda *shape, std=1.0: (torch.randn(*shape, generator=g) * std).to(dev, dtype)
    return {
        "h": mk(n_tokens, d_student).requires_grad_(),  # (N, d)
        "W": mk(vocab_size, d_student, std=0.05).requires_grad_(),  # (V, d)
        "h_t": mk(n_tokens, d_teacher),  # (N, d_t)
        "W_t": mk(vocab_size, d_teacher, std=0.1),  # (V, d_t)  sharper than the student
        "y": torch.randint(0, vocab_size, (n_tokens,), generator=g).to(dev),  # (N,)
    }


def run_ours(x: dict, chunk_tokens: int) -> torch.Tensor:
    from hld.distill.chunked import HeadLossSpec, head_loss
    from hld.distill.signals import TeacherSignals
    from hld.distill.signals.online import OnlineLogits

    n = x["h"].shape[0]
    teacher = TeacherSignals(source=OnlineLogits(x["h_t"][None], x["W_t"]))  # (1, N, d_t)
    spec = HeadLossSpec(ce_weight=1 - ALPHA, kd_weight=ALPHA, temperature=TEMPERATURE, chunk_tokens=chunk_tokens)
    mask = torch.ones(n, dtype=torch.bool, device=x["h"].device)
    total, _ = head_loss(x["h"], x["W"], x["y"], mask, spec, teacher.logits)
    loss = total / n  # head_loss returns sums
    loss.backward()
    return loss.detach()


def run_naive(x: dict) -> torch.Tensor:
    zs = (x["h"] @ x["W"].T).float()  # (N, V)
    with torch.no_grad():
        zt = (x["h_t"] @ x["W_t"].T).float()  # (N, V)
    ce = F.cross_entropy(zs, x["y"])
    kd = (
        F.kl_div(
            F.log_softmax(zs / TEMPERATURE, -1),
            F.log_softmax(zt / TEMPERATURE, -1),
            log_target=True,
            reduction="batchmean",
        )
        * TEMPERATURE**2
    )
    loss = (1 - ALPHA) * ce + ALPHA * kd
    loss.backward()
    return loss.detach()


def run_torchtune(x: dict, n_chunks: int) -> torch.Tensor:
    from torchtune.modules.loss import CEWithChunkedOutputLoss, ForwardKLWithChunkedOutputLoss

    h = x["h"][None]  # (1, N, d): torchtune chunks along the sequence
    student = [hc @ x["W"].T for hc in h.chunk(n_chunks, dim=1)]  # n_chunks x (1, N/n, V)
    with torch.no_grad():
        teacher = [hc @ x["W_t"].T for hc in x["h_t"][None].chunk(n_chunks, dim=1)]
    labels = x["y"][None]  # (1, N)
    ce = CEWithChunkedOutputLoss(num_output_chunks=n_chunks)(student, labels)
    kd = ForwardKLWithChunkedOutputLoss(num_output_chunks=n_chunks)(student, teacher, labels)
    loss = (1 - ALPHA) * ce + ALPHA * kd
    loss.backward()
    return loss.detach()


@torch.no_grad()
def teacher_entropy(x: dict, chunk: int = 256) -> float:
    """Mean entropy of the teacher's distribution (what torchtune's forward KL leaves out)."""
    total = 0.0
    for s in range(0, x["h_t"].shape[0], chunk):
        logp = torch.log_softmax((x["h_t"][s : s + chunk] @ x["W_t"].T).float() / TEMPERATURE, -1)
        total += float(-(logp.exp() * logp).sum())
    return total / x["h_t"].shape[0]


def child(spec: dict) -> dict:
    """Measure one variant at one size in this (fresh) process."""
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    dev = M.device()
    dtype = M.compute_dtype(dev) if spec.get("dtype", "auto") == "auto" else getattr(torch, spec["dtype"])
    if dev.type == "cpu":
        M.guard_cpu_memory()
    x = make_inputs(
        n_tokens=spec["n_tokens"],
        vocab_size=spec["vocab_size"],
        d_student=spec["d_student"],
        d_teacher=spec["d_teacher"],
        dev=dev,
        dtype=dtype,
    )
    variant = spec["variant"]
    fn = {
        "ours": lambda: run_ours(x, spec["chunk_tokens"]),
        "naive": lambda: run_naive(x),
        "torchtune": lambda: run_torchtune(x, spec["torchtune_chunks"]),
    }[variant]
    times = []
    with M.PeakMemory(dev) as pm:
        for _ in range(spec["repeats"]):
            x["h"].grad = x["W"].grad = None
            seconds, loss = M.timed(fn, dev)
            times.append(seconds)
    out = {
        "variant": variant,
        "n_tokens": spec["n_tokens"],
        "peak_bytes": pm.bytes,
        "peak_exact": pm.exact,
        "seconds": times,
        "tokens_per_s": spec["n_tokens"] / times[-1],
        "loss": float(loss),
        "dtype": str(dtype).replace("torch.", ""),
    }
    if variant == "torchtune":
        out["teacher_entropy"] = teacher_entropy(x)
    if spec.get("grad_file"):  # for the parent's gradient check: dL/dh, and dL/dW seen through a fixed (d,) vector
        u = torch.randn(x["W"].shape[1], generator=torch.Generator().manual_seed(1)).to(x["W"].device, x["W"].dtype)
        torch.save({"h": x["h"].grad.float().cpu(), "Wu": (x["W"].grad @ u).float().cpu()}, spec["grad_file"])
    return out


def spawn(spec: dict) -> dict:
    """Run `child(spec)` in a fresh interpreter; its last stdout line is the result."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        err = proc.stderr.strip().splitlines() or ["?"]
        oom = any("can't allocate memory" in ln or "OutOfMemoryError" in ln for ln in err)
        why = "out of memory" if oom or proc.returncode < 0 else err[-1][:200]
        return {"variant": spec["variant"], "n_tokens": spec["n_tokens"], "error": f"{why} (rc={proc.returncode})"}
    return json.loads(lines[-1])


def torchtune_status() -> str:
    """'ok (versions)' or why torchtune cannot be used here."""
    try:
        from importlib.metadata import version

        import torchtune.modules.loss  # noqa: F401  (torchtune imports torchao, omegaconf, tiktoken)

        return f"ok (torchtune {version('torchtune')}, torchao {version('torchao')})"
    except Exception as exc:
        return f"unavailable: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:160]}"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def agreement(ours: dict, other: dict, grads: dict, *, entropy_offset: float = 0.0) -> dict:
    """Loss and gradients of ours against another variant (same inputs, same N)."""
    ref = other["loss"] - entropy_offset
    out = {"loss_rel_diff": abs(ours["loss"] - ref) / abs(ref)}
    g_ours, g_other = grads.get(ours["variant"]), grads.get(other["variant"])
    if g_ours is not None and g_other is not None:
        out["grad_h_rel_diff"] = rel(g_ours["h"], g_other["h"])
        out["grad_W_rel_diff"] = rel(g_ours["Wu"], g_other["Wu"])
    out["ok"] = out["loss_rel_diff"] <= 1e-4
    return out


def extrapolate(points: list[tuple[int, float]], n: int) -> float:
    """Linear fit through two (N, peak) points, read at n (peaks grow linearly in N)."""
    (n1, p1), (n2, p2) = sorted(points)[:2]
    return p2 + (p2 - p1) / (n2 - n1) * (n - n2)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=4096, help="N, tokens (rows) for ours")
    p.add_argument(
        "--naive-tokens",
        type=int,
        default=None,
        help="N for naive, torchtune and the ratios (default: 2048 on CPU, --tokens on CUDA)",
    )
    p.add_argument("--vocab-size", type=int, default=262144)
    p.add_argument("--d-student", type=int, default=640)
    p.add_argument("--d-teacher", type=int, default=640)
    p.add_argument("--chunk-tokens", type=int, default=256, help="ours: rows per chunk (train.loss_chunk_tokens)")
    p.add_argument("--torchtune-chunks", type=int, default=8, help="torchtune: num_output_chunks (its default)")
    p.add_argument("--repeats", type=int, default=2, help="timed repeats per process; the last is reported")
    p.add_argument("--no-torchtune", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16"],
        help="inputs' dtype (auto: what precision=auto picks here; float32: an AVX2-only CPU's)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def plan_runs(args, n_ref: int, with_torchtune: bool) -> list[tuple[str, int]]:
    plan = [("ours", n_ref), ("naive", n_ref)] + ([("torchtune", n_ref)] if with_torchtune else [])
    if args.tokens != n_ref:
        plan += [("ours", args.tokens), ("naive", n_ref // 2)]  # a second naive point to extrapolate to N
    return plan


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        try:
            print(json.dumps(child(json.loads(args.child))))
        except Exception:
            traceback.print_exc()
            sys.exit(1)
        return
    dev = M.device()
    n_ref = args.naive_tokens or (args.tokens if dev.type == "cuda" else min(args.tokens, 2048))
    base = {
        "vocab_size": args.vocab_size,
        "d_student": args.d_student,
        "d_teacher": args.d_teacher,
        "chunk_tokens": args.chunk_tokens,
        "torchtune_chunks": args.torchtune_chunks,
        "repeats": args.repeats,
        "threads": args.threads,
        "dtype": args.dtype,
    }
    tt = "skipped (--no-torchtune)" if args.no_torchtune else torchtune_status()
    runs, grads = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant, n in plan_runs(args, n_ref, tt.startswith("ok")):
            print(f"running {variant} at N={n} ...", file=sys.stderr, flush=True)
            grad_file = os.path.join(tmp, f"{variant}.pt") if n == n_ref else None
            runs.append(spawn({**base, "variant": variant, "n_tokens": n, "grad_file": grad_file}))
            if grad_file and os.path.exists(grad_file):
                grads[variant] = torch.load(grad_file)
    report(args, summarise(args, runs, grads, n_ref, tt))


def summarise(args, runs: list[dict], grads: dict, n_ref: int, tt: str) -> dict:
    get = lambda v, n: next((r for r in runs if r["variant"] == v and r["n_tokens"] == n and "error" not in r), None)
    ours, naive, tune = get("ours", n_ref), get("naive", n_ref), get("torchtune", n_ref)
    machine = {**M.machine(), "threads": args.threads or torch.get_num_threads()}
    res = {
        "benchmark": "kd_loss",
        "machine": machine,
        "vocab_size": args.vocab_size,
        "d_student": args.d_student,
        "d_teacher": args.d_teacher,
        "alpha": ALPHA,
        "temperature": TEMPERATURE,
        "chunk_tokens": args.chunk_tokens,
        "repeats": args.repeats,
        "tokens": args.tokens,
        "ratio_tokens": n_ref,
        "torchtune": tt,
        "runs": runs,
    }
    if ours and naive:
        res["peak_memory_ratio"] = ours["peak_bytes"] / naive["peak_bytes"]
        res["time_ratio"] = ours["seconds"][-1] / naive["seconds"][-1]
        res["agreement_naive"] = agreement(ours, naive, grads)
        res["targets_met"] = {
            "peak_memory_le_1_8": res["peak_memory_ratio"] <= 1 / 8,
            "time_le_naive": res["time_ratio"] <= 1,
        }
    if ours and tune:
        res["peak_memory_ratio_torchtune"] = ours["peak_bytes"] / tune["peak_bytes"]
        res["time_ratio_torchtune"] = ours["seconds"][-1] / tune["seconds"][-1]
        res["agreement_torchtune"] = agreement(ours, tune, grads, entropy_offset=ALPHA * tune["teacher_entropy"])
    if naive and tune:  # two independent references: do they agree with each other?
        res["agreement_naive_torchtune"] = agreement(naive, tune, grads, entropy_offset=ALPHA * tune["teacher_entropy"])
    naive_pts = [(r["n_tokens"], r["peak_bytes"]) for r in runs if r["variant"] == "naive" and "error" not in r]
    ours_big = get("ours", args.tokens)
    est = extrapolate(naive_pts, args.tokens) if len(naive_pts) >= 2 else 0.0
    if args.tokens != n_ref and ours_big and est > max(p for _, p in naive_pts):  # tiny sizes: allocator noise
        res["naive_peak_bytes_extrapolated"] = est
        res["peak_memory_ratio_extrapolated"] = ours_big["peak_bytes"] / est
    return res


def report(args, res: dict) -> None:
    n_ref = res["ratio_tokens"]
    naive = next(
        (r for r in res["runs"] if r["variant"] == "naive" and r["n_tokens"] == n_ref and "error" not in r), None
    )
    rows = []
    for r in res["runs"]:
        if "error" in r:
            rows.append([r["variant"], r["n_tokens"], "-", "-", "-", "-", "-", r["error"]])
            continue
        same = naive is not None and r["n_tokens"] == n_ref
        rows.append(
            [
                r["variant"],
                r["n_tokens"],
                f"{M.gib(r['peak_bytes']):.2f}",
                f"{r['peak_bytes'] / naive['peak_bytes']:.3f}" if same else "-",
                f"{r['seconds'][-1]:.2f}",
                f"{r['seconds'][-1] / naive['seconds'][-1]:.2f}" if same else "-",
                f"{r['tokens_per_s']:.0f}",
                f"{r['loss']:.6f}",
            ]
        )
    dtype = next((r["dtype"] for r in res["runs"] if "dtype" in r), "?")
    print(
        f"CE+KD forward+backward: V={res['vocab_size']}, d={res['d_student']}, d_t={res['d_teacher']}, "
        f"alpha={ALPHA}, T={TEMPERATURE}, {dtype}, on {res['machine']['device']}"
    )
    print(M.table(rows, ["variant", "N", "peak GiB", "mem/naive", "seconds", "time/naive", "tokens/s", "loss"]))
    print(f"ratios: ours / naive at N={n_ref}; seconds: the last of {res['repeats']} repeats in a fresh process")
    if "naive_peak_bytes_extrapolated" in res:
        print(
            f"naive at N={res['tokens']} (not run: it does not fit), extrapolated linearly from the naive runs: "
            f"{M.gib(res['naive_peak_bytes_extrapolated']):.1f} GiB -> ours/naive "
            f"{res['peak_memory_ratio_extrapolated']:.3f}"
        )
    for key, label in (
        ("agreement_naive", "ours vs naive"),
        ("agreement_torchtune", "ours vs torchtune - alpha*H(teacher)"),
        ("agreement_naive_torchtune", "naive vs torchtune - alpha*H(teacher)"),
    ):
        if key in res:
            a = res[key]
            grad = (
                f", grad h {a['grad_h_rel_diff']:.1e}, grad W {a['grad_W_rel_diff']:.1e}"
                if "grad_h_rel_diff" in a
                else ""
            )
            print(f"{label}: loss rel diff {a['loss_rel_diff']:.1e} ({'OK' if a['ok'] else 'FAIL'} at 1e-4){grad}")
    print(f"torchtune: {res['torchtune']}")
    if not all(r.get("peak_exact", True) for r in res["runs"]):
        print("note: the peak RSS could not be reset; CPU peaks are lower bounds")
    if args.json:
        print(json.dumps(res))


if __name__ == "__main__":
    main()
