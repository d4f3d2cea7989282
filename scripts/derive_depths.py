"""Unhealed depth-pruned students of a teacher beside the teacher: for each ranking and depth, the kept
blocks and the validation loss of the pruned model before any training, on the windows the demo scores.

    python scripts/derive_depths.py [--teacher gemma-3-270m] [--depths 6,9,12] [--val-windows 32]

Prints one JSON line per (ranking, depth) and a markdown table (docs/decisions.md, "Students derived from
the teacher"), beside the teacher and the unigram and bigram fitted on the whole training split, all on
the same validation windows.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from hld.config import load_config
from hld.models.derive import (
    angular_distances,
    block_influence,
    kept_by,
    layer_states,
    loss_drop,
    mean_loss,
    prune_depth,
)
from hld.models.hooks import n_blocks
from hld.study.references import cross_entropy, fit_split
from hld.train.resources import Resources


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", default="gemma-3-270m")
    ap.add_argument("--explicit", default="0-5+15-17", help="also score these kept blocks ('' : none)")
    ap.add_argument("--depths", default="6,9,12")
    ap.add_argument("--ranks", default="block_influence,angular,loss_drop")
    ap.add_argument("--val-windows", type=int, default=32, help="validation windows scored (the demo's: 32)")
    ap.add_argument("--calibration-windows", type=int, default=16)
    ap.add_argument("--loss-drop-windows", type=int, default=4, help="loss_drop's calibration (19 forwards each)")
    args = ap.parse_args()
    teacher, train, val, rows = reference_rows(args.teacher, args.val_windows)
    t0 = time.time()
    rows.append({"student": "teacher", "val_loss": mean_loss(teacher, val), "seconds": time.time() - t0})
    for row in rows:
        print(json.dumps(row), flush=True)
    for rank in args.ranks.split(","):
        w = args.loss_drop_windows if rank == "loss_drop" else args.calibration_windows
        calib = np.asarray(train[:w])
        t0 = time.time()
        states = layer_states(teacher, calib) if rank != "loss_drop" else None  # one pass for every depth
        scores_ld = loss_drop(teacher, calib) if rank == "loss_drop" else None
        rank_s = time.time() - t0
        for n in (int(x) for x in args.depths.split(",")):
            L = n_blocks(teacher)
            if rank == "loss_drop":
                scores = scores_ld
            elif rank == "block_influence":
                scores = block_influence(states)
            else:
                scores = angular_distances(states, L - n)
            kept = kept_by(rank, scores, n=n, n_teacher=L)
            t0 = time.time()
            loss = mean_loss(prune_depth(teacher, kept), val)
            row = {"student": f"depth-{n}", "rank": rank, "windows": w, "kept": list(kept), "val_loss": loss}
            row["rank_seconds"], row["eval_seconds"] = rank_s, time.time() - t0
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.explicit:
        kept = blocks_of(args.explicit)
        row = {"student": f"depth-{len(kept)}", "rank": "explicit", "kept": kept}
        row["val_loss"] = mean_loss(prune_depth(teacher, tuple(kept)), val)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| student | ranking | kept blocks (0-based) | unhealed val loss |\n|---|---|---|---:|")
    for r in rows:
        print(f"| {r['student']} | {r.get('rank', '—')} | {r.get('kept', '—')} | {r['val_loss']:.4f} |")


def reference_rows(teacher_name: str, val_windows: int):
    """The demo's data with `teacher_name` in fp32: (teacher, training windows, the first `val_windows`
    validation windows, the unigram and bigram rows fitted on the whole training split and scored on them)."""
    res = Resources()
    base = load_config("demo", [f"teacher.model={teacher_name}", "teacher.dtype=float32"])
    tok = res.tokenizer(base.teacher.model)
    teacher = res.teacher(base.teacher.model, "float32").model
    train = res.train_windows(base.data, tok)
    val = np.asarray(res.validation_windows(base.data, tok, n=val_windows))
    counts, _ = fit_split(train, vocab_size=teacher.get_input_embeddings().weight.shape[0])
    grams = cross_entropy(counts, list(val))  # the study's whole-split n-gram rows, on these windows
    rows: list[dict] = [{"student": f"{m}: whole train split", "val_loss": grams[m]} for m in ("unigram", "bigram")]
    return teacher, train, val, rows


def blocks_of(spec: str) -> list[int]:
    """Kept blocks written as spans: '0-5+15-17' -> [0, 1, 2, 3, 4, 5, 15, 16, 17]."""
    out = []
    for part in spec.split("+"):
        a, _, b = part.partition("-")
        out += range(int(a), int(b or a) + 1)
    return out


if __name__ == "__main__":
    main()
