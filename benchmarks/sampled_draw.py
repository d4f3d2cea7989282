"""Time of the sampled signal's draws (`hld.distill.signals.sampled.draw`: K ids per position from
softmax(z / tau) by inverse CDF) against the one-level search it replaced, a (rows, V) float64
cumulative sum then `searchsorted`, in the same run on the same logits; the two give the same ids
(checked here on every repeat). The draws are the sampled cache build's own cost on top of the
teacher's forward (ROWS positions at a time, as `sampled_rows` calls it). Each figure is the minimum
over `--repeats` (the machine may be shared).

    python benchmarks/sampled_draw.py              # V = 262,144, 32 rows, K = 20, 1 thread
    python benchmarks/sampled_draw.py --json
"""

from __future__ import annotations

import argparse
import json

import _measure as M
import numpy as np
import torch

from hld.distill.signals.sampled import ROWS, draw


def one_level(z: torch.Tensor, u: np.ndarray, *, tau: float) -> torch.Tensor:
    """The previous draw: one (rows, V) float64 cumulative sum."""
    q = torch.softmax(z.float() / tau if tau != 1 else z.float(), dim=-1)
    cdf = torch.cumsum(q, dim=-1, dtype=torch.float64)
    x = torch.from_numpy(np.ascontiguousarray(u)) * cdf[:, -1:]
    return torch.searchsorted(cdf, x, right=True).clamp_max_(z.shape[-1] - 1)


def best(fn, repeats: int) -> float:
    return min(M.timed(fn, torch.device("cpu"))[0] for _ in range(repeats))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", type=int, default=262_144)
    ap.add_argument("--rows", type=int, default=ROWS)
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--tau", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rng = np.random.default_rng(0)
    z = torch.from_numpy(rng.normal(0, 3.0, (a.rows, a.vocab)).astype(np.float32))
    u = rng.random((a.rows, a.samples))
    if not torch.equal(draw(z, u, tau=a.tau), one_level(z, u, tau=a.tau)):
        raise SystemExit("the two searches drew different ids")
    ours, naive = best(lambda: draw(z, u, tau=a.tau), a.repeats), best(lambda: one_level(z, u, tau=a.tau), a.repeats)
    out = {
        "machine": M.machine(),
        "vocab": a.vocab,
        "rows": a.rows,
        "samples": a.samples,
        "threads": a.threads,
        "two_level_ms": ours * 1e3,
        "one_level_ms": naive * 1e3,
        "speedup": naive / ours,
    }
    if a.json:
        print(json.dumps(out))
    else:
        print(
            f"draw of {a.samples} ids x {a.rows} rows over V = {a.vocab:,} ({a.threads} thread): "
            f"two-level {ours * 1e3:.1f} ms, one-level float64 cumsum {naive * 1e3:.1f} ms: x{naive / ours:.2f}"
        )


if __name__ == "__main__":
    main()
