"""`hld study`: train every cell of a study as an ordinary run directory, then write the report.

<out>/study.json                the study as read, its cells, the teacher caches' build cost and the
                                teacher's own validation loss (the reference line of the report)
<out>/runs/<cell id>/           an `hld train` run directory, plus cell.json (the cell's keys) and,
                                when the study names tasks, downstream.json (lm-eval scores)
<out>/caches/<group id>/        one offline teacher cache per group of KD/HLD cells that read the
                                same windows (same teacher, data, seed and batch size) and signal
                                (a cell on the `online` signal reads none: its teacher runs in the loop)
<out>/report.md results.csv paired.csv plots/

A cell with summary.json is finished and skipped (after checking its config is the one the study
asks for), so an interrupted study resumes where it stopped; a cell stopped after a checkpoint
(SIGTERM writes one) resumes from it; any other partial cell directory is removed and trained again.

Several processes may work on one study directory at once (SLURM array tasks, `hld study --cell`, or
two whole `hld study`): locks (`hld.locks`, released by the kernel when a holder dies) make
<out>/locks/cells/<id>.lock     the claim on a cell: one process trains it. A whole-study process
                                first skips cells others hold, then waits for them; `--cell` waits.
<out>/locks/caches/<group>.lock one builder per cache; the others wait, then reuse the complete cache
                                (it is built in a temporary directory and renamed when complete)
<out>/.study.lock               study.json's read-modify-writes, and the report's files
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional

from hld.atomic import write_json
from hld.errors import HldError
from hld.locks import file_lock
from hld.study import fidelity, ngram
from hld.study.cells import finished, run_cell
from hld.study.planning import Planned, open_study
from hld.study.record import read_meta
from hld.study.references import teacher_references
from hld.study.report import build_report
from hld.study.spec import Study


def run_study(
    study_cfg: str, out_dir: Optional[Path] = None, *, overrides: Optional[list[str]] = None, quiet: bool = False
) -> dict:
    from hld.train.resources import Resources

    t0 = time.time()
    study, out, planned = open_study(study_cfg, out_dir, overrides=overrides)
    resources = Resources()
    done = [c.id for c, cfg, _ in planned if not c.flops_of and finished(out / "runs" / c.id, cfg)]
    say = (lambda msg: None) if quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    say(f"study {study.name}: {len(planned)} cells, {len(done)} already finished -> {out}")
    trained, skipped, ready = [], [], set()  # ready: the cache groups this process has checked
    pending = list(enumerate(planned, 1))
    for wait in (False, True):  # first skip the cells other processes hold, then wait for them
        held = []
        for k, entry in pending:
            status, summary, scores = run_cell(study, planned, entry, out, resources, quiet, wait=wait, ready=ready)
            cell = entry[0]
            if status in ("held", "blocked"):
                if wait:  # its match came first in this pass and is finished by now
                    raise HldError(
                        f"cell {cell.id} could not run: {cell.flops_of} did not finish",
                        f"run `hld study --cell {cell.flops_of}` and read its error",
                    )
                held.append((k, entry))
            elif status == "done":
                skipped.append(cell.id)
            else:
                trained.append(cell.id)
                tasks = "".join(f", {t} {r['metric']} {r['value']:.3f}" for t, r in scores.items())
                say(
                    f"[{k}/{len(planned)}] {cell.id}: val ppl {summary.get('val/ppl', float('nan')):.2f}{tasks} "
                    f"({summary['train_seconds']:.0f} s training)"
                )
        if held and not wait:
            say(f"{len(held)} cells held by other processes: waiting for them")
        pending = held
    report = finish_study(study, planned, out, resources, quiet)
    return {
        "study_dir": str(out),
        "cells": len(planned),
        "trained": trained,
        "skipped": skipped,
        "seconds": time.time() - t0,
        **report,
    }


def finish_study(study: Study, planned: list[Planned], out: Path, resources, quiet: bool) -> dict:
    """The teacher and n-gram references, then the report, once every cell has finished. Under the
    study lock: a second process finishing at the same time waits, then reuses the references."""
    with file_lock(out / ".study.lock"):
        meta = read_meta(out)
        meta["teacher_reference"] = teacher_references(
            study, planned, meta.get("teacher_reference") or [], resources, quiet
        )
        meta["ngram_reference"] = ngram.study_references(planned, out, resources)
        meta["signal_fidelity"] = fidelity.study_fidelity(
            planned, out, resources, meta.get("signal_fidelity") or [], quiet=quiet
        )
        write_json(out / "study.json", meta)
        return build_report(out)
