"""Where hld keeps what it can rebuild: tokenised corpora and de-quantised GGUF teachers; and the
checks every path a user names must pass before anything is written there."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from hld.errors import HldError

NAME_MAX = 255  # bytes in one path component on the filesystems hld runs on (ext4, xfs, Lustre, NFS)
_UNSET = "or unset it (the default is ~/.cache/hld)"


def cache_root() -> Path:
    """`$HLD_CACHE_DIR`, else ~/.cache/hld: created if absent, refused in one line when it cannot hold
    the caches (a file, a symlink loop, a read-only place)."""
    raw = os.environ.get("HLD_CACHE_DIR")
    path = Path(raw).expanduser() if raw else Path.home() / ".cache" / "hld"
    what = f"HLD_CACHE_DIR {path}" if raw else f"the hld cache directory {path}"
    fix = f"point HLD_CACHE_DIR at a writable directory {_UNSET}"
    fix = fix if raw else "set HLD_CACHE_DIR to a writable directory"
    check_names(path, "HLD_CACHE_DIR")
    if path.exists() and not path.is_dir():
        raise HldError(f"{what} is a file, not a directory", fix)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise HldError(f"{what} is a symbolic link loop", fix) from exc
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise HldError(f"{what} cannot be created: the disk is full", f"free disk space, or {fix}") from exc
        raise HldError(f"{what} cannot be created ({exc.strerror or exc})", fix) from exc
    if not os.access(path, os.W_OK | os.X_OK):
        raise HldError(f"{what} is not writable", fix)
    return path


def check_names(path: Path | str, flag: str) -> None:
    """Refuse a path with a component longer than the filesystem allows (255 bytes), in one line, before
    anything is created (the OS would say ENAMETOOLONG mid-way through a command)."""
    for part in Path(path).parts:
        size = len(os.fsencode(part))
        if size > NAME_MAX:
            raise HldError(
                f"{flag} {str(path)[:60]}…: the name {part[:24]}… is {size} bytes, "
                f"over the {NAME_MAX} a file name may have",
                "use a shorter name",
            )
