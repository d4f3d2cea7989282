"""Writes that are complete or absent: a temporary file (or directory) beside the target, then a rename."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from hld.errors import HldError


def write_file(path: Path, write: Callable[[BinaryIO], object], *, fsync: bool = False) -> None:
    """Write `path` complete or not at all: `write(fh)` fills a temporary sibling (`.<name>.*.tmp`), which
    is renamed over `path` (after an fsync with `fsync`); on any error the temporary file is removed and the
    error (an OSError for a full disk or a read-only place) raised as is."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    write_file(path, lambda fh: fh.write(text.encode("utf-8")))


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, default=str))


@contextlib.contextmanager
def new_dir(final: Path) -> Iterator[Path]:
    """A temporary sibling of `final` (`.<name>.tmp-*`) for the block to fill, renamed into place
    (`replace_dir`) when the block completes and deleted when it raises: `final` holds the old
    directory or the complete new one, never a part, and no temporary directory is left behind."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
    try:
        yield tmp
        replace_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after the rename; else a failed write's debris


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
