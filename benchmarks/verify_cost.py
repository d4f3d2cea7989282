"""What verifying a token store's shards and a teacher cache's fields costs (issue 31, docs/runs.md "What is
verified when"): sha256 (what the checksums are; hashlib, SHA-NI where the CPU has it) and zlib's crc32 (the
per-block alternative) in GB/s over a buffer in memory (a memory-mapped field the page cache holds), and a
stamp's check, one `stat` (`hld.fingerprint.file_state`). Extrapolated to the demo's store and caches and to
a 2B-token store and cache (sizes from `hld plan`): what hashing at every process's first read would cost,
against the stamps' cost once a file is verified. Each figure is the best of `--repeats` (a shared machine).

    python benchmarks/verify_cost.py            # 256 MiB buffer, 3 repeats
    python benchmarks/verify_cost.py --json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
import time
import zlib
from pathlib import Path

import _measure as M
import numpy as np

from hld.fingerprint import file_state

# bytes (docs/runs.md): the demo's store (1.19M train + 79k validation tokens, uint32) and its four caches
# (`hld plan --config demo`: 23.7 MB); a 2B-token store (uint32) and paper-123m's KD cache (`hld plan
# --config paper-123m`: ~315 B/token, 629 GB) and a cache of the demo's codec with two fp8 hidden layers
# (1,449 B/token: 2.9 TB)
SIZES = {
    "demo store": 1_269_000 * 4,
    "demo caches": 23_742_095,
    "2B-token store": 2_000_000_000 * 4,
    "2B-token cache, kd (paper-123m)": 629e9,
    "2B-token cache, 2 hidden layers": 2_000_000_000 * 1449,
}


def rate(fn, buf: memoryview, repeats: int) -> float:
    """GB/s of fn(buf), best of `repeats`."""
    best = min(_time(fn, buf) for _ in range(repeats))
    return len(buf) / best / 1e9


def _time(fn, buf) -> float:
    t0 = time.perf_counter()
    fn(buf)
    return time.perf_counter() - t0


def stat_seconds(n: int) -> float:
    """Seconds per `file_state` (one stat), over n calls on one file."""
    with tempfile.NamedTemporaryFile() as fh:
        t0 = time.perf_counter()
        for _ in range(n):
            file_state(Path(fh.name))
        return (time.perf_counter() - t0) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    buf = memoryview(np.random.default_rng(0).integers(0, 256, args.mib << 20, dtype=np.uint8).tobytes())
    sha = rate(lambda b: hashlib.sha256(b).digest(), buf, args.repeats)
    crc = rate(lambda b: zlib.crc32(b), buf, args.repeats)
    stat_s = stat_seconds(10_000)
    rows = {name: {"bytes": int(n), "sha256_s": n / sha / 1e9, "crc32_s": n / crc / 1e9} for name, n in SIZES.items()}
    result = {"sha256_GBps": sha, "crc32_GBps": crc, "stat_us": stat_s * 1e6, "sizes": rows, "machine": M.machine()}
    if args.json:
        print(json.dumps(result))
        return
    print(f"sha256 {sha:.2f} GB/s, crc32 {crc:.2f} GB/s, one stamp's stat {stat_s * 1e6:.1f} us (one thread)")
    for name, r in rows.items():
        print(f"  {name:34s} {r['bytes'] / 1e9:10.3f} GB: sha256 {r['sha256_s']:10.3f} s, crc32 {r['crc32_s']:10.3f} s")


if __name__ == "__main__":
    main()
