"""Writes that are complete or absent: a temporary file (or directory) beside the target, then a rename."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from hld.errors import HldError


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


_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def write_fix(exc: OSError, flag: str = "--out") -> str:
    """What to do about a failed write: free space when the disk or a quota is full, else (read-only,
    permission denied, a file where a directory should be) another location."""
    if getattr(exc, "errno", None) in _SPACE_ERRNOS:
        return f"free disk space or pick another {flag}"
    return f"pick a writable {flag} (a directory you may create files in)"


def read_json_object(path: Path, what: str, fix: str) -> dict:
    """A JSON file that must hold an object (summary.json, manifest.json): an HldError otherwise."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise HldError(f"{what} {path} is unreadable or not valid JSON (truncated?)", fix) from exc
    if not isinstance(obj, dict):
        raise HldError(f"{what} {path} holds a {type(obj).__name__}, not a JSON object", fix)
    return obj
