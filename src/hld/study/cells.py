"""One cell of a study run under its claim: skipped when finished, a flops cell given its match's
FLOPs, its group's teacher cache built or reused under the cache lock, then trained (resumed from its
checkpoint) and scored on the study's tasks."""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
from pathlib import Path
from typing import Optional

from hld.atomic import read_json_object, write_json
from hld.config import RunConfig
from hld.errors import HldError
from hld.locks import file_lock
from hld.study.grid import Cell, cell_config, flops_overrides
from hld.study.planning import Planned, process_rank
from hld.study.record import update_meta
from hld.study.references import downstream
from hld.study.spec import Study


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
