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

Planning: every cell's final config and teacher-cache group are resolved before anything trains, and
the study directory is created and recorded in study.json. A cell runs under its claim: skipped when
finished, a flops cell given its match's FLOPs, its group's teacher cache built or reused under the
cache lock, then trained (resumed from its checkpoint) and scored on the study's tasks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

from hld.atomic import read_json_object, write_fix, write_json
from hld.config import RunConfig
from hld.errors import HldError
from hld.locks import file_lock
from hld.paths import check_names
from hld.study.record import read_meta, update_meta
from hld.study.references import (
    derived_references,
    downstream,
    study_fidelity,
    study_references,
    teacher_references,
)
from hld.study.report import build_report
from hld.study.signals import cached, named
from hld.study.spec import Cell, Study, cell_config, expand, flops_overrides, load_study

# --------------------------------------------------------------------------- planning


def cache_group(cfg: RunConfig, signal: Optional[str] = "topk") -> str:
    """Cells with equal groups read the same training windows in the same order: one cache serves them.
    A cache of another signal than top-k (`sampled`) is its own group, named for it."""
    from hld.cache.build import cache_share_key

    digest = hashlib.sha256(cache_share_key(cfg).encode()).hexdigest()[:8]
    tail = f"-{signal}" if signal not in (None, "topk") else ""
    return f"seed{cfg.train.seed}-bs{cfg.train.batch_size}-{digest}{tail}"


def _reads_cache(cell: Cell, cfg: RunConfig) -> bool:
    """A distilled cell on a cached signal (an online cell runs the teacher in its loop)."""
    return cfg.objective.method != "ce" and cfg.teacher.cache is None and cached(cell.signal or "topk")


def plan_cells(study: Study, out: Path) -> list[tuple[Cell, RunConfig, Optional[str]]]:
    """Every cell's final config (with `teacher.cache` pointing at its group's cache) and group id.
    All configs are resolved before anything trains, so a bad value fails at once."""
    cache_root = out.resolve() / "caches"
    planned = []
    for cell in expand(study):
        # a flops cell's budget is known once its match has trained: a placeholder checks the rest now
        cfg = cell_config(study, cell, flops_overrides(1.0e15) if cell.flops_of else None)
        group = cache_group(cfg, cell.signal) if _reads_cache(cell, cfg) else None
        if group is not None:
            cfg = cell_config(study, cell, [f"teacher.cache={cache_root / group}"])
        planned.append((cell, cfg, group))
    return planned


Planned = tuple[Cell, RunConfig, Optional[str]]  # a cell, its config, its cache group (None: no cache)


def open_study(
    study_cfg: str, out_dir: Optional[Path] = None, *, overrides: Optional[list[str]] = None
) -> tuple[Study, Path, list[Planned]]:
    """Read and plan the study, create its directory and record it in study.json (rank 0)."""
    study = load_study(study_cfg, overrides)
    out = Path(out_dir or f"studies/{study.name}")
    planned = plan_cells(study, out)
    if study.tasks:  # a misspelt task or missing data fails now, not after the first cell
        from hld.eval.harness import check_tasks

        check_tasks(list(study.tasks))
    if out.exists() and not out.is_dir():
        raise HldError(f"--out {out} is an existing file, not a study directory", "give a directory for --out")
    check_names(out, "--out" if out_dir else "the study directory (studies/<name>)")
    for cell, _, group in planned:
        check_names(out / "runs" / cell.id, "a cell's run directory")
        if group is not None:
            check_names(out / "caches" / group, "a cache directory")
    _check_study_dir(out)
    try:
        (out / "runs").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise HldError(f"cannot create the study directory {out}: {exc.strerror or exc}", write_fix(exc)) from exc

    def record(meta: dict) -> None:
        meta.update(
            {
                "name": study.name,
                "source": study.source,
                "study": _study_dict(study),
                "cells": [c.id for c, _, _ in planned],
            }
        )
        meta.setdefault("caches", {})

    if process_rank() == 0:
        update_meta(out, record)
    return study, out, planned


