"""Building a paired store (`hld.data.paired`: both tokenisations, the alignment, three streams per unit)
against building the plain token store of the same corpus with the teacher's tokenizer alone
(`hld.data.tokenize.build`, what `hld tokenize` does), on the shipped sample corpus's train split.

    python benchmarks/paired_windows.py                         # Gemma 3 (from the embedded GGUF) as teacher
    python benchmarks/paired_windows.py --teacher DIR --json    # a saved tokenizer directory (no GGUF parse)

Teacher: Gemma 3's tokenizer (262,144 tokens). Students: byte-level BPEs trained on the sample by
`hld train-tokenizer`'s code (`hld.data.bpe`) at --student-vocab sizes. Each build goes into a fresh
directory, one process, one tokenizer thread (TOKENIZERS_PARALLELISM=false, as a `--workers` process
runs); each figure is the minimum of --reps builds. Both builds read the same json.gz files and write
their shards (sha256 included); tokens/s counts the teacher's tokens (EOS included) for both, so the
printed ratio is the plain build's time over the paired build's. Then the windows (`PairedWindows`,
seq_len --seq-len, the teacher's length by default from the measured ratio): the time to cut them, the
share bound by the teacher's length, the padding on each side, and the spread of each window's own
teacher/student ratio (its 99th percentile and maximum over the store's ratio, the teacher unbounded).
"""

from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one thread, before tokenizers is imported
os.environ.setdefault("RAYON_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _measure import machine, table  # noqa: E402

SPEC = "sample:train"


def gemma_tokenizer(spec: str | None):
    from transformers import AutoTokenizer

    if spec:
        return AutoTokenizer.from_pretrained(spec)
    from hld.models.loading import embedded_teacher_path

    path = embedded_teacher_path()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)  # ~40 s: the GGUF's vocabulary


def timed_build(reps: int, build) -> tuple[float, dict]:
    """The minimum over `reps` builds, each into a fresh directory; the last build's manifest."""
    best, manifest = float("inf"), {}
    for _ in range(reps):
        root = Path(tempfile.mkdtemp(prefix="hld-bench-"))
        try:
            t0 = time.perf_counter()
            manifest = build(root / "store")
            best = min(best, time.perf_counter() - t0)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    return best, manifest


