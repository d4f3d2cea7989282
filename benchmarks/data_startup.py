"""Start-up against corpus size: today's token store against the code before it (in-RAM streams), in
the same run, on corpora of k copies of the shipped sample (1.19M Gemma 3 tokens per copy).

    python benchmarks/data_startup.py                      # sizes 1 4 16, old = 6c13c84
    python benchmarks/data_startup.py --sizes 1 4 16 64 --end-to-end

The data path of a run's start, each in a fresh process with its data prepared beforehand (the new
code: `hld tokenize`; the old code: a first start that fills its token cache), so the figures are what
a resumed or requeued job pays: the `smoke` config with `data.max_train_docs=null` (only the corpus
changes), its train and validation windows and first batch, timed (wall and CPU) with the peak RSS above
the start (the tokenizer is loaded first and not counted). One thread (OMP_NUM_THREADS=1), the minimum
of --reps processes: the figures are meant to be read on a shared machine. The growth law printed is a
least-squares line over the sizes: seconds and bytes per corpus token.

`--end-to-end` also times `hld train --config smoke data.max_train_docs=null budget.tokens=256` (one step,
the real Gemma 3 270M teacher) from the process's start to its first metrics line (the process is then
stopped), and its peak RSS; on a loaded machine these swing by tens of seconds. Then `hld tokenize`
throughput (tokens/s) with 1 and 2 workers on `--throughput-size` copies (4: 8 units). Results: benchmarks/results/
cpu_data_startup.json, with the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
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


DATA_PATH = """
import json, sys, time
sys.path.insert(0, sys.argv[2])
from _measure import PeakMemory
import torch
from hld.config import load_config
from hld.data.loader import BatchOrder
from hld.train.resources import Resources

cfg = load_config("smoke", [f"data.train={sys.argv[1]}", "data.max_train_docs=null"])
r = Resources()
tok = r.tokenizer(cfg.teacher.model)
d = cfg.data
with PeakMemory(torch.device("cpu")) as pm:
    t0, c0 = time.perf_counter(), time.process_time()
    if hasattr(r, "train_windows"):
        train = r.train_windows(d, tok)
    else:  # the code before the token store
        train = r.windows(d.train, tok, seq_len=d.seq_len, text_field=d.text_field, max_docs=d.max_train_docs)
    val = r.validation_windows(d, tok)
    batch = BatchOrder(train, batch_size=cfg.train.batch_size, seed=cfg.train.seed).batch(0)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
