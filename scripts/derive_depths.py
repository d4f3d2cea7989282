"""Unhealed depth-pruned students of a teacher beside the teacher: for each ranking and depth, the kept
blocks and the validation loss of the pruned model before any training, on the windows the demo scores.

    python scripts/derive_depths.py [--teacher gemma-3-270m] [--depths 6,9,12] [--val-windows 32]

Prints one JSON line per (ranking, depth) and a markdown table (docs/decisions.md, "Students derived from
the teacher"). The n-gram rows to set beside it are the demo report's (docs/demo-report.md).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from hld.config import load_config
from hld.models.derive import derive, mean_loss, prune_depth
from hld.train.resources import Resources


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", default="gemma-3-270m")
    ap.add_argument("--depths", default="6,9,12")
    ap.add_argument("--ranks", default="block_influence,angular,loss_drop")
    ap.add_argument("--val-windows", type=int, default=32, help="validation windows scored (the demo's: 32)")
    ap.add_argument("--calibration-windows", type=int, default=16)
    ap.add_argument("--loss-drop-windows", type=int, default=4, help="loss_drop's calibration (19 forwards each)")
    args = ap.parse_args()
    res = Resources()
    base = load_config("demo", [f"teacher.model={args.teacher}", "teacher.dtype=float32"])
    tok = res.tokenizer(base.teacher.model)
    teacher = res.teacher(base.teacher.model, "float32").model
    train = res.train_windows(base.data, tok)
    val = np.asarray(res.validation_windows(base.data, tok, n=args.val_windows))
    t0 = time.time()
    rows = [{"student": "teacher", "val_loss": mean_loss(teacher, val), "seconds": time.time() - t0}]
    print(json.dumps(rows[0]), flush=True)
    for rank in args.ranks.split(","):
        w = args.loss_drop_windows if rank == "loss_drop" else args.calibration_windows
        for n in (int(x) for x in args.depths.split(",")):
            cfg = load_config(
                "demo",
                [f"student.preset=depth-{n}", f"student.init.rank={rank}", f"student.init.calibration_windows={w}"],
            )
            d = derive(cfg.student, teacher=teacher, teacher_name=args.teacher, train_windows=train)
            t0 = time.time()
            loss = mean_loss(prune_depth(teacher, d.kept), val)
            row = {"student": f"depth-{n}", "rank": rank, "windows": w, "kept": list(d.kept), "val_loss": loss}
            row["rank_seconds"], row["eval_seconds"] = d.seconds, time.time() - t0
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| student | ranking | kept blocks (0-based) | unhealed val loss |\n|---|---|---|---:|")
    for r in rows:
        print(f"| {r['student']} | {r.get('rank', '—')} | {r.get('kept', '—')} | {r['val_loss']:.4f} |")


if __name__ == "__main__":
    main()
