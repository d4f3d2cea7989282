"""The table at the end of gpu_check.sh: our step (step.py --json) against the naive HF step of
the same run (same models) and against the anchor (shared/anchors/naive_hf_step.py), per arm.

The anchor's student (12 blocks, d 768) is not paper-123m (14 blocks, d 768), so its tokens/s are
for a slightly smaller student; MFU (model FLOPs / time / measured bf16 matmul rate) accounts for
that, and its ratio is the fairer one.

    python benchmarks/gpu_summary.py STEP_LOG ANCHOR_LOG
"""

from __future__ import annotations

import json
import sys

import _measure as M


def last_json(path: str) -> dict:
    """The last line of a log that parses as a JSON object ({} if none)."""
    try:
        lines = open(path).read().splitlines()
    except OSError:
        return {}
    for line in reversed(lines):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            return obj
    return {}


def fmt(v, spec: str) -> str:
    return format(v, spec) if isinstance(v, (int, float)) else "-"


def ratio(a, b) -> str:
    return f"{a / b:.2f}x" if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else "-"


def main(step_log: str, anchor_log: str) -> None:
    ours, anchor = last_json(step_log), last_json(anchor_log)
    runs = {r["run"]: r for r in ours.get("runs", [])}
    rows = []
    for arm, anchor_key in (("ce", "ce"), ("kd", "kd"), ("hld-joint", "hld")):
        o, n, a = runs.get(f"ours {arm}", {}), runs.get(f"naive {arm}", {}), anchor.get(anchor_key, {})
        rows.append(
            [
                arm,
                fmt(o.get("tokens_per_s"), ",.0f"),
                fmt(n.get("tokens_per_s"), ",.0f"),
                fmt(a.get("tokens_per_s"), ",.0f"),
                ratio(o.get("tokens_per_s"), n.get("tokens_per_s")),
                ratio(o.get("tokens_per_s"), a.get("tokens_per_s")),
                fmt(o.get("mfu"), ".3f"),
                fmt(a.get("mfu"), ".3f"),
                ratio(o.get("mfu"), a.get("mfu")),
                fmt(M.gib(o["peak_bytes"]) if "peak_bytes" in o else None, ".1f"),
                fmt(M.gib(n["peak_bytes"]) if "peak_bytes" in n else None, ".1f"),
                fmt(a.get("peak_gib"), ".1f") if "error" not in a else a["error"],
            ]
        )
    for name in ("ours kd cache", "ours hld-joint cache"):
        if name in runs and "tokens_per_s" in runs[name]:
            r = runs[name]
            rows.append(
                [
                    name[5:],
                    fmt(r["tokens_per_s"], ",.0f"),
                    "-",
                    "-",
                    "-",
                    "-",
                    fmt(r["mfu"], ".3f"),
                    "-",
                    "-",
                    fmt(M.gib(r["peak_bytes"]), ".1f"),
                    "-",
                    "-",
                ]
            )
    device = ours.get("machine", {}).get("device", anchor.get("device", "?"))
    print(
        f"{device}: ours = step.py (student {ours.get('student')}, teacher {ours.get('teacher')}, "
        f"{ours.get('batch_size')} x {ours.get('seq_len')}); naive = step.py's HF step, same models; "
        f"anchor = naive_hf_step.py ({anchor.get('B')} x {anchor.get('T')})"
    )
    print(
        M.table(
            rows,
            [
                "arm",
                "ours tok/s",
                "naive tok/s",
                "anchor tok/s",
                "ours/naive",
                "ours/anchor",
                "MFU ours",
                "MFU anchor",
                "MFU ratio",
                "GiB ours",
                "GiB naive",
                "GiB anchor",
            ],
        )
    )
    rate_o, rate_a = ours.get("matmul_flops_per_s"), anchor.get("matmul_tflops")
    print(
        f"matmul rate: step.py {fmt(rate_o and rate_o / 1e12, '.1f')} TFLOP/s, anchor {fmt(rate_a, '.1f')} TFLOP/s; "
        f"anchor student {fmt(anchor.get('student_nonemb_params'), ',')} non-embedding parameters"
    )
    for k in ("speedup_kd", "speedup_hld", "cache_vs_ce"):
        print(f"{k}: {fmt(ours.get(k), '.2f')}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