def _check_study_dir(out: Path) -> None:
    """A study writes into a new or empty directory, or one a study wrote (study.json or runs/): never over
    another directory's report.md, results.csv or plots/."""
    if not out.is_dir() or (out / "study.json").is_file() or (out / "runs").is_dir():
        return
    # what a study writes first (study.sbatch: its job logs in slurm/, then cache jobs before any cell)
    own = {".study.lock", "locks", "caches", "slurm"}
    names = sorted(p.name for p in out.iterdir() if p.name not in own)
    if names:
        shown = ", ".join(names[:4]) + (f", … ({len(names)} entries)" if len(names) > 4 else "")
        raise HldError(
            f"--out {out} is not empty and is not a study directory (it holds {shown}; no study.json or runs/)",
            "give a new or empty directory for --out (hld study writes report.md, results.csv, plots/ there)",
        )


def process_rank() -> int:
    from hld.distributed import launch_env

    return launch_env()[1]


def _study_dict(study: Study) -> dict:
    return {
        "name": study.name,
        "base": study.base,
        "overrides": list(study.overrides),
        "arms": list(study.arms),
        "students": list(study.students),
        "budgets": list(study.budgets),
        "grid": {k: list(v) for k, v in study.grid.items()},
        "seeds": list(study.seeds),
        "tasks": list(study.tasks),
        "task_limit": study.task_limit,
        "score_students": study.score_students,
        "equal_flops": study.equal_flops,
        # earlier studies' record unchanged
        **(
            {
                "signals": list(study.signals),
                "signal_overrides": {k: list(v) for k, v in study.signal_overrides.items()},
            }
            if named(study.signals)
            else {}
        ),
    }


# --------------------------------------------------------------------------- one cell


def run_cell(
    study: Study,
    planned: list[Planned],
    entry: Planned,
    out: Path,
    resources,
    quiet: bool,
    *,
    wait: bool,
    ready: Optional[set] = None,
) -> tuple[str, Optional[dict], dict]:
    """Train one cell if it is not finished, under its claim. Returns (status, summary, task scores):
    "trained", "done" (finished before, here or by another process), "held" (`wait=False` and another
    process holds it) or "blocked" (a flops cell whose match has not finished).

    Under torchrun rank 0 alone takes the claim (the other ranks cannot skip consistently with it; they
    meet it in the training's process group), and rank 0 alone writes cell.json and downstream.json."""
    cell, cfg, group = entry
    run_dir = out / "runs" / cell.id
    if cell.flops_of and not (out / "runs" / cell.flops_of / "summary.json").exists():
        return "blocked", None, {}
    main = process_rank() == 0
    claim = file_lock(out / "locks" / "cells" / f"{cell.id}.lock", wait=wait) if main else contextlib.nullcontext(True)
    with claim as claimed:
        if not claimed:
            return "held", None, {}
        if cell.flops_of:
            cell, cfg = _matched(study, cell, out)
        if finished(run_dir, cfg):
            if not main:
                return "done", None, {}
            if not (run_dir / "cell.json").exists():  # finished, then stopped before its cell.json
                write_json(run_dir / "cell.json", cell.describe())
            return "done", None, downstream(study, cfg, run_dir, resources, quiet)  # e.g. tasks added later
        if group is not None and (ready is None or group not in ready):
            group_cache(planned, group, out, resources, quiet)
            if ready is not None:
                ready.add(group)
        summary = _train_cell(cell, cfg, run_dir, resources, quiet)
        return "trained", summary, downstream(study, cfg, run_dir, resources, quiet) if main else {}


def group_cache(
    planned: list[Planned], group: str, out: Path, resources, quiet: bool, *, part: tuple[int, int] = (0, 1)
) -> dict:
    """Build (or reuse) a group's cache under its lock: the first process builds it, the others wait
    and then find it complete. The record goes into study.json (a build's record is never replaced by a
    later process's reuse of it). Part I of N of a build (`--shard`) takes no group lock (the parts run
    at once; the cache's own locks keep them apart) and is recorded only by the part that assembles it."""
    if part[1] > 1:
        record = _ensure_group_cache(planned, group, out, resources, quiet, part=part)
        if record.get("assembled") is False:
            return record
    else:
        with file_lock(out / "locks" / "caches" / f"{group}.lock"):
            record = _ensure_group_cache(planned, group, out, resources, quiet)

    def keep(meta: dict) -> None:
        caches = meta.setdefault("caches", {})
        if group not in caches or not record["reused"]:
            caches[group] = record

    if process_rank() == 0:
        update_meta(out, keep)
    return record


