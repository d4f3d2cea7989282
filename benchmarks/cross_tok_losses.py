"""The cross-tokenizer losses (hld.distill.cross_tok) on one realistic window: 256 teacher positions
over Gemma 3's 262,144-wide vocabulary, a student of 32,000, forward + backward to the student's logits,
each the minimum of --reps runs on one thread. The ratio printed is ULD over full sorted rows (what ULD's
reference code and TRL's ULD loss compute) against the default top-64 ULD.

    python benchmarks/cross_tok_losses.py                   # 256 positions, V 262,144 / 32,000
    python benchmarks/cross_tok_losses.py --positions 128 --reps 1

Synthetic alignment: the student's window cut into chunks, 80% one token on each side, the rest two
teacher tokens to one student token or one to two (what a 32k English tokenizer against Gemma 3's
gives, roughly). Logits are N(0, 3^2) in fp32 (the teacher's under no_grad); a shared vocabulary of
25,000 ids for GOLD; hidden states of width 640 (teacher) and 512 (student) for the pooling.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _measure import machine, table  # noqa: E402

from hld.data.align import Alignment  # noqa: E402
from hld.distill.cross_tok.alm import alm_sum, token_logprobs  # noqa: E402
from hld.distill.cross_tok.chunks import Chunks  # noqa: E402
from hld.distill.cross_tok.gold import gold_parts  # noqa: E402
from hld.distill.cross_tok.pooling import pool_pair  # noqa: E402
from hld.distill.cross_tok.uld import uld_sum  # noqa: E402
from hld.distill.cross_tok.vocab import SharedVocab  # noqa: E402


def synthetic_alignment(n_student: int, rng: np.random.Generator) -> Alignment:
    tb, sb = [0, 1], [0, 1]  # the BOS chunk
    while sb[-1] < n_student:
        shape = rng.choice(3, p=[0.8, 0.1, 0.1])  # (1|1), (2|1), (1|2)
        tb.append(tb[-1] + (2 if shape == 1 else 1))
        sb.append(min(sb[-1] + (2 if shape == 2 else 1), n_student))
    z = lambda n: np.zeros(n, np.int32)  # noqa: E731
    tb_a, sb_a = np.asarray(tb, np.int32), np.asarray(sb, np.int32)
    return Alignment(z(tb_a[-1]), z(sb_a[-1]), tb_a, sb_a, np.arange(len(tb), dtype=np.int32))


def best_of(reps: int, fn) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--positions", type=int, default=256, help="student tokens in the window")
    ap.add_argument("--teacher-vocab", type=int, default=262_144)
    ap.add_argument("--student-vocab", type=int, default=32_000)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    al = synthetic_alignment(args.positions, rng)
    T_t, T_s, V_t, V_s = len(al.teacher_ids), len(al.student_ids), args.teacher_vocab, args.student_vocab
    chunks = Chunks.from_alignments([al], teacher_len=T_t, student_len=T_s).predicted()
    g = torch.Generator().manual_seed(0)
    t_logits = torch.randn(1, T_t, V_t, generator=g) * 3
    s_logits = (torch.randn(1, T_s, V_s, generator=g) * 3).requires_grad_(True)
    t_ids = torch.randint(0, V_t, (1, T_t), generator=g)
    s_ids = torch.randint(0, V_s, (1, T_s), generator=g)
    shared = SharedVocab(
        np.sort(rng.choice(V_t, 25_000, replace=False)), rng.choice(V_s, 25_000, replace=False), V_t, V_s
    )
    t_states, s_states = torch.randn(1, T_t, 640), torch.randn(1, T_s, 512, requires_grad=True)
    t_flat, s_flat = t_logits.view(-1, V_t), s_logits.view(-1, V_s)

    def uld(k):
        def run():
            s_logits.grad = None
            uld_sum(t_flat[chunks.teacher_pred_rows], s_flat[chunks.student_pred_rows], top_k=k).backward()

        return run

    def alm():
        s_logits.grad = None
        with torch.no_grad():
            lt = token_logprobs(t_logits, t_ids).view(-1)
        alm_sum(lt, token_logprobs(s_logits, s_ids).view(-1), chunks).backward()

    def gold():
        s_logits.grad = None
        gold_parts(t_flat, s_flat, chunks, shared).total().backward()

    def pooling(how):
        def run():
            s_states.grad = None
            pt, ps = pool_pair(t_states, s_states, chunks, how=how)
            ((ps[:, :1] - pt[:, :1]) ** 2).sum().backward()

        return run

    rows = [
        ["uld, top-64 (default)", best_of(args.reps, uld(64))],
        ["uld, top-1024", best_of(args.reps, uld(1024))],
        ["uld, full sorted rows (reference)", best_of(1, uld(None))],
        ["alm (teacher + student token log-probs)", best_of(args.reps, alm)],
        ["gold (25,000 shared ids, uld top-64 elsewhere)", best_of(args.reps, gold)],
        ["pooling last", best_of(args.reps, pooling("last"))],
        ["pooling mean", best_of(args.reps, pooling("mean"))],
    ]
    n_one = int(chunks.one_to_one.sum())
    print(f"{T_t} teacher x {V_t:,} / {T_s} student x {V_s:,} positions, {len(chunks)} predicted chunks ", end="")
    m = machine()
    print(f"({n_one} one-to-one); one thread of {m['device']} ({m['cpus']} CPUs), revision {m['revision']}")
    print(table([[name, f"{sec:.3f}"] for name, sec in rows], ["loss (forward + backward)", "seconds"]))
    print(f"full-row ULD / top-64 ULD: {rows[2][1] / rows[0][1]:.1f}x")


if __name__ == "__main__":
    main()
