"""Advisory file locks that let several processes share one study directory (SLURM array tasks, or a
user starting two `hld study`): `fcntl.flock` on a small lock file beside what it guards.

The kernel releases a flock when its holder's file descriptor closes, which a process's death does
(SIGKILL included), so a lock never outlives its holder and there is no stale-lock cleanup. The lock
file itself stays behind: it is empty of meaning once nobody holds it (it names the last holder).
flock works across the nodes of a cluster on filesystems that pass it through (NFSv4, Lustre mounted
with `flock`, GPFS); on one mounted without it, locks are node-local.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def file_lock(path: Path, *, wait: bool = True) -> Iterator[bool]:
    """Hold an exclusive lock on `path` (created if absent) for the `with` block; yields True.
    `wait=False`: yields False at once, holding nothing, when another process holds it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        os.ftruncate(fd, 0)  # who holds it, for the messages of the processes that find it held
        os.write(fd, f"{socket.gethostname()} pid {os.getpid()}\n".encode())
        yield True
    finally:
        os.close(fd)  # releases the lock


def holder(path: Path) -> str:
    """The host and pid that last took the lock at `path` ('' if unknown)."""
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


@contextlib.contextmanager
def sole_holder(path: Path) -> Iterator[bool]:
    """Try, without waiting, to hold the lock file `path` for the `with` block; yields whether it did.
    Unlike `file_lock` it leaves nothing behind: the holder deletes the file before releasing it. A
    process that opened the file just before that deletion and then takes the lock holds a deleted
    file, which it detects (the path names another file, or none) and counts as held by another."""
    path = Path(path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    got = False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            try:
                got = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                got = False
        except BlockingIOError:
            pass
        if got:
            os.ftruncate(fd, 0)
            os.write(fd, f"{socket.gethostname()} pid {os.getpid()}\n".encode())
        yield got
    finally:
        if got:
            Path(path).unlink(missing_ok=True)
        os.close(fd)