print(json.dumps({"wall_s": wall, "cpu_s": cpu, "peak_bytes": pm.bytes, "exact": pm.exact, "windows": len(train)}))
"""


def data_path(spec: str, env: dict) -> dict:
    """The data path of a run's start in a fresh process (tokenizer loaded first, not counted): its
    train and validation windows and the first batch; seconds (wall and CPU) and peak RSS above the start."""
    res = subprocess.run(
        [sys.executable, "-c", DATA_PATH, spec, str(ROOT / "benchmarks")], env=env, capture_output=True, text=True
    )
    if res.returncode != 0:
        raise SystemExit(f"data path probe failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


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


def _best(rows: list[dict], k: int, key: str) -> float:
    return min(r[key] for r in rows if r["copies"] == k)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--throughput-size", type=int, default=4, help="copies `hld tokenize` is timed on")
    ap.add_argument("--old", default="6c13c84", help="the commit before the token store")
    ap.add_argument("--reps", type=int, default=3, help="fresh processes per size and code (the minimum is kept)")
    ap.add_argument("--end-to-end", action="store_true", help="also time `hld train` to its first step")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cpu_data_startup.json"))
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="hld-data-startup-"))
    old_tree = work / "old"
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old_tree), args.old],
        check=True,
        capture_output=True,
    )
    base = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    envs = {
        "new": {**base, "HLD_CACHE_DIR": str(work / "cache-new"), "PYTHONPATH": str(ROOT / "src")},
        "old": {**base, "HLD_CACHE_DIR": str(work / "cache-old"), "PYTHONPATH": str(old_tree / "src")},
    }
    gguf = Path(os.environ.get("HLD_CACHE_DIR", Path.home() / ".cache" / "hld")) / "gguf"
    for env in envs.values():  # the teacher's one-time GGUF conversion, shared
        Path(env["HLD_CACHE_DIR"]).mkdir(parents=True)
        if gguf.is_dir():
            os.symlink(gguf, Path(env["HLD_CACHE_DIR"]) / "gguf")
    py = [sys.executable, "-m", "hld"]
    rows: dict[str, list[dict]] = {"new": [], "old": []}
    e2e: dict[str, list[dict]] = {"new": [], "old": []}
    prepare: dict[int, dict] = {}
    throughput: dict[int, dict] = {}
    try:
        for k in args.sizes:
            spec = corpus(work, k)
            t = peak_rss(
                [
                    *py,
                    "tokenize",
                    "--config",
                    "smoke",
                    f"data.train={spec}",
                    "data.max_train_docs=null",
                    "--json",
                    "--quiet",
                ],
                envs["new"],
            )
            warm = data_path(spec, envs["old"])  # the old code's first start fills its token cache
            prepare[k] = {"new_tokenize_wall_s": t["wall_s"], "old_first_start_wall_s": warm["wall_s"]}
            for code in ("new", "old"):
                for rep in range(args.reps):
                    rows[code].append({"copies": k, "rep": rep, **data_path(spec, envs[code])})
                if args.end_to_end:
                    for rep in range(2):
                        run_dir = work / f"{code}-{k}-{rep}"
                        r = peak_rss(train_cmd(py, spec, run_dir), envs[code], run_dir / "metrics.jsonl")
                        e2e[code].append(
                            {
                                "copies": k,
                                "rep": rep,
                                "first_step_s": r["first_step_s"],
                                "peak_rss_bytes": r["peak_rss_bytes"],
                            }
                        )
            print(f"k={k}: new {rows['new'][-1]}, old {rows['old'][-1]}", flush=True)
        spec = corpus(work, args.throughput_size)
        for workers in (1, 2):
            res = subprocess.run(
                [
                    *py,
                    "tokenize",
                    "--config",
                    "smoke",
                    f"data.train={spec}",
                    "data.max_train_docs=null",
                    "--split",
                    "train",
                    "--out",
                    str(work / f"throughput-{workers}"),
                    "--workers",
                    str(workers),
                    "--json",
                    "--quiet",
                ],
                env=envs["new"],
                capture_output=True,
                text=True,
                check=True,
            )
            (row,) = json.loads(res.stdout)["stores"]
            throughput[workers] = {
                "tokens": row["tokens"],
                "seconds": row["seconds"],
                "tokens_per_s": row["tokens"] / row["seconds"],
            }
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old_tree)], capture_output=True)
        subprocess.run(["git", "-C", str(ROOT), "worktree", "prune"], capture_output=True)

    print(f"\nmachine: {machine()} (OMP_NUM_THREADS=1; minimum of {args.reps} fresh processes)")
    print("data path of a start (train + validation windows + the first batch), store / token cache prepared:")
    print(
        f"{'copies':>6} {'tokens':>8} | {'new: wall':>9} {'cpu':>7} {'peak RSS':>9} | "
        f"{'old: wall':>9} {'cpu':>7} {'peak RSS':>9} | old/new wall"
    )
    table = []
    for k in args.sizes:
        n = {key: _best(rows["new"], k, key) for key in ("wall_s", "cpu_s", "peak_bytes")}
        o = {key: _best(rows["old"], k, key) for key in ("wall_s", "cpu_s", "peak_bytes")}
        table.append({"copies": k, "tokens": k * TOKENS_PER_COPY, "new": n, "old": o, **prepare[k]})
        print(
            f"{k:>6} {k * TOKENS_PER_COPY / 1e6:>7.1f}M | {n['wall_s']:>7.3f} s {n['cpu_s']:>5.3f} s "
            f"{n['peak_bytes'] / 2**20:>5.1f} MiB | {o['wall_s']:>7.3f} s {o['cpu_s']:>5.3f} s "
            f"{o['peak_bytes'] / 2**20:>5.0f} MiB | {o['wall_s'] / n['wall_s']:>8.0f}x"
        )
    law = {}
    for code in ("new", "old"):
        law[code] = {
            "s_per_token": fit(args.sizes, [_best(rows[code], k, "wall_s") for k in args.sizes]),
            "bytes_per_token": fit(args.sizes, [_best(rows[code], k, "peak_bytes") for k in args.sizes]),
        }
        print(
            f"growth ({code}): {law[code]['s_per_token'] * 1e6:.4f} µs and {law[code]['bytes_per_token']:.3f} B "
            "per corpus token"
        )
    lo, hi = min(args.sizes), max(args.sizes)
    ratio = _best(rows["new"], hi, "wall_s") / _best(rows["new"], lo, "wall_s")
    print(f"new: data path at {hi}x / at {lo}x = {ratio:.2f} (goal <= 1.2)")
    if args.end_to_end:
        for code in ("new", "old"):
            for k in args.sizes:
                print(
                    f"end to end ({code}, {k}x): first step {_best(e2e[code], k, 'first_step_s'):.1f} s, "
                    f"peak RSS {_best(e2e[code], k, 'peak_rss_bytes') / 2**20:.0f} MiB"
                )
    for w, t in throughput.items():
        print(
            f"hld tokenize, {w} worker(s): {t['tokens_per_s'] / 1e6:.3f}M tokens/s "
            f"({t['tokens']:,} tokens in {t['seconds']:.1f} s)"
        )
    print(f"scaling 1 -> 2 workers: x{throughput[2]['tokens_per_s'] / throughput[1]['tokens_per_s']:.2f}")
    Path(args.out).write_text(
        json.dumps(
            {
                "machine": machine(),
                "data_path": rows,
                "table": table,
                "growth": law,
                "ratio": ratio,
                "end_to_end": e2e,
                "tokenize": throughput,
            },
            indent=1,
        )
    )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
