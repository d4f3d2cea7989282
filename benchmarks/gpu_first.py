"""The first part of benchmarks/gpu_check.sh: the riskiest CUDA paths, each run once on the tiny
fixtures, in a few minutes, every check run whatever failed before it. Prints one row per check (pass
or FAIL, seconds, the first line of the error) and exits 1 if any failed.

    python benchmarks/gpu_first.py [--out DIR] [--skip NAME ...]

On CUDA: bf16 steps of every arm online and cached (with torch.cuda.set_sync_debug_mode("warn"): the
synchronising calls per step are counted; the CPU proxy in tests/proxies.py pins 0), sampled KD, a
cache built in 2 shards and read back, fsdp2 on one GPU under torchrun, the fused chunked head against
the naive full-logit loss, hld eval and a compiled step. On a CPU (TINY=1 gpu_check.sh) the same checks
in fp32, without the compiled step (minutes of inductor on a CPU; the slow tests cover it).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
A = ROOT / "tests" / "assets"
CUDA = torch.cuda.is_available()
PRECISION = "bfloat16" if CUDA else "float32"
TINY = [
    f"teacher.model={A / 'tiny_teacher'}",
    f"data.train={A / 'c4' / 'c4-train.*.json.gz'}",
    f"data.validation={A / 'c4' / 'c4-validation.*.json.gz'}",
    "student.preset=tiny-2l",
    "data.seq_len=32",
    "train.batch_size=4",
    "budget.tokens=256",
    "data.val_tokens=256",
    f"train.precision={PRECISION}",
    f"teacher.dtype={PRECISION}",
]
SAMPLED = "teacher.cache_signal=sampled"


def _cli(*argv: str) -> dict:
    """`hld ...` in this process; its --json summary. A non-zero exit raises with the command's stderr."""
    from hld.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([*argv, "--json"])
    if rc != 0:
        raise RuntimeError(f"exit {rc}: {err.getvalue().strip().splitlines()[-1:] or ''}")
    lines = [x for x in out.getvalue().splitlines() if x.startswith("{")]
    return json.loads(lines[-1]) if lines else {}


def _steps(method: str, *extra: str) -> str:
    """Two training steps of `method` under the sync debug mode (CUDA); the synchronising calls seen."""
    from hld.config import load_config
    from hld.train.loop import build, launch_step, read_back, train_step
    from hld.train.resources import Resources

    first = ["objective.hidden.first_share=0.5"] if method == "hld-first" else []
    s = build(load_config("smoke", [*TINY, f"objective.method={method}", *first, *extra]), Resources())
    train_step(s, 0)  # creates the optimiser's state
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        if CUDA:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            pending = launch_step(s, 1)  # the step alone: its metrics stay on the device
        finally:
            if CUDA:
                torch.cuda.set_sync_debug_mode("default")
    line = read_back([pending])[0]
    syncs = [w for w in seen if "synchroniz" in str(w.message)]
    if not torch.isfinite(torch.tensor(line["train/loss"])):
        raise RuntimeError(f"non-finite loss {line['train/loss']}")
    return f"loss {line['train/loss']:.4f}" + (f", {len(syncs)} sync warnings in a step" if CUDA else "")


def _fused_vs_naive() -> str:
    from hld.distill.chunked import HeadLossSpec, head_loss
    from hld.distill.losses import ce_sum, kd_sum
    from hld.distill.signals.online import Dense

    dev = torch.device("cuda" if CUDA else "cpu")
    g = torch.Generator(device="cpu").manual_seed(0)
    n, d, v = 512, 64, 32768
    h = torch.randn(n, d, generator=g).to(dev).requires_grad_()
    w = (torch.randn(v, d, generator=g) * 0.3).to(dev).requires_grad_()
    y = torch.randint(0, v, (n,), generator=g).to(dev)
    m, zt = (torch.rand(n, generator=g) > 0.1).to(dev), torch.randn(n, v, generator=g).to(dev)
    spec = HeadLossSpec(ce_weight=0.5, kd_weight=0.5, chunk_tokens=128, matmul_dtype=torch.bfloat16 if CUDA else None)
    got, _ = head_loss(h, w, y, m, spec, lambda sl: Dense(zt[sl]))
    g_got = torch.autograd.grad(got, (h, w))
    z = h @ w.T  # (n, V) fp32: the naive loss
    want = 0.5 * ce_sum(z, y, m) + 0.5 * kd_sum(z, Dense(zt), m)
    g_want = torch.autograd.grad(want, (h, w))
    rel = abs(got.item() - want.item()) / abs(want.item())
    grad_rel = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(g_got, g_want))
    if rel > 2e-3 or grad_rel > 2e-2:
        raise RuntimeError(f"fused vs naive: loss rel {rel:.1e}, gradient rel {grad_rel:.1e}")
    return f"loss rel {rel:.1e}, gradient rel {grad_rel:.1e}"


