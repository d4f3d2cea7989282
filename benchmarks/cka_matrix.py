"""The end-of-run CKA matrix (cka.json, `hld.eval.cka.Diagnostics.matrix`): the Gram route hld takes on
few positions against the feature route it took before (and still takes past `GRAM_ROWS` positions), on
the shapes of the derived demo: 10 student layers x 19 teacher layers of width 640 on 2,032 positions
(16 validation windows of 128, position 0 left out).

    python benchmarks/cka_matrix.py                     # the demo's shapes
    python benchmarks/cka_matrix.py --n 4096 --json     # other sizes

Feature route, per run: each layer's centred float64 copy, then ||Y_c^T X_c||_F^2 per pair (a d_s x d_t x n
product each: 190 of them). Gram route: each layer's centred Gram matrix K = X_c X_c^T (n x n, one
n x n x d product), flattened, and every pair's dot in one (L_s x n^2) @ (n^2 x L_t) product; the
teacher's Gram matrices are made once per process (the first run of `hld run` pays for them, the later
cells reuse them): "first run" and "later run" are timed apart. The states are random (CKA's cost
does not depend on their values); both routes' matrices are compared and must agree to 1e-9.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _measure import machine, table  # noqa: E402

from hld.eval.cka import cka_of_stacks, cka_of_terms, cka_terms, gram_stack  # noqa: E402


def feature_route(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> list[list[float]]:
    st = [cka_terms(x) for x in student]
    out = [[0.0] * len(teacher) for _ in student]
    for j, y in enumerate(teacher):
        tb = cka_terms(y)
        for i, a in enumerate(st):
            out[i][j] = cka_of_terms(a, tb)
    return out


def gram_route(student: list[torch.Tensor], teacher_grams) -> list[list[float]]:
    return cka_of_stacks(gram_stack(student), teacher_grams).tolist()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2032, help="positions")
    ap.add_argument("--d", type=int, default=640, help="width of every layer")
    ap.add_argument("--student-layers", type=int, default=10)
    ap.add_argument("--teacher-layers", type=int, default=19)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    student = [torch.randn(args.n, args.d, generator=g) for _ in range(args.student_layers)]
    teacher = [torch.randn(args.n, args.d, generator=g) for _ in range(args.teacher_layers)]

    t0 = time.perf_counter()
    ref = feature_route(student, teacher)
    feature_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    teacher_grams = gram_stack(teacher)
    teacher_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    got = gram_route(student, teacher_grams)
    later_s = time.perf_counter() - t0
    err = max(abs(a - b) for ra, rb in zip(ref, got) for a, b in zip(ra, rb))
    assert err < 1e-9, f"the two routes differ by {err}"

    result = {
        "machine": machine(),
        "shape": vars(args),
        "feature_s": feature_s,
        "gram_first_run_s": teacher_s + later_s,
        "gram_later_run_s": later_s,
        "teacher_grams_mib": teacher_grams[0].numel() * teacher_grams[0].element_size() / 2**20,
        "max_abs_difference": err,
    }
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    m = result["machine"]
    print(f"{m.get('device')}, {m.get('threads')} threads, torch {m['torch']}; n={args.n}, d={args.d}, "
          f"{args.student_layers} x {args.teacher_layers} layers")  # fmt: skip
    rows = [
        ["feature (before)", f"{feature_s:.2f}", "1.00x"],
        ["gram, first run", f"{teacher_s + later_s:.2f}", f"{feature_s / (teacher_s + later_s):.2f}x"],
        ["gram, later run", f"{later_s:.2f}", f"{feature_s / later_s:.2f}x"],
    ]
    print(table(rows, ["route", "seconds", "speed-up"]))
    print(f"teacher Gram matrices kept: {result['teacher_grams_mib']:.0f} MiB; routes agree to {err:.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
