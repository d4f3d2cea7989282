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

import contextlib
import dataclasses
import hashlib
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import torch

from hld.atomic import read_json_object, write_fix, write_json
from hld.config import RunConfig
from hld.errors import HldError
from hld.locks import file_lock
from hld.paths import check_names
from hld.study import fidelity, ngram
from hld.study.grid import Cell, cell_config, expand, flops_overrides
from hld.study.record import checked_meta
from hld.study.report import build_report
from hld.study.signals import cached, named
from hld.study.spec import Study, load_study


def cache_group(cfg: RunConfig, signal: Optional[str] = "topk") -> str:
    """Cells with equal groups read the same training windows in the same order: one cache serves them.
    A cache of another signal than top-k (`sampled`) is its own group, named for it."""
    from hld.train.cache_build import cache_share_key

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

    if _rank() == 0:
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


def _rank() -> int:
    from hld.distributed import launch_env

    return launch_env()[1]


def read_meta(out: Path) -> dict:
    path = out / "study.json"
    fix = f"delete {path}: it is rebuilt from the run directories"
    return checked_meta(read_json_object(path, "study record", fix), path, fix) if path.exists() else {}


def update_meta(out: Path, change: Callable[[dict], None]) -> dict:
    """Read study.json, apply `change`, write it back, under the study lock (other processes update
    it too: without the lock one's cache record could overwrite another's)."""
    with file_lock(out / ".study.lock"):
        meta = read_meta(out)
        change(meta)
        write_json(out / "study.json", meta)
    return meta


def run_study(
    study_cfg: str, out_dir: Optional[Path] = None, *, overrides: Optional[list[str]] = None, quiet: bool = False
) -> dict:
    from hld.train.resources import Resources

    t0 = time.time()
    study, out, planned = open_study(study_cfg, out_dir, overrides=overrides)
    resources = Resources()
    done = [c.id for c, cfg, _ in planned if not c.flops_of and _finished(out / "runs" / c.id, cfg)]
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
        meta["teacher_reference"] = _teacher_references(
            study, planned, meta.get("teacher_reference") or [], resources, quiet
        )
        meta["ngram_reference"] = ngram.study_references(planned, out, resources)
        meta["signal_fidelity"] = fidelity.study_fidelity(
            planned, out, resources, meta.get("signal_fidelity") or [], quiet=quiet
        )
        write_json(out / "study.json", meta)
        return build_report(out)


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
    main = _rank() == 0
    claim = file_lock(out / "locks" / "cells" / f"{cell.id}.lock", wait=wait) if main else contextlib.nullcontext(True)
    with claim as claimed:
        if not claimed:
            return "held", None, {}
        if cell.flops_of:
            cell, cfg = _matched(study, cell, out)
        if _finished(run_dir, cfg):
            if not main:
                return "done", None, {}
            if not (run_dir / "cell.json").exists():  # finished, then stopped before its cell.json
                write_json(run_dir / "cell.json", cell.describe())
            return "done", None, _downstream(study, cfg, run_dir, resources, quiet)  # e.g. tasks added later
        if group is not None and (ready is None or group not in ready):
            group_cache(planned, group, out, resources, quiet)
            if ready is not None:
                ready.add(group)
        summary = _train_cell(cell, cfg, run_dir, resources, quiet)
        return "trained", summary, _downstream(study, cfg, run_dir, resources, quiet) if main else {}


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

    if _rank() == 0:
        update_meta(out, keep)
    return record


def _scored(scores: dict, study: Study) -> bool:
    """`scores` (downstream.json or a reference's tasks) holds every task of the study at its limit."""
    return all(t in scores and scores[t].get("limit") == study.task_limit for t in study.tasks)


def _score(lm, tokenizer, study: Study, quiet: bool, *, rolling_len: int) -> dict:
    """Task scores; rolling log-likelihoods over windows of the cells' `data.seq_len`, for teacher and
    students alike."""
    from hld.eval.harness import evaluate_tasks

    rows = evaluate_tasks(
        lm, tokenizer, list(study.tasks), limit=study.task_limit, quiet=quiet, rolling_len=rolling_len
    )
    return {t: {**r, "limit": study.task_limit} for t, r in rows.items()}


def _downstream(study: Study, cfg: RunConfig, run_dir: Path, resources, quiet: bool) -> dict:
    """Score a finished cell's student on the study's tasks into run_dir/downstream.json (kept when
    it already holds them, so a resumed study does not score a cell twice)."""
    if not study.tasks or not study.score_students:
        return {}
    from hld.eval.downstream import read_downstream, write_downstream

    have = read_downstream(run_dir)
    if _scored(have, study):
        return {t: have[t] for t in study.tasks}
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(run_dir / "student", dtype=torch.float32)
    have.update(_score(lm, resources.tokenizer(cfg.teacher.model), study, quiet, rolling_len=cfg.data.seq_len))
    write_downstream(run_dir, have)
    return {t: have[t] for t in study.tasks}


def _reference_key(cfg: RunConfig) -> dict:
    d = cfg.data
    return {
        "model": cfg.teacher.model,
        "dtype": cfg.teacher.dtype,
        "validation": d.validation,
        "seq_len": d.seq_len,
        "val_tokens": d.val_tokens,
        "text_field": d.text_field,
    }


def _teacher_references(study: Study, planned: list, done: list[dict], resources, quiet: bool) -> list[dict]:
    """The teacher's validation loss on the very windows each cell is validated on (one entry per
    distinct teacher and validation set; usually one), and its scores on the study's tasks: the
    reference the report measures students against. What study.json already holds is kept, so a
    resumed study does not redo it."""
    from hld.eval.perplexity import perplexity
    from hld.precision import resolve_dtype

    out = []
    for cfg in [cfg for _, cfg, _ in planned]:
        key = _reference_key(cfg)
        if any({k: e.get(k) for k in key} == key for e in out):
            continue
        have = next((e for e in done if {k: e.get(k) for k in key} == key), None)
        if have is None:
            t0 = time.time()
            loaded = resources.teacher(cfg.teacher.model, cfg.teacher.dtype)
            tok = loaded.tokenizer
            val = resources.validation_windows(cfg.data, tok)
            r = perplexity(
                loaded.model,
                val,
                compute_dtype=resolve_dtype(cfg.teacher.dtype),
                progress=None if quiet else "teacher validation",
            )
            have = {
                **key,
                "val_loss": r["loss"],
                "val_ppl": r["ppl"],
                "predictions": r["tokens"],
                "seconds": time.time() - t0,
            }
        if study.tasks and not _scored(have.get("tasks") or {}, study):
            loaded = resources.teacher(cfg.teacher.model, cfg.teacher.dtype)
            have = {
                **have,
                "tasks": {
                    **(have.get("tasks") or {}),
                    **_score(loaded.model, loaded.tokenizer, study, quiet, rolling_len=cfg.data.seq_len),
                },
            }
        out.append(have)
    return out


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


def _finished(run_dir: Path, cfg: RunConfig) -> bool:
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
    from hld.train.cache_build import ensure_cache

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
