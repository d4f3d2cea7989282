"""Decoded tokens/s of the teacher cache's reader, against the step rate a GPU trains at.

A synthetic format-4 cache at a paper teacher's shapes (default: Gemma 3 4B's d = 2560, V = 262,144,
top-64 compact logits, fp8 hidden states, windows of 1024; `_synthetic_cache`) is read batch by
batch (8 windows = 8,192 tokens) three ways, in the same process:

- `row by row`: format 3's reader (`CachedTeacher.__call__` before prefetch): each window's logits
  and each window's hidden rows decoded one window at a time on the training thread;
- `read`: today's `CachedTeacher.read` on one thread (hidden layers gathered per shard at once);
- `prefetch, N workers`: N background threads decoding batches ahead (`CachedTeacher.prefetch`),
  what the training thread sees when it never waits.

Logits and hidden layers are timed apart (their needs differ by arm: kd reads logits only). Every
read's checksums are verified (and stamped) before the timed passes, as in a run after its first
step. The target rate is an assumption, stated in the output: a 123M student trains at ~200k
tokens/s on one H100 (issue 20's estimate; `benchmarks/gpu_check.sh` measures the real one).

    python benchmarks/cache_read.py                    # paper shapes, 64 windows
    python benchmarks/cache_read.py --tiny --json      # seconds
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import _measure as M
import _synthetic_cache as synth
import numpy as np
import torch

from hld.cache.codec import Codec, read_logits
from hld.cache.meta import CacheIdentity
from hld.cache.reader import CachedTeacher
from hld.distill.signals import Needs

GPU_TOKENS_PER_S = 200_000  # assumed: a 123M student's training step on one H100 (issue 20)


def row_by_row(t: CachedTeacher, wids: np.ndarray, T: int, needs: Needs) -> int:
    """Format 3's decode: one window at a time (the arrays are today's; the algorithm is the old one)."""
    rows = t.rows_of(wids)
    where = [(int(r) // t.shard_windows, int(r) % t.shard_windows) for r in rows]
    for layer in needs.layers:
        keys = [f"hidden_L{layer}"] + ([f"hidden_L{layer}_scale"] if t.codec.hidden == "fp8" else [])
        torch.stack([format3_hidden(t.parts.arrays(s, keys), layer, r, T) for s, r in where])
    if needs.logits:
        parts = []
        for s, r in where:
            rec = t.manifest["shards"][s]
            keys = [k for k in rec["fields"] if k.startswith("topk_")]
            parts.append(
                read_logits(t.parts.arrays(s, keys), r, T, codec=t.codec, k=t.top_k, slot_bits=rec.get("slot_bits", 0))
            )
        [torch.from_numpy(np.stack([np.asarray(p[i]) for p in parts])) for i in range(3)]
    return len(wids) * T


def format3_hidden(arrays: dict, layer: int, r: int, T: int) -> torch.Tensor:
    """Format 3's fp8 decode of one window: torch's float8 -> float32 conversion, times the scale."""
    q = torch.from_numpy(np.array(arrays[f"hidden_L{layer}"][r, :T], dtype=np.uint8)).view(torch.float8_e4m3fn)
    return (q.float() * torch.from_numpy(np.array(arrays[f"hidden_L{layer}_scale"][r, :T]))[..., None]).to(
        torch.bfloat16
    )


def timed_pass(fn, batches) -> float:
    t0 = time.perf_counter()
    n = sum(fn(b) for b in batches)
    return n / (time.perf_counter() - t0)


def prefetched(t: CachedTeacher, batches, T: int, needs: Needs) -> float:
    """Tokens/s when every batch is asked for ahead (the pool decodes them all in parallel)."""
    t._ahead = {}  # nothing decoded yet (a pass before left its results there)
    t0 = time.perf_counter()
    t.prefetch(batches, T, needs)
    futures = list(t._ahead.values())
    for f in futures:
        f.result()
    return len(batches) * len(batches[0]) * T / (time.perf_counter() - t0)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--windows", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--d-model", type=int, default=2560)
    p.add_argument("--vocab", type=int, default=262_144)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--threads", type=int, default=1, help="torch threads (the training thread's own work)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved passes per reader (the median is shown)")
    p.add_argument("--tiny", action="store_true", help="small shapes (seconds)")
    p.add_argument("--json", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.tiny:
        args.windows, args.seq_len, args.d_model, args.vocab = 16, 64, 128, 4096
    torch.set_num_threads(args.threads)
    T, B = args.seq_len, 8
    with tempfile.TemporaryDirectory() as tmp:
        m = synth.write(
            Path(tmp) / "cache",
            n_windows=args.windows,
            T=T,
            k=args.top_k,
            V=args.vocab,
            d=args.d_model,
            layers=[6],
            codec=Codec(logits="compact", hidden="fp8"),
            shard_windows=16,
        )
        ident = CacheIdentity(**m["identity"])
        rng = np.random.default_rng(1)
        batches = [rng.permutation(args.windows)[:B] for _ in range(max(2, args.windows // B))]
        rows, res = [], {"machine": M.machine(), "revision": M.revision(), "gpu_tokens_per_s": GPU_TOKENS_PER_S}
        for what, needs in (("top-k logits", Needs(logits=True)), ("one hidden layer", Needs(layers=(6,)))):
            readers = {n: CachedTeacher(Path(tmp) / "cache", expect=ident, workers=n) for n in args.workers}
            t = readers[args.workers[0]]
            for r in readers.values():
                r.parts.verify_all()  # checksums checked and stamped: the timed passes decode only
            passes: dict[str, list[float]] = {}
            for _ in range(args.repeats):  # interleaved, medians: the 2 cores are shared with other jobs
                passes.setdefault("row_by_row", []).append(
                    timed_pass(lambda b, t=t, needs=needs: row_by_row(t, b, T, needs), batches)
                )
                passes.setdefault("read", []).append(
                    timed_pass(lambda b, t=t, needs=needs: len(t.read(b, T, needs).tokens) * T, batches)
                )
                for n, r in readers.items():
                    passes.setdefault(f"prefetch_{n}", []).append(prefetched(r, batches, T, needs))
            line = {k: float(np.median(v)) for k, v in passes.items()}
            old = line["row_by_row"]
            names = {"row_by_row": "row by row (format 3)", "read": "read, 1 thread"}
            for key, rate in line.items():
                label = names[key] if key in names else f"prefetch, {key.split('_')[1]} workers"
                rows.append([what, label, f"{rate:,.0f}", f"{rate / old:.2f}x", f"{rate / GPU_TOKENS_PER_S:.2f}"])
            for r in readers.values():
                r.close()
            res[what] = line
        print(
            f"cache read: {args.windows} windows of {T}, compact top-{args.top_k} of V={args.vocab:,}, fp8 hidden "
            f"d={args.d_model}; batches of {B} windows; {M.machine().get('cpu', '')}"
        )
        print(M.table(rows, ["signal", "reader", "tokens/s", "vs row by row", f"x GPU need ({GPU_TOKENS_PER_S:,}/s)"]))
        if args.json:
            print(json.dumps(res))


if __name__ == "__main__":
    main()
