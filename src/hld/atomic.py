"""Writes that are complete or absent: a temporary file (or directory) beside the target, then a rename."""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from hld import files
from hld.errors import HldError


def write_file(path: Path, write: Callable[[BinaryIO], object], *, fsync: bool = False) -> None:
    """Write `path` complete or not at all: `write(fh)` fills a temporary sibling (`.<name>.*.tmp`), which
    is renamed over `path` (after an fsync with `fsync`); on any error the temporary file is removed and the
    error (an OSError for a full disk or a read-only place) raised as is."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~umask())  # mkstemp makes it 0600: others could not read the results
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


SHA_SUFFIX = ".sha256"  # `<name>.sha256` beside a file written by write_checked: the sha256 digests it may have


def write_checked(path: Path, write: Callable[[BinaryIO], object], *, fsync: bool = False) -> None:
    """`write_file`, with the file's sha256 recorded beside it in `<name>.sha256` (`check_recorded` reads
    it back), so a bit flip or a truncation is caught before the file is used. Any kill point leaves the
    file and a record that names its digest: the new digest is added to the record before the rename,
    the old one dropped after."""
    from hld.fingerprint import file_sha256

    path = Path(path)
    new = path.with_name(f".{path.name}.new.tmp")
    write_file(new, write, fsync=fsync)
    try:
        digest = file_sha256(new)
        side = path.with_name(path.name + SHA_SUFFIX)
        before = _digests(side) if path.exists() and side.exists() else []
        write_json(side, {"file": path.name, "sha256": [digest, *(before or [])][:4]})
        os.replace(new, path)
    except BaseException:
        new.unlink(missing_ok=True)
        raise
    write_json(side, {"file": path.name, "sha256": [digest]})


def _digests(side: Path) -> list[str] | None:
    try:
        obj = json.loads(files.read_text(side, "checksum record", "", max_bytes=files.MAX_CONFIG_BYTES))
        got = obj["sha256"]
    except (HldError, OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        return None
    return got if isinstance(got, list) and got and all(isinstance(d, str) for d in got) else None


def check_recorded(path: Path, fix: str, what: str = "file") -> None:
    """Refuse `path` when its sha256 is not one its `<name>.sha256` record names (a flipped bit, a
    truncation, another file copied over it) or when the record is damaged. No record (a file written
    before records existed, or the record deleted): nothing to check."""
    from hld.fingerprint import file_sha256

    path = Path(path)
    side = path.with_name(path.name + SHA_SUFFIX)
    if not files.present(side):
        return
    files.regular_file(path, what, fix)  # never hash a device (/dev/zero: forever) or a FIFO
    digests = _digests(side)
    if digests is None:
        raise HldError(f"the checksum record {side} is damaged", f"{fix} (or delete {side.name} to skip the check)")
    if file_sha256(path) not in digests:
        raise HldError(
            f"{what} {path} is corrupt or unreadable (its sha256 differs from the one recorded when it was written)",
            fix,
        )


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
    clear_dead_temps(final)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-{_owner()}-"))
    try:
        yield tmp
        _umask_modes(tmp)
        replace_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after the rename; else a failed write's debris


def _umask_modes(root: Path) -> None:
    """Give `root` and what it holds the modes the umask gives new files (0644 / 0755 under 022): mkdtemp
    makes 0700 and some writers (safetensors) 0600, so others could not read a run's results."""
    mask = umask()
    for p in [root, *root.rglob("*")]:
        if p.is_symlink():
            continue
        executable = p.is_dir() or p.stat().st_mode & 0o111
        p.chmod((0o777 if executable else 0o666) & ~mask)


def umask() -> int:
    """The process's umask, read without changing it (Linux: /proc/self/status; elsewhere set and restored)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def _owner() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def clear_dead_temps(final: Path) -> None:
    """Delete the temporary directories `new_dir` left beside `final` when its process was killed
    (SIGKILL, a node lost): those named for a process of this host that no longer runs. Another host's,
    or a live process's, are left alone."""
    final = Path(final)
    host = socket.gethostname()
    for tmp in final.parent.glob(f".{glob.escape(final.name)}.tmp-*"):
        owner = tmp.name[len(f".{final.name}.tmp-") :].rsplit("-", 2)
        if len(owner) != 3 or owner[0] != host or not owner[1].isdigit() or _alive(int(owner[1])):
            continue
        shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


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


def read_json_object(path: Path, what: str, fix: str, *, max_bytes: int = files.MAX_MANIFEST_BYTES) -> dict:
    """A JSON file that must hold an object (summary.json, manifest.json): an HldError otherwise (also when
    it is not a regular file of at most `max_bytes`: `hld.files`)."""
    try:
        obj = json.loads(files.read_text(Path(path), what, fix, max_bytes=max_bytes))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise HldError(f"{what} {path} is unreadable or not valid JSON (truncated?)", fix) from exc
    if not isinstance(obj, dict):
        raise HldError(f"{what} {path} holds a {type(obj).__name__}, not a JSON object", fix)
    return obj


def torch_save(obj: Any, fh) -> None:
    """torch.save into an open file; a write the file refused (a full disk, a file-size limit) is raised as
    that OSError. torch's zip writer meets the failed write again when it closes the archive and raises a
    RuntimeError ("unexpected pos") in its place, which would escape as a traceback."""
    import torch

    try:
        torch.save(obj, fh)
    except RuntimeError as exc:
        cause = exc.__context__
        if isinstance(cause, OSError):
            raise cause from None
        raise
