"""A study as a graph of jobs (`hld study --list`, `--cache GROUP`, `--cell ID`): what
`scripts/slurm/study.sbatch` submits, and what a user can run by hand in any order the dependencies
allow, on one machine or many at once (the locks of `hld.study.runner` keep them apart).

    cache <group>   builds the teacher cache of one group of KD/HLD cells     depends on nothing
    cell <id>       trains one cell (resumable; a finished cell is skipped)   depends on its group's
                                                                              cache; an equal-FLOPs
                                                                              ce cell also on the
                                                                              kd cell it matches
    report          the whole study: every cell finished, so it only adds     depends on every cell
                    the reference rows and writes the report

A cell whose cache is missing builds it itself (under the cache's lock); a flops cell whose match has
not finished cannot run: its budget is what the match spent.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Optional

from hld.errors import HldError
from hld.study.runner import Planned, group_cache, open_study, plan_cells, run_cell
from hld.study.spec import load_study


def study_argv(study_cfg: str, out: Path, overrides: list[str]) -> list[str]:
    """The `hld study` command line that every job of this study extends, with absolute paths (a job
    may start in another working directory)."""
    path = Path(study_cfg)
    config = str(path.resolve()) if path.is_file() else study_cfg
    return ["hld", "study", "--config", config, "--out", str(Path(out).resolve()), *overrides]


def list_jobs(study_cfg: str, out_dir: Optional[Path] = None, *, overrides: Optional[list[str]] = None) -> dict:
    """Every cache group and cell with its command and dependencies; writes nothing."""
    overrides = list(overrides or [])
    study = load_study(study_cfg, overrides)
    out = Path(out_dir or f"studies/{study.name}")
    planned = plan_cells(study, out)
    base = study_argv(study_cfg, out, overrides)
    groups: dict[str, list[str]] = {}
    for cell, _, group in planned:
        if group is not None:
            groups.setdefault(group, []).append(cell.id)
    caches = [
        {
            "group": g,
            "dir": str((out / "caches" / g).resolve()),
            "cells": ids,
            "complete": (out / "caches" / g / "manifest.json").is_file(),
            **_command(base + ["--cache", g]),
        }
        for g, ids in groups.items()
    ]
    cells = [
        {
            "id": cell.id,
            "arm": cell.arm,
            "cache": group,
            "after": cell.flops_of,
            "finished": (out / "runs" / cell.id / "summary.json").is_file(),
            **_command(base + ["--cell", cell.id]),
        }
        for cell, _, group in planned
    ]
    return {"study": study.name, "out": str(out.resolve()), "caches": caches, "cells": cells, "report": _command(base)}


def _command(argv: list[str]) -> dict:
    return {"argv": argv, "command": shlex.join(argv)}


def format_jobs(jobs: dict) -> str:
    lines = [
        f"study {jobs['study']}: {len(jobs['cells'])} cells, {len(jobs['caches'])} teacher caches -> {jobs['out']}"
    ]
    for c in jobs["caches"]:
        state = "complete" if c["complete"] else "to build"
        lines += [f"cache {c['group']} ({state}; read by {len(c['cells'])} cells)", f"    {c['command']}"]
    for c in jobs["cells"]:
        needs = [f"cache {c['cache']}"] if c["cache"] else []
        needs += [f"cell {c['after']} (its spent FLOPs are this cell's budget)"] if c["after"] else []
        state = "finished" if c["finished"] else "to run"
        lines += [f"cell {c['id']} ({state}; after: {', '.join(needs) or 'nothing'})", f"    {c['command']}"]
    lines += ["report (after: every cell)", f"    {jobs['report']['command']}"]
    return "\n".join(lines)


def run_one_cell(
    study_cfg: str, out_dir: Optional[Path], cell_id: str, *, overrides: Optional[list[str]] = None, quiet: bool = False
) -> dict:
    """`hld study --cell ID`: train one cell (waiting for its claim if another process holds it)."""
    from hld.train.resources import Resources

    study, out, planned = open_study(study_cfg, out_dir, overrides=overrides)
    entry = _entry(planned, cell_id)
    cell = entry[0]
    if cell.flops_of and not (out / "runs" / cell.flops_of / "summary.json").is_file():
        raise HldError(
            f"cell {cell.id} trains at the FLOPs cell {cell.flops_of} spends: that cell must finish first",
            f"run `hld study ... --cell {cell.flops_of}` first (study.sbatch orders them)",
        )
    status, summary, scores = run_cell(study, planned, entry, out, Resources(), quiet, wait=True)
    row: dict = {"cell": cell.id, "status": status, "run_dir": str(out / "runs" / cell.id)}
    if summary is not None:
        row.update({k: summary[k] for k in ("steps", "tokens", "flops", "train_seconds")})
        row["val/ppl"] = summary.get("val/ppl")
    if scores:
        row["tasks"] = scores
    return row


def build_one_cache(
    study_cfg: str,
    out_dir: Optional[Path],
    group: str,
    *,
    overrides: Optional[list[str]] = None,
    quiet: bool = False,
    part: tuple[int, int] = (0, 1),
) -> dict:
    """`hld study --cache GROUP [--shard I/N]`: build (or reuse) one group's teacher cache, or part I of N."""
    from hld.train.resources import Resources

    _, out, planned = open_study(study_cfg, out_dir, overrides=overrides)
    groups = sorted({g for _, _, g in planned if g is not None})
    if group not in groups:
        raise HldError(
            f"the study has no cache group {group!r}",
            f"use one of {', '.join(groups) or '(none: no cell reads a cache)'} (hld study --list)",
        )
    return {"group": group, **group_cache(planned, group, out, Resources(), quiet, part=part)}


def _entry(planned: list[Planned], cell_id: str) -> Planned:
    for entry in planned:
        if entry[0].id == cell_id:
            return entry
    ids = [c.id for c, _, _ in planned]
    raise HldError(
        f"the study has no cell {cell_id!r}",
        f"use an id from `hld study --list`, e.g. {ids[0]}" if ids else "the study has no cells",
    )