def _matched(study: Study, cell: Cell, out: Path) -> tuple[Cell, RunConfig]:
    """A flops cell with its budget: the FLOPs its match (same configuration and seed, the
    `equal_flops` arm) spent with the teacher counted, read from the match's summary.json."""
    summary = read_json_object(
        out / "runs" / cell.flops_of / "summary.json",
        "run summary",
        f"delete {out / 'runs' / cell.flops_of} and rerun the study",
    )
    spent = float(summary["flops"])
    cell = dataclasses.replace(cell, budget={"flops": spent})
    return cell, cell_config(study, cell, flops_overrides(spent))


def finished(run_dir: Path, cfg: RunConfig) -> bool:
    if not (run_dir / "summary.json").exists():
        return False
    from hld.train.rundir import read_run_config, same_config

    saved = read_run_config(run_dir / "config.yaml") if (run_dir / "config.yaml").exists() else None
    if saved is None or not same_config(saved, cfg):
        raise HldError(
            f"finished cell {run_dir} was trained with a different config than the study now asks for",
            "restore the study's config, or write the study to a new --out directory",
        )
    return True


def _ensure_group_cache(
    planned: list, group: str, out: Path, resources, quiet: bool, *, part: tuple[int, int] = (0, 1)
) -> dict:
    """Build (or reuse) the group's cache from the configs of all its cells, finished or not, so a
    resumed study reads the same cache as an uninterrupted one."""
    from hld.cache.build import ensure_cache

    cfgs = [cell_config_without_cache(cfg) for _, cfg, g in planned if g == group]
    m = ensure_cache(cfgs, out / "caches" / group, resources, quiet=quiet, part=part)
    if m.get("assembled") is False:
        return {"dir": f"caches/{group}", "assembled": False, "shards_done": m["shards_done"], "shards": m["shards"]}
    return {
        "dir": f"caches/{group}",
        "tokens": m.get("tokens"),
        "build_seconds": m.get("build_seconds"),
        "build_flops": m.get("build_flops"),
        "bytes": m.get("bytes"),
        "reused": bool(m.get("reused")),
    }


def cell_config_without_cache(cfg: RunConfig) -> RunConfig:
    return dataclasses.replace(cfg, teacher=dataclasses.replace(cfg.teacher, cache=None))


def _train_cell(cell: Cell, cfg: RunConfig, run_dir: Path, resources, quiet: bool) -> dict:
    """Resume the cell from its checkpoint, else (re)start it in a clean directory. Called under the
    cell's claim. cell.json is written first, so no finished cell (summary.json) ever lacks it."""
    from hld.distributed import launch_env
    from hld.train import loop
    from hld.train.checkpoint import has_checkpoint

    world, rank, _ = launch_env()
    if world == 1:
        if run_dir.exists() and not has_checkpoint(run_dir):
            shutil.rmtree(run_dir)  # started, never checkpointed: nothing to keep
        resume = run_dir.exists()
    else:  # every rank the same: --resume starts a directory without a run (hld.train.loop._prepare_dir)
        resume = True
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / "cell.json", cell.describe())
    return loop.train(cfg, run_dir, resume=resume, resources=resources, quiet=quiet)


# --------------------------------------------------------------------------- the study


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
    trained: list[str] = []
    skipped: list[str] = []
    ready: set[str] = set()  # ready: the cache groups this process has checked
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
        meta["ngram_reference"] = study_references(planned, out, resources)
        meta["derived_reference"] = derived_references(planned, meta.get("derived_reference") or [], resources, quiet)
        meta["signal_fidelity"] = study_fidelity(
            planned, out, resources, meta.get("signal_fidelity") or [], quiet=quiet
        )
        write_json(out / "study.json", meta)
        return build_report(out)
