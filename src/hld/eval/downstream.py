"""A run's downstream scores, `RUN_DIR/downstream.json`: what `harness.evaluate_tasks` returned, per
task ({metric, value, stderr, chance, n, metrics}). Written by a study after a cell trains, read by its
aggregation and by `hld export`."""

from __future__ import annotations

import json
from pathlib import Path

from hld.atomic import write_json
from hld.errors import HldError

DOWNSTREAM_FILE = "downstream.json"


def write_downstream(run_dir: Path, scores: dict) -> None:
    write_json(Path(run_dir) / DOWNSTREAM_FILE, scores)


def read_downstream(run_dir: Path) -> dict:
    """A run's downstream.json (written by `hld study`: what evaluate_tasks returned, per task), or {}."""
    path = Path(run_dir) / DOWNSTREAM_FILE
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise HldError(f"{path} is not valid JSON ({exc.msg})", "rewrite it, or delete it and rerun the study") from exc
    if not isinstance(data, dict) or not all(isinstance(v, dict) and "value" in v for v in data.values()):
        raise HldError(f"{path} is not {{task: {{metric, value, stderr, chance, n}}}}", "rewrite or delete it")
    return data
