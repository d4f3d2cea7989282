"""Start-up against corpus size: today's token store against the code before it (in-RAM streams), in
the same run, on corpora of k copies of the shipped sample (1.19M Gemma 3 tokens per copy).

    python benchmarks/data_startup.py                      # sizes 1 4 16, old = 6c13c84
    python benchmarks/data_startup.py --sizes 1 4 16 64 --old-sizes 1 4 16

Per size, `hld train --config smoke data.max_train_docs=null budget.tokens=256` (one step of 4 x 64
tokens, the real Gemma 3 270M teacher; only the corpus changes), each in its own process, with its
data prepared beforehand (the new code: `hld tokenize`; the old code: a first run that fills its token
cache), so the figures are the start-up a resumed or requeued job pays:

- first step: seconds from the process's start until its first metrics line is written (the process is
  then stopped: what follows the step is the same at every size);
- peak RSS: the process's peak resident set (`wait4`'s ru_maxrss), whose growth with the corpus is
  what the data path holds (the rest is the same at every size).

And `hld tokenize` throughput (tokens/s) at the largest size with 1 and with 2 workers. The growth law
printed is a least-squares line over the sizes: seconds and bytes per corpus token. Results go to
benchmarks/results/cpu_data_startup.json with the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _measure import machine  # noqa: E402

SAMPLE = ROOT / "src" / "hld" / "assets" / "sample_corpus"
TOKENS_PER_COPY = 1_190_000  # the sample's train split in Gemma 3 tokens (hld tokenize prints the exact count)


def corpus(root: Path, k: int) -> str:
    d = root / f"corpus-{k}x"
    d.mkdir(parents=True, exist_ok=True)
    files = sorted(SAMPLE.glob("c4-train.*.json.gz"))
    n = k * len(files)
    for c in range(k):
        for i, f in enumerate(files):
            dst = d / f"c4-train.{c * len(files) + i:05d}-of-{n:05d}.json.gz"
            if not dst.exists():
                shutil.copyfile(f, dst)
    return str(d / "c4-train.*.json.gz")


def peak_rss(cmd: list[str], env: dict, watch: Path | None = None) -> dict:
    """`run` in a fresh interpreter that reports its child's ru_maxrss (one child per measurement)."""
    probe = (
        "import json, os, resource, subprocess, sys, time\n"
        "t0 = time.perf_counter(); p = subprocess.Popen(sys.argv[2:], stdout=subprocess.DEVNULL, "
        "stderr=subprocess.PIPE)\n"
        "watch, first = sys.argv[1], None\n"
        "while p.poll() is None:\n"
        "    if first is None and watch and os.path.exists(watch) and os.path.getsize(watch) > 0:\n"
        "        first = time.perf_counter() - t0; p.kill(); p.wait(); break\n"
        "    time.sleep(0.02)\n"
        "err = p.stderr.read().decode()\n"
        "ru = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
        "rc = 0 if first is not None else p.returncode\n"
        "print(json.dumps({'rc': rc, 'first_step_s': first, 'wall_s': time.perf_counter() - t0, "
        "'peak_rss_bytes': ru.ru_maxrss * 1024, 'err': err[-3000:]}))\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", probe, str(watch or ""), *cmd], env=env, capture_output=True, text=True, check=True
    )
    out = json.loads(res.stdout)
    if out["rc"] != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({out['rc']}):\n{out['err']}")
    return out


def train_cmd(python: list[str], spec: str, run_dir: Path, *extra: str) -> list[str]:
    return [
        *python,
        "train",
        "--config",
        "smoke",
        "--out",
        str(run_dir),
        f"data.train={spec}",
        "data.max_train_docs=null",
        "budget.tokens=256",
        "--quiet",
        *extra,
    ]


