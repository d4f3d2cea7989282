"""`hld plan`'s peak-memory estimate (`hld.plan.memory_estimate`) against a trace of the training step
(`hld.memtrace`: `hld.train.loop.train_step` under fake tensors, the live tensor bytes counted, the GPU's
path of the fused head), per config x teacher signal (online; cached: `teacher.cache` set, the decoded
signal made in place of a cache's), one process. No GPU and no weights are needed: models are built on
the meta device from their configs. Then the largest micro-batch (`train.micro_batch_size`) that fits an
80 GB card by the estimate (bisected: any size, and the largest that divides the per-process batch, which
a run needs), confirmed by one trace at that size.

    python benchmarks/memory_trace.py                                 # paper-123m, paper-735m: a few minutes
    python benchmarks/memory_trace.py --configs paper-123m --signals online teacher.model=gemma-3-4b-pt

The card: an 80 GB H100 reports 79.11 GiB to torch (`--card-gib`); `--reserve-gib` (1) of it is left for
what is not a tensor (CUDA context, cuBLAS and attention workspaces, allocator rounding). Results:
benchmarks/results/memory_trace.json (`--out`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import _measure as M

ROOT = Path(__file__).resolve().parents[1]
SIGNALS = {"online": [], "cached": ["teacher.cache=(cache)"]}  # a cached run's trace reads no cache files
GIB = 2**30


def with_micro(cfg, micro: int):
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, micro_batch_size=micro))


def largest_micro(cfg, budget: float, teacher, *, divides: bool) -> int:
    """The largest micro-batch whose estimate is within `budget` bytes (0: not even one window); the
    estimate grows with the micro-batch, so a bisection. `divides`: among the divisors of the batch."""
    from hld.memtrace import estimate

    B = cfg.train.batch_size
    sizes = [m for m in range(1, B + 1) if not divides or B % m == 0]
    lo, hi = 0, len(sizes)  # sizes[:lo] fit, sizes[hi:] do not
    while lo < hi:
        mid = (lo + hi) // 2
        if estimate(with_micro(cfg, sizes[mid]), teacher)["total"] <= budget:
            lo = mid + 1
        else:
            hi = mid
    return sizes[lo - 1] if lo else 0


def traced(cfg, teacher) -> tuple[dict, dict, float]:
    from hld.memtrace import estimate, trace_step

    t0 = time.perf_counter()
    tr = trace_step(cfg, teacher=teacher)
    return estimate(cfg, teacher), tr, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["paper-123m", "paper-735m"])
    ap.add_argument("--signals", nargs="+", default=list(SIGNALS), choices=list(SIGNALS))
    ap.add_argument("--card-gib", type=float, default=79.11, help="the card's memory as torch reports it")
    ap.add_argument("--reserve-gib", type=float, default=1.0, help="left for what is not a tensor")
    ap.add_argument("--no-confirm", action="store_true", help="no trace at the largest micro-batch")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "memory_trace.json"))
    ap.add_argument("overrides", nargs="*", help="dotted run overrides for every config")
    args = ap.parse_args()

    from hld.config import load_config
    from hld.plan import teacher_shapes

    budget = (args.card_gib - args.reserve_gib) * GIB
    teachers: dict[str, tuple] = {}
    rows = []
    for name in args.configs:
        for signal in args.signals:
            cfg = load_config(name, [*args.overrides, *SIGNALS[signal]])
            teacher = teachers.setdefault(cfg.teacher.model, teacher_shapes(cfg.teacher.model))
            est, tr, secs = traced(cfg, teacher)
            row = {
                "config": name,
                "signal": signal,
                "teacher": cfg.teacher.model,
                "micro_batch_size": tr["micro_batch_size"],
                "batch_size": cfg.train.batch_size,
                "seq_len": cfg.data.seq_len,
                "precision": cfg.train.precision,
                "estimate": est,
                "trace": {k: tr[k] for k in ("peak_bytes", "at_peak", "peak_where", "steps", "micro_batches")},
                "ratio": est["total"] / tr["peak_bytes"],
                "trace_seconds": secs,
                "largest_micro": largest_micro(cfg, budget, teacher, divides=False),
                "largest_micro_dividing": largest_micro(cfg, budget, teacher, divides=True),
            }
            m = row["largest_micro_dividing"]
            if m and not args.no_confirm:
                est_m, tr_m, secs_m = traced(with_micro(cfg, m), teacher)
                row["at_largest"] = {
                    "micro_batch_size": m,
                    "estimate_bytes": est_m["total"],
                    "trace_bytes": tr_m["peak_bytes"],
                    "ratio": est_m["total"] / tr_m["peak_bytes"],
                    "trace_seconds": secs_m,
                }
            rows.append(row)
            terms = ", ".join(f"{k} {v / GIB:.2f}" for k, v in est.items() if k != "total" and v)
            at = ", ".join(f"{k} {v / GIB:.2f}" for k, v in tr["at_peak"].items() if v >= GIB / 100)
            print(f"{name} {signal}: estimate {est['total'] / GIB:.2f} GiB ({terms})", flush=True)
            print(f"  trace {tr['peak_bytes'] / GIB:.2f} GiB at {tr['peak_where']} ({at}); {secs:.0f} s", flush=True)

    print()
    print(f"traced on {M.machine()['device']} (torch {M.machine()['torch']}, no GPU: fake tensors)")
    print(
        f"one process, seq_len {rows[0]['seq_len'] if rows else '-'}; an 80 GB card: {args.card_gib:g} GiB, "
        f"{args.reserve_gib:g} GiB kept for the CUDA context and workspaces: estimate <= {budget / GIB:.2f} GiB"
    )
    table = []
    for r in rows:
        big = r.get("at_largest")
        table.append(
            [
                r["config"],
                r["signal"],
                r["micro_batch_size"],
                f"{r['estimate']['total'] / GIB:.2f}",
                f"{r['trace']['peak_bytes'] / GIB:.2f}",
                f"{r['ratio']:.3f}",
                r["largest_micro"],
                r["largest_micro_dividing"],
                f"{big['estimate_bytes'] / GIB:.2f} / {big['trace_bytes'] / GIB:.2f}" if big else "-",
            ]
        )
    header = ["config", "signal", "micro", "estimate GiB", "trace GiB", "est/trace", "max micro", "max dividing"]
    print(M.table(table, [*header, "there: est / trace GiB"]))
    out = {"benchmark": "memory_trace", "machine": M.machine(), "card_gib": args.card_gib}
    out |= {"reserve_gib": args.reserve_gib, "overrides": args.overrides, "rows": rows}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
