"""The cross-tokenizer kd objective (hld.distill.cross_tok.objectives.CrossTokLogitObjective) on one batch,
forward + backward to the student's final states and head, against the naive way: every row's logits of
both models materialised at once ((B*T_s, V_s) with autograd, (B*T_t, V_t) under no_grad) and the same
loss functions applied to them. Time (the minimum of --reps) and peak memory above the start, each variant
in its own process (`--variant`), printed with the ratio naive / ours.

    python benchmarks/cross_tok_objective.py                 # B 4, T 256, Gemma 3's 262,144 / a 32,000 student
    python benchmarks/cross_tok_objective.py --loss alm --batch 2

Synthetic batch: `benchmarks/cross_tok_losses.py`'s alignment (80% of chunks one token a side) per window;
final states N(0, 1) of width 640 (teacher) and 512 (student), heads N(0, 0.05^2); a shared vocabulary of
25,000 ids for gold (at most the student's vocabulary).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _measure import PeakMemory, gib, machine, table, timed  # noqa: E402
from cross_tok_losses import synthetic_alignment  # noqa: E402

from hld.data.packing import make_paired_batch  # noqa: E402
from hld.distill.cross_tok.alm import chunk_logliks  # noqa: E402
from hld.distill.cross_tok.chunks import Chunks  # noqa: E402
from hld.distill.cross_tok.gold import gold_parts  # noqa: E402
from hld.distill.cross_tok.objectives import CrossTokLogitObjective, batch_chunks  # noqa: E402
from hld.distill.cross_tok.uld import uld_sum  # noqa: E402
from hld.distill.cross_tok.vocab import SharedVocab  # noqa: E402
from hld.distill.signals import StudentOutputs, TeacherSignals  # noqa: E402
from hld.distill.signals.online import OnlineLogits  # noqa: E402


def inputs(args):
    rng = np.random.default_rng(0)
    als = [synthetic_alignment(args.positions, rng) for _ in range(args.batch)]
    T_t = max(int(a.teacher_bounds[-1]) for a in als)
    g = torch.Generator().manual_seed(0)
    V_t, V_s = args.teacher_vocab, args.student_vocab

    class Rows:  # hld.data.paired.PairedRows' fields
        pass

    rows = Rows()
    rows.teacher_ids = torch.randint(3, V_t, (args.batch, T_t), generator=g).numpy()
    rows.student_ids = torch.randint(3, V_s, (args.batch, args.positions), generator=g).numpy()
    rows.student_lengths = np.array([int(a.student_bounds[-1]) for a in als])
    rows.teacher_lengths = np.array([int(a.teacher_bounds[-1]) for a in als])
    rows.alignments = als
    batch = make_paired_batch(rows)
    h_t = torch.randn(args.batch, T_t, 640, generator=g)
    W_t = torch.randn(V_t, 640, generator=g) * 0.05
    h_s = torch.randn(args.batch, args.positions, 512, generator=g).requires_grad_(True)
    W_s = (torch.randn(V_s, 512, generator=g) * 0.05).requires_grad_(True)
    n = min(25_000, V_s)
    shared = SharedVocab(np.sort(rng.choice(V_t, n, replace=False)), rng.choice(V_s, n, replace=False), V_t, V_s)
    return batch, h_t, W_t, h_s, W_s, shared


def ours(args, batch, h_t, W_t, h_s, W_s, shared):
    obj = CrossTokLogitObjective(loss=args.loss, alpha=0.5, vocab=shared, block_rows=args.block_rows)

    def run():
        h_s.grad = W_s.grad = None
        loss, _, _ = obj(batch, StudentOutputs(h_s, {}, W_s), TeacherSignals(source=OnlineLogits(h_t, W_t)))
        loss.backward()

    return run


def naive(args, batch, h_t, W_t, h_s, W_s, shared):
    def run():
        h_s.grad = W_s.grad = None
        z_s = h_s.reshape(-1, 512) @ W_s.T  # (B*T_s, V_s), kept for backward
        with torch.no_grad():
            z_t = h_t.reshape(-1, 640) @ W_t.T  # (B*T_t, V_t)
        labels, mask = batch.labels.reshape(-1), batch.mask.reshape(-1)
        logq = torch.log_softmax(z_s, -1)
        nll = -logq.gather(-1, labels.clamp_min(0)[:, None]).squeeze(-1)
        ce = torch.where(mask, nll, 0.0).sum()
        ch: Chunks = batch_chunks(batch).predicted()
        if args.loss == "uld":
            xt = uld_sum(z_t[ch.teacher_pred_rows], z_s[ch.student_pred_rows])
        elif args.loss == "gold":
            xt = gold_parts(z_t, z_s, ch, shared).total()
        else:
            from hld.distill.cross_tok.alm import alm_rows

            t_ids = batch.teacher_ids.reshape(-1)
            lt_rows = torch.log_softmax(z_t, -1)[:-1].gather(-1, t_ids[1:, None]).squeeze(-1)
            lt = chunk_logliks(torch.cat([lt_rows.new_zeros(1), lt_rows]), ch.teacher_start, ch.teacher_end)
            ls = chunk_logliks(torch.cat([nll.new_zeros(1), -nll[:-1]]), ch.student_start, ch.student_end)
            xt = alm_rows(lt, ls).sum()
        (0.5 * ce + 0.5 * xt).backward()

    return run


def measure(args) -> dict:
    torch.set_num_threads(args.threads)
    data = inputs(args)
    fn = (ours if args.variant == "ours" else naive)(args, *data)
    fn()  # warm
    with PeakMemory(torch.device("cpu")) as pm:
        fn()
    best = min(timed(fn, torch.device("cpu"))[0] for _ in range(args.reps))
    return {"seconds": best, "peak_bytes": pm.bytes, "exact": pm.exact}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--loss", choices=["uld", "alm", "gold"], default="uld")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--positions", type=int, default=256, help="student tokens per window")
    ap.add_argument("--teacher-vocab", type=int, default=262_144)
    ap.add_argument("--student-vocab", type=int, default=32_000)
    ap.add_argument("--block-rows", type=int, default=256, help="ours: rows of logits at a time")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--variant", choices=["ours", "naive"], help="measure one variant in this process (JSON)")
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(measure(args)))
        return
    got = {}
    for variant in ("ours", "naive"):
        cmd = [sys.executable, __file__, "--variant", variant] + [
            a for a in sys.argv[1:] if not a.startswith("--variant")
        ]
        got[variant] = json.loads(
            subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1]
        )
    m = machine()
    print(
        f"{args.loss}: batch {args.batch} x {args.positions} student positions, V {args.teacher_vocab:,} / "
        f"{args.student_vocab:,}; {args.threads} threads of {m['device']} ({m['cpus']} CPUs), revision {m['revision']}"
    )
    rows = [
        [
            v,
            f"{got[v]['seconds']:.3f}",
            f"{gib(got[v]['peak_bytes']):.3f}" + ("" if got[v]["exact"] else " (lower bound)"),
        ]
        for v in ("ours", "naive")
    ]
    print(table(rows, ["variant", "seconds (forward + backward)", "peak GiB above start"]))
    print(
        f"naive / ours: time {got['naive']['seconds'] / got['ours']['seconds']:.2f}x, "
        f"peak memory {got['naive']['peak_bytes'] / max(got['ours']['peak_bytes'], 1):.1f}x"
    )


if __name__ == "__main__":
    main()
