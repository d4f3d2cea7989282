"""Reading what hld did not just write: every path is checked to be what it should be before it is opened.

A config, a manifest, a summary, a checkpoint or a data file may be anything by the time hld reads it: a
symbolic link to /dev/zero (read whole, it filled 22.5 GB of RAM in 47 s), a FIFO (its open blocks
forever), a directory, a dangling link. `regular_file` refuses all of those in one line from a `stat`,
before any `open`; `read_bytes` / `read_text` then read at most a stated size, so a file that grows while
it is read is still bounded. Sizes are per kind of file (the constants below; docs/errors.md)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from hld.errors import HldError

MAX_CONFIG_BYTES = 4 << 20  # a config YAML, summary.json, cell.json, a checksum record, a marker (~10 kB)
MAX_MANIFEST_BYTES = 256 << 20  # a token store's or teacher cache's manifest (~1.3 kB a shard: ~200k shards)
MAX_METRICS_BYTES = 4 << 30  # metrics.jsonl: ~300 B a step, the 10,000,000-step limit
MAX_LINE_BYTES = 64 << 20  # one line of a data file (a JSON record, a .txt line); C4's longest is ~0.1 MB

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
)


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def _stat(path: Path, what: str, fix: str) -> os.stat_result:
    """`os.stat` (links followed), a dangling link or a missing or unreadable path refused in one line."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise HldError(
                f"{what} {path} is a symbolic link to {os.readlink(path)}, which does not exist", fix
            ) from None
        raise HldError(f"{what} {path} does not exist", fix) from None
    except OSError as exc:  # a link loop, a component that is a file, permission denied
        raise HldError(f"{what} {path} cannot be read ({exc.strerror or exc})", fix) from exc


def regular_file(path: Path, what: str, fix: str, *, max_bytes: int | None = None) -> os.stat_result:
    """Refuse `path` unless it is (or links to) a regular file of at most `max_bytes`; its stat."""
    st = _stat(path, what, fix)
    if not stat.S_ISREG(st.st_mode):
        raise HldError(f"{what} {path} is {_kind(st.st_mode)}, not a regular file", fix)
    if max_bytes is not None and st.st_size > max_bytes:
        raise HldError(f"{what} {path} holds {st.st_size:,} bytes, more than the {max_bytes:,} it may", fix)
    return st


def directory(path: Path, what: str, fix: str) -> os.stat_result:
    """Refuse `path` unless it is (or links to) a directory; its stat."""
    st = _stat(path, what, fix)
    if not stat.S_ISDIR(st.st_mode):
        raise HldError(f"{what} {path} is {_kind(st.st_mode)}, not a directory", fix)
    return st


def is_regular(path: Path) -> bool:
    """Does `path` exist as (or link to) a regular file? (A probe: never opens it.)"""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def present(path: Path) -> bool:
    """Is anything at `path`, a dangling symbolic link included (`Path.exists` says no to one)?"""
    return os.path.lexists(path)


def read_bytes(path: Path, what: str, fix: str, *, max_bytes: int) -> bytes:
    """The bytes of the regular file `path`, at most `max_bytes` of them (more: refused in one line)."""
    regular_file(path, what, fix, max_bytes=max_bytes)
    with open(path, "rb") as fh:
        data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:  # it grew after the stat
        raise HldError(f"{what} {path} holds more than the {max_bytes:,} bytes it may", fix)
    return data


def read_text(path: Path, what: str, fix: str, *, max_bytes: int) -> str:
    """`read_bytes` decoded as UTF-8 (a UnicodeDecodeError is the caller's to word)."""
    return read_bytes(path, what, fix, max_bytes=max_bytes).decode("utf-8")
