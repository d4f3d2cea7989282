"""Record smoke runs of every arm from a source tree, or compare two recordings bitwise: the check a
refactor of the loop, the objectives or the losses must pass (issue 22: callbacks, hidden-loss registry).

    python scripts/compare_runs.py record SRC OUT   # SRC: a checkout's src/ (PYTHONPATH for the runs)
    python scripts/compare_runs.py compare OUT_A OUT_B

Each arm trains 8 steps of the smoke config on the test fixtures (fp32, validation every 2 steps,
checkpoints every 3) with the online teacher, and kd and hld-joint again from a top-k cache and kd from
a sampled cache (every teacher-signal kind). compare checks metrics.jsonl, summary.json (timings
aside) and cka.json; exit 1 on any difference.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ARMS = ("ce", "kd", "hld-joint", "hld-first")
# runs from a cache: name -> (arm, the cache's signal)
CACHED = {"kd-topk": ("kd", "topk"), "hld-joint-topk": ("hld-joint", "topk"), "kd-sampled": ("kd", "sampled")}
RUNS = (*ARMS, *CACHED)
TESTS = Path(__file__).resolve().parents[1] / "tests"
TIME = ("tokens_per_s", "train_seconds", "seconds")


def record(src: str, out: Path) -> None:
    sys.path.insert(0, str(TESTS))
    from helpers import tiny_overrides  # the fixtures' overrides (later keys replace earlier ones)

    env = {**os.environ, "PYTHONPATH": src, "HLD_CACHE_DIR": str(out / "cache")}
    over = [
        *tiny_overrides(),
        "budget.tokens=1024",
        "train.eval_every_steps=2",
        "train.checkpoint_every_steps=3",
        "train.log_every_steps=1",
    ]
    hld = [sys.executable, "-m", "hld"]
    for arm in ARMS:
        cmd = [*hld, "train", "--config", "smoke", "--out", str(out / arm), *over]
        subprocess.run([*cmd, f"objective.method={arm}", "--quiet"], env=env, check=True)
    for signal in ("topk", "sampled"):  # one cache per signal, with hld-joint's layers
        sig = [f"teacher.cache_signal={signal}"]
        cache = [
            "cache-teacher",
            "--config",
            "smoke",
            "--out",
            str(out / f"cache-{signal}"),
            "objective.method=hld-joint",
        ]
        subprocess.run([*hld, *cache, *over, *sig, "--quiet"], env=env, check=True)
    for name, (arm, signal) in CACHED.items():
        sig = [f"teacher.cache_signal={signal}", f"teacher.cache={out / f'cache-{signal}'}"]
        cmd = [*hld, "train", "--config", "smoke", "--out", str(out / name), *over, *sig]
        subprocess.run([*cmd, f"objective.method={arm}", "--quiet"], env=env, check=True)


def _clean(d: dict) -> dict:
    return {k: v for k, v in d.items() if not any(t in k for t in TIME)}


def compare(a: Path, b: Path) -> bool:
    same = True
    for arm in RUNS:
        ma, mb = ([_clean(json.loads(x)) for x in (d / arm / "metrics.jsonl").read_text().splitlines()] for d in (a, b))
        sa, sb = (_clean(json.loads((d / arm / "summary.json").read_text())) for d in (a, b))
        ca, cb = ((d / arm / "cka.json").read_bytes() if (d / arm / "cka.json").exists() else None for d in (a, b))
        ok = ma == mb and sa == sb and ca == cb
        same &= ok
        print(f"{arm}: {'identical' if ok else 'DIFFERENT'} ({len(ma)} metric lines)")
    return same


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "record":
        record(sys.argv[2], Path(sys.argv[3]))
    elif len(sys.argv) == 4 and sys.argv[1] == "compare":
        sys.exit(0 if compare(Path(sys.argv[2]), Path(sys.argv[3])) else 1)
    else:
        sys.exit(__doc__)