def windows_figures(teacher, student, seq_len: int) -> dict:
    """Cut the windows of a paired store built once (cut time: the minimum of 3) and describe them."""
    from hld.data import paired

    root = Path(tempfile.mkdtemp(prefix="hld-bench-"))
    try:
        paired.build(SPEC, teacher, student, root / "store", quiet=True)
        store = paired.PairedStore(root / "store")
        T = paired.default_teacher_seq_len(seq_len, store.token_ratio)
        tables = [np.asarray(store.array(i, "chunks")) for i in range(store.n_units)]
        cut = min(
            _time(lambda: [paired.cut_windows(c, seq_len=seq_len, teacher_seq_len=T) for c in tables]) for _ in range(3)
        )
        w = paired.PairedWindows(
            store, seq_len=seq_len, teacher_pad_id=0, student_pad_id=0, teacher_vocab_size=len(teacher),
            student_vocab_size=len(student),
        )  # fmt: skip
        index = np.concatenate([np.asarray(ix) for ix in w.index])
        t_len, s_len = 1 + index[:, 3] - index[:, 2], 1 + index[:, 5] - index[:, 4]
        chunks = [np.asarray(store.array(i, "chunks"), np.int64) for i in range(store.n_units)]
        nxt = np.concatenate([c[np.asarray(ix)[:, 1]] for c, ix in zip(chunks, w.index)])
        teacher_bound = (t_len + nxt[:, 0] > T) & (s_len + nxt[:, 1] <= seq_len)
        # each window's own teacher/student ratio when only the student's length binds (the margin's reason)
        loose = [paired.cut_windows(c, seq_len=seq_len, teacher_seq_len=8 * seq_len) for c in tables]
        ratio = np.concatenate([(ix[:, 3] - ix[:, 2]) / (ix[:, 5] - ix[:, 4]) for ix in loose])
        return {
            "teacher_seq_len": T,
            "token_ratio": store.token_ratio,
            "windows": len(w),
            "cut_s": cut,
            "teacher_bound_share": float(teacher_bound.mean()),
            "window_ratio_p99_over_store": float(np.quantile(ratio, 0.99) / store.token_ratio),
            "window_ratio_max_over_store": float(ratio.max() / store.token_ratio),
            "student_fill": float(s_len.mean() / seq_len),
            "teacher_fill": float(t_len.mean() / T),
            "dropped_chunks": w.dropped_chunks,
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", help="a tokenizer directory (default: Gemma 3's, from the embedded GGUF)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--student-vocab", type=int, nargs="+", default=[8000, 32000])
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    from hld.data import paired
    from hld.data import tokenize as tk
    from hld.data.bpe import train_bpe

    teacher = gemma_tokenizer(a.teacher)
    plain_s, plain = timed_build(a.reps, lambda out: tk.build(SPEC, teacher, out, quiet=True))
    results: dict = {"plain": {"seconds": plain_s, "teacher_tokens": plain["tokens"], "docs": plain["docs"]}}
    results["plain"]["tokens_per_s"] = plain["tokens"] / plain_s
    for vocab in a.student_vocab:
        student, _ = train_bpe(SPEC, vocab_size=vocab, quiet=True)
        s, m = timed_build(a.reps, lambda out, student=student: paired.build(SPEC, teacher, student, out, quiet=True))
        assert m["teacher_tokens"] == plain["tokens"] and m["skipped"] == 0  # the same documents, the same ids
        results[f"bpe-{vocab}"] = {
            "seconds": s,
            "teacher_tokens": m["teacher_tokens"],
            "student_tokens": m["student_tokens"],
            "chunks": m["chunks"],
            "tokens_per_s": m["teacher_tokens"] / s,
            "student_tokens_per_s": m["student_tokens"] / s,
            "plain_over_paired": plain_s / s,
            "windows": windows_figures(teacher, student, a.seq_len),
        }
    rows = [["plain token store (teacher only)", f"{plain['tokens'] / 1e6:.3f}M", "-", "-", f"{plain_s:.2f} s"]]
    rows[0] += [f"{plain['tokens'] / plain_s / 1e3:,.0f}k", "1.00", "-", "-", "-", "-"]
    for name, r in results.items():
        if name == "plain":
            continue
        w = r["windows"]
        rows.append(
            [
                f"paired, student byte-level {name}",
                f"{r['teacher_tokens'] / 1e6:.3f}M",
                f"{r['student_tokens'] / 1e6:.3f}M",
                f"{r['chunks'] / 1e6:.3f}M",
                f"{r['seconds']:.2f} s",
                f"{r['tokens_per_s'] / 1e3:,.0f}k",
                f"{r['plain_over_paired']:.2f}",
                f"{w['teacher_seq_len']} ({w['token_ratio']:.3f})",
                f"{w['teacher_bound_share']:.3f}",
                f"{w['student_fill']:.3f} / {w['teacher_fill']:.3f}",
                f"{w['window_ratio_p99_over_store']:.3f} / {w['window_ratio_max_over_store']:.3f}",
            ]
        )
    header = ["build", "teacher tokens", "student tokens", "chunks", "time", "teacher tok/s", "plain ÷ paired"]
    header += [f"teacher length at {a.seq_len} (ratio)", "teacher-bound windows", "fill student / teacher"]
    header += ["window ratio p99 / max over store"]
    info = machine()
    print(f"teacher: Gemma 3 tokenizer ({len(teacher)} tokens); {SPEC}; one thread; min of {a.reps} builds")
    print(table(rows, header))
    print(f"machine: {info}")
    if a.json:
        print(json.dumps({"machine": info, "seq_len": a.seq_len, "results": results}))


if __name__ == "__main__":
    main()
