"""Writes that are complete or absent: a temporary file (or directory) beside the target, then a rename."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any


def write_text(path: Path, text: str) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, default=str))


def replace_dir(tmp: Path, final: Path) -> None:
    """Rename the complete directory `tmp` into place. A directory cannot replace another in one
    rename, so an existing `final` is first set aside as `.<name>.old` (a reader finding it knows the
    new one completed once `final` exists again) and deleted after."""
    final = Path(final)
    old = final.with_name(f".{final.name}.old")
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
