"""What a teacher cache costs to keep and to open as it grows: files on disk, files and memory maps a
reader holds, and the start-up of a cached run (open + the first batch's checksums), at two cache
sizes (default 16 and 256 shards) of the same shapes. Synthetic caches (`_synthetic_cache`) written
through the build's own writer; format 3 kept a .npy per shard and field (its count is printed beside).

    python benchmarks/cache_scale.py --json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import _measure as M
import _synthetic_cache as synth
import numpy as np

from hld.cache.codec import Codec
from hld.cache.meta import CacheIdentity
from hld.cache.reader import CachedTeacher
from hld.distill.signals import Needs


def held(path: Path) -> tuple[int, int]:
    """(open file descriptors, memory maps) of this process on files under `path`."""
    fds = sum(1 for fd in os.listdir("/proc/self/fd") if os.path.realpath(f"/proc/self/fd/{fd}").startswith(str(path)))
    maps = {line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines() if str(path) in line}
    return fds, len(maps)


def one(tmp: Path, shards: int, args) -> dict:
    d = tmp / f"cache-{shards}"
    m = synth.write(
        d,
        n_windows=shards * args.shard_windows,
        T=args.seq_len,
        k=16,
        V=262_144,
        d=64,
        layers=[3, 6],
        codec=Codec(logits="compact", hidden="fp8"),
        shard_windows=args.shard_windows,
    )
    fields = len(m["shards"][0]["fields"])
    ident = CacheIdentity(**m["identity"])
    needs = Needs(logits=True, layers=(3, 6))
    opens, firsts = [], []
    for rep in range(args.repeats):  # medians: the 2 cores are shared with other jobs
        (d / "verified.jsonl").unlink(missing_ok=True)  # a first run: nothing stamped yet
        t0 = time.perf_counter()
        t = CachedTeacher(d, expect=ident)
        opens.append(time.perf_counter() - t0)
        batch = np.random.default_rng(rep).permutation(m["n_windows"])[:8]
        t0 = time.perf_counter()
        t.read(batch, args.seq_len, needs)  # the first step: its shards' checksums, then the decode
        firsts.append(time.perf_counter() - t0)
    opened, first = float(np.median(opens)), float(np.median(firsts))
    for s in range(shards):  # a reader that has touched every shard
        t.read(np.array([s * args.shard_windows]), args.seq_len, needs)
    fds, maps = held(d)
    t0 = time.perf_counter()
    n = t.parts.verify_all(force=True)
    verify_all = time.perf_counter() - t0
    return {
        "shards": shards,
        "tokens": m["tokens"],
        "files": sum(1 for p in d.rglob("*") if p.is_file()),
        "format3_files": shards * fields + 1,
        "open_fds_after_reading_all": fds,
        "mmaps_after_reading_all": maps,
        "manifest_bytes": (d / "manifest.json").stat().st_size,
        "open_s_median": opened,
        "first_batch_s_median": first,
        "verify_all_s": verify_all,
        "verified_arrays": n,
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[16, 256])
    p.add_argument("--shard-windows", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [one(Path(tmp), n, args) for n in args.sizes]
    keys = list(rows[0])
    print(f"cache scale: shards of {args.shard_windows} windows of {args.seq_len}, compact top-16, 2 fp8 layers")
    print(M.table([[r[k] if not isinstance(r[k], float) else f"{r[k]:.4f}" for k in keys] for r in rows], keys))
    if args.json:
        print(json.dumps({"machine": M.machine(), "revision": M.revision(), "rows": rows}))


if __name__ == "__main__":
    main()
