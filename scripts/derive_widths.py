"""Unhealed students of a teacher narrowed in the residual stream, beside the teacher: for each residual width
and each way (`student.init.residual`: prune, project), the validation loss of the derived student before any
training, on the windows the demo scores.

    python scripts/derive_widths.py [--teacher gemma-3-270m] [--blocks 0-5+15-17] [--widths 640,512,384,256]

The kept blocks are given (default: the demo's depth-9 student); `--blocks all` keeps every block, so only the
width changes. `--folds` also scores project with other norms folded into their linear layers (`none`: every
norm keeps a diagonal; `all`: the post-attention and post-feedforward norms folded too), the choice
docs/decisions.md records. Prints one JSON line per student and a markdown table
(docs/decisions.md, "Students derived from the teacher"), beside the teacher and the unigram and bigram fitted
on the whole training split, on the same validation windows.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from derive_depths import blocks_of, reference_rows  # scripts/, beside this file

from hld.models.derive import mean_loss, prune_depth
from hld.models.hooks import n_blocks
from hld.models.residual_width import READS, WRITES, moments, residual_of


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", default="gemma-3-270m")
    ap.add_argument("--blocks", default="0-5+15-17", help="kept teacher blocks, e.g. 0-5+15-17, or 'all'")
    ap.add_argument("--widths", default="640,512,384,256")
    ap.add_argument("--val-windows", type=int, default=16, help="validation windows scored (the demo's: 16)")
    ap.add_argument("--calibration-windows", type=int, default=16)
    ap.add_argument("--folds", default="", help="also score project with these folds: none, all (comma-separated)")
    ap.add_argument("--ways", default="prune,project")
    args = ap.parse_args()
    teacher, train, val, rows = reference_rows(args.teacher, args.val_windows)
    calib = np.asarray(train[: args.calibration_windows])
    L = n_blocks(teacher)
    kept = tuple(range(L)) if args.blocks == "all" else tuple(blocks_of(args.blocks))
    rows.append({"student": f"teacher ({L} blocks)", "d_model": 640, "val_loss": mean_loss(teacher, val)})
    for row in rows:
        print(json.dumps(row), flush=True)
    folds = {"none": (), "all": READS + WRITES}
    ways = [("prune", None), ("project", None)] + [("project", f) for f in args.folds.split(",") if f]
    for how in args.ways.split(","):
        t0 = time.time()
        stats = moments(teacher, calib, kept, full=how == "project")  # one pass serves every width
        calib_s = time.time() - t0
        for d in (int(x) for x in args.widths.split(",")):
            for fold in [f for h, f in ways if h == how]:
                t0 = time.time()
                r = residual_of(teacher, stats, how=how, d_model=d, fold=None if fold is None else folds[fold])
                loss = mean_loss(prune_depth(teacher, kept, residual=r), val)
                name = how if fold is None else f"{how} (fold={fold})"
                row = {"student": f"depth-{len(kept)}", "residual": name, "d_model": d, "val_loss": loss}
                row |= {"captured": r.captured, "calibration_seconds": calib_s, "seconds": time.time() - t0}
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(f"\nkept blocks {list(kept)}; {len(val)} validation windows\n")
    print("| student | residual | d_model | energy kept | unhealed val loss |\n|---|---|---:|---:|---:|")
    for r in rows:
        cap = f"{r['captured']:.1%}" if "captured" in r else "—"
        print(f"| {r['student']} | {r.get('residual', '—')} | {r.get('d_model', '—')} | {cap} | {r['val_loss']:.4f} |")


if __name__ == "__main__":
    main()