def fit(sizes: list[int], ys: list[float]) -> float:
    """Least-squares slope of ys against corpus tokens (k copies of the sample)."""
    x = np.asarray(sizes, dtype=np.float64) * TOKENS_PER_COPY
    return float(np.polyfit(x, np.asarray(ys, dtype=np.float64), 1)[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--old-sizes", type=int, nargs="*", default=None, help="sizes for the old code (default: --sizes)")
    ap.add_argument("--old", default="6c13c84", help="the commit before the token store")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cpu_data_startup.json"))
    args = ap.parse_args()
    old_sizes = args.sizes if args.old_sizes is None else args.old_sizes
    work = Path(tempfile.mkdtemp(prefix="hld-data-startup-"))
    old_tree = work / "old"
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old_tree), args.old],
        check=True,
        capture_output=True,
    )
    base = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    new_env = {**base, "HLD_CACHE_DIR": str(work / "cache-new"), "PYTHONPATH": str(ROOT / "src")}
    old_env = {**base, "HLD_CACHE_DIR": str(work / "cache-old"), "PYTHONPATH": str(old_tree / "src")}
    for env in (new_env, old_env):  # the teacher's one-time GGUF conversion, shared by every size
        Path(env["HLD_CACHE_DIR"]).mkdir(parents=True)
        gguf = Path(os.environ.get("HLD_CACHE_DIR", Path.home() / ".cache" / "hld")) / "gguf"
        if gguf.is_dir():
            os.symlink(gguf, Path(env["HLD_CACHE_DIR"]) / "gguf")
    py = [sys.executable, "-m", "hld"]
    rows: dict[str, list[dict]] = {"new": [], "old": []}
    try:
        for k in sorted(set(args.sizes) | set(old_sizes)):
            spec = corpus(work, k)
            if k in args.sizes:
                t = peak_rss([*py, "tokenize", "--config", "smoke", f"data.train={spec}", "--json", "--quiet"], new_env)
                for rep in range(2):
                    r = peak_rss(
                        train_cmd(py, spec, work / f"new-{k}-{rep}"), new_env, work / f"new-{k}-{rep}" / "metrics.jsonl"
                    )
                    rows["new"].append(
                        {"copies": k, "rep": rep, **{x: r[x] for x in ("first_step_s", "wall_s", "peak_rss_bytes")}}
                    )
                rows["new"][-1]["tokenize_wall_s"] = t["wall_s"]
                print(f"new k={k}: {rows['new'][-2:]}", flush=True)
            if k in old_sizes:
                peak_rss(train_cmd(py, spec, work / f"old-{k}-warm"), old_env, work / f"old-{k}-warm" / "metrics.jsonl")
                for rep in range(2):
                    r = peak_rss(
                        train_cmd(py, spec, work / f"old-{k}-{rep}"), old_env, work / f"old-{k}-{rep}" / "metrics.jsonl"
                    )
                    rows["old"].append(
                        {"copies": k, "rep": rep, **{x: r[x] for x in ("first_step_s", "wall_s", "peak_rss_bytes")}}
                    )
                print(f"old k={k}: {rows['old'][-2:]}", flush=True)
        big = max(args.sizes)
        spec = corpus(work, big)
        throughput = {}
        for workers in (1, 2):
            store = work / f"throughput-{workers}"
            t0 = time.perf_counter()
            res = subprocess.run(
                [
                    *py,
                    "tokenize",
                    "--config",
                    "smoke",
                    f"data.train={spec}",
                    "--split",
                    "train",
                    "--out",
                    str(store),
                    "--workers",
                    str(workers),
                    "--json",
                    "--quiet",
                ],
                env=new_env,
                capture_output=True,
                text=True,
                check=True,
            )
            wall = time.perf_counter() - t0
            (row,) = json.loads(res.stdout)["stores"]
            throughput[workers] = {
                "tokens": row["tokens"],
                "seconds": row["seconds"],
                "wall_s": wall,
                "tokens_per_s": row["tokens"] / row["seconds"],
            }
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old_tree)], capture_output=True)

    def best(code: str, k: int) -> dict:
        rs = [r for r in rows[code] if r["copies"] == k]
        return {
            "first_step_s": min(r["first_step_s"] for r in rs),
            "peak_rss_bytes": min(r["peak_rss_bytes"] for r in rs),
        }

    print(f"\nmachine: {machine()}")
    print(
        f"{'copies':>6} {'tokens':>8} | {'new: first step':>15} {'peak RSS':>9} | "
        f"{'old: first step':>15} {'peak RSS':>9}"
    )
    table = []
    for k in sorted(set(args.sizes) | set(old_sizes)):
        n = best("new", k) if k in args.sizes else None
        o = best("old", k) if k in old_sizes else None
        table.append({"copies": k, "tokens": k * TOKENS_PER_COPY, "new": n, "old": o})
        cell = lambda r: f"{r['first_step_s']:>13.2f} s {r['peak_rss_bytes'] / 2**20:>6.0f} MiB" if r else f"{'-':>25}"  # noqa: E731
        print(f"{k:>6} {k * TOKENS_PER_COPY / 1e6:>7.1f}M | {cell(n)} | {cell(o)}")
    law = {}
    for code, sizes in (("new", args.sizes), ("old", old_sizes)):
        if len(sizes) >= 2:
            law[code] = {
                "s_per_token": fit(sizes, [best(code, k)["first_step_s"] for k in sizes]),
                "bytes_per_token": fit(sizes, [best(code, k)["peak_rss_bytes"] for k in sizes]),
            }
            print(
                f"growth ({code}): {law[code]['s_per_token'] * 1e6:.3f} µs and {law[code]['bytes_per_token']:.2f} B "
                "per corpus token"
            )
    lo, hi = min(args.sizes), max(args.sizes)
    ratio = best("new", hi)["first_step_s"] / best("new", lo)["first_step_s"]
    print(f"new: first step at {hi}x / at {lo}x = {ratio:.2f} (goal <= 1.2)")
    for w, t in throughput.items():
        print(
            f"hld tokenize, {w} worker(s): {t['tokens_per_s'] / 1e6:.2f}M tokens/s ({t['tokens']:,} tokens in "
            f"{t['seconds']:.1f} s)"
        )
    print(f"scaling 1 -> 2 workers: x{throughput[2]['tokens_per_s'] / throughput[1]['tokens_per_s']:.2f}")
    Path(args.out).write_text(
        json.dumps(
            {
                "machine": machine(),
                "runs": rows,
                "table": table,
                "growth": law,
                "first_step_ratio": ratio,
                "tokenize": throughput,
            },
            indent=1,
        )
    )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
