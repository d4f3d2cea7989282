"""A study planned and opened: every cell's final config and teacher-cache group (resolved before
anything trains), and its directory created and recorded in study.json."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional

from hld.atomic import write_fix
from hld.config import RunConfig
from hld.errors import HldError
from hld.paths import check_names
from hld.study.grid import Cell, cell_config, expand, flops_overrides
from hld.study.record import update_meta
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