def _eval(run: Path) -> float:
    return _cli("eval", "--model", str(run), "--data", TINY[2].split("=", 1)[1])["ppl"]


def _fsdp2_torchrun(work: Path) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m", "hld",
           "train", "--config", "smoke", "--out", str(work / "fsdp2"), *TINY, "objective.method=hld-joint",
           "train.parallel=fsdp2", "--quiet"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    if r.returncode != 0:
        raise RuntimeError(f"exit {r.returncode}: {(r.stderr.strip().splitlines() or [''])[-1]}")
    return "1 process, fsdp2"


def checks(work: Path) -> list[tuple[str, object]]:
    cache, sampled, sharded = work / "cache", work / "cache-sampled", work / "cache-2shards"
    out: list[tuple[str, object]] = [
        (
            "cache build (hld-joint)",
            lambda: _cli(
                "cache-teacher", "--config", "smoke", "--out", str(cache), *TINY, "objective.method=hld-joint"
            ),
        ),  # fmt: skip
    ]
    for arm in ("ce", "kd", "hld-joint", "hld-first"):
        out.append((f"step {arm} online", lambda arm=arm: _steps(arm)))
    for arm in ("kd", "hld-joint", "hld-first"):
        out.append((f"step {arm} cached", lambda arm=arm: _steps(arm, f"teacher.cache={cache}")))
    out += [
        ("sampled KD: cache + step", lambda: (_cli("cache-teacher", "--config", "smoke", "--out", str(sampled), *TINY,
                                                   SAMPLED), _steps("kd", f"teacher.cache={sampled}", SAMPLED))[1]),
        ("cache in 2 shards + read", lambda: ([_cli("cache-teacher", "--config", "smoke", "--out", str(sharded), *TINY,
                                                    "--shard", f"{i}/2") for i in (0, 1)],
                                              _steps("kd", f"teacher.cache={sharded}"))[1]),
        ("fused head vs naive loss", _fused_vs_naive),
        ("fsdp2 under torchrun", lambda: _fsdp2_torchrun(work)),
        ("hld train + hld eval", lambda: (_cli("train", "--config", "smoke", "--out", str(work / "run"), *TINY),
                                          f"ppl {_eval(work / 'run'):.2f}")[1]),
    ]  # fmt: skip
    if CUDA:
        out.append(("compiled step kd", lambda: _steps("kd", "train.compile=true")))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="work directory (default: a temporary one)")
    p.add_argument("--skip", nargs="*", default=[], help="checks to skip (names as printed)")
    args = p.parse_args()
    work = Path(args.out or tempfile.mkdtemp(prefix="hld-gpu-first-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HLD_CACHE_DIR", str(work / "hld-cache"))
    dev = torch.cuda.get_device_name() if CUDA else "CPU"
    print(f"first checks on {dev}, torch {torch.__version__}, {PRECISION}; work in {work}", flush=True)
    rows, t_all = [], time.time()
    for name, fn in checks(work):
        if name in args.skip:
            continue
        t0 = time.time()
        try:
            note, ok = fn(), True
            note = note if isinstance(note, str) else ""
        except BaseException as exc:  # noqa: BLE001 - a failed check is a row; the next check still runs
            if isinstance(exc, KeyboardInterrupt):
                raise
            ok, note = False, f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            (work / "errors.log").open("a").write(f"== {name}\n{traceback.format_exc()}\n")
        rows.append((name, ok, time.time() - t0, note))
        print(f"  {'pass' if ok else 'FAIL'}  {name}", flush=True)
    print(f"\n{'check':<28} {'result':<6} {'s':>6}  first error / note")
    print(f"{'-' * 28} {'-' * 6} {'-' * 6}  {'-' * 40}")
    for name, ok, sec, note in rows:
        print(f"{name:<28} {'pass' if ok else 'FAIL':<6} {sec:6.1f}  {note[:160]}")
    failed = sum(not ok for _, ok, _, _ in rows)
    took = time.time() - t_all
    print(f"\n{len(rows) - failed} passed, {failed} failed in {took:.0f} s (tracebacks: {work / 'errors.log'})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
