"""hld.atomic: a file or a directory is the old one or the complete new one, never a part, and a
failed write leaves no temporary file or directory behind."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from hld import atomic
from hld.errors import HldError
from hld.train.checkpoint import atomic_save


def _debris(d):
    return sorted(p.name for p in d.iterdir() if p.name.startswith("."))


def test_write_file_replaces_whole_or_not_at_all(tmp_path):
    path = tmp_path / "a.txt"
    atomic.write_text(path, "old")

    def torn(fh):
        fh.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        atomic.write_file(path, torn)
    assert path.read_text() == "old" and _debris(tmp_path) == []
    atomic.write_json(path, {"x": "é"})
    assert path.read_text(encoding="utf-8") == '{\n  "x": "\\u00e9"\n}'


def test_numpy_and_torch_through_the_one_writer(tmp_path):
    a = np.arange(7, dtype=np.int32)
    atomic.write_file(tmp_path / "s.npy", lambda fh: np.save(fh, a))  # np.save adds no second suffix
    assert np.array_equal(np.load(tmp_path / "s.npy"), a)
    atomic_save({"w": torch.ones(3)}, tmp_path / "c.pt")
    assert torch.equal(torch.load(tmp_path / "c.pt", weights_only=True)["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt", "s.npy"]


def test_new_dir_keeps_the_old_directory_until_the_new_one_is_complete(tmp_path):
    final = tmp_path / "conv"
    with atomic.new_dir(final) as tmp:
        (tmp / "f").write_text("1")
    with pytest.raises(RuntimeError), atomic.new_dir(final) as tmp:
        (tmp / "f").write_text("2")
        raise RuntimeError("the conversion failed")
    assert (final / "f").read_text() == "1" and _debris(tmp_path) == []  # old kept, no temporary left
    with atomic.new_dir(final) as tmp:
        (tmp / "g").write_text("3")
    assert sorted(p.name for p in final.iterdir()) == ["g"] and _debris(tmp_path) == []


# --------------------------------------------------------------------------- issue 24: checksums, modes, debris


def test_a_checked_file_is_refused_once_a_byte_changes(tmp_path):
    from hld.atomic import check_recorded, write_checked

    path = tmp_path / "f.bin"
    write_checked(path, lambda fh: fh.write(b"abc" * 100))
    check_recorded(path, "fix")
    record = json.loads((tmp_path / "f.bin.sha256").read_text())
    assert record["sha256"] == [hashlib.sha256(b"abc" * 100).hexdigest()]  # an independent digest
    path.write_bytes(b"abd" + b"abc" * 99)
    with pytest.raises(HldError, match="sha256 differs"):
        check_recorded(path, "fix")


def test_a_kill_at_the_rename_leaves_a_record_naming_the_file_there(tmp_path, monkeypatch):
    """The new digest joins the record before the rename, so the old file still passes if the rename
    never happens; after a completed write the record names the new file alone."""
    from hld import atomic

    path = tmp_path / "f.bin"
    atomic.write_checked(path, lambda fh: fh.write(b"old"))
    real = os.replace

    def killed(src, dst):
        if Path(dst) == path:
            raise KeyboardInterrupt  # the process dies between the record and the rename
        real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        atomic.write_checked(path, lambda fh: fh.write(b"new"))
    monkeypatch.setattr(atomic.os, "replace", real)
    assert path.read_bytes() == b"old"
    atomic.check_recorded(path, "fix")  # the old file is still accepted
    assert len(json.loads((tmp_path / "f.bin.sha256").read_text())["sha256"]) == 2
    assert not list(tmp_path.glob(".*.tmp"))
    atomic.write_checked(path, lambda fh: fh.write(b"new"))
    assert json.loads((tmp_path / "f.bin.sha256").read_text())["sha256"] == [hashlib.sha256(b"new").hexdigest()]


def test_a_damaged_record_is_refused(tmp_path):
    from hld.atomic import check_recorded, write_checked

    write_checked(tmp_path / "f.bin", lambda fh: fh.write(b"x"))
    (tmp_path / "f.bin.sha256").write_text('{"sha2')
    with pytest.raises(HldError, match="checksum record .* is damaged"):
        check_recorded(tmp_path / "f.bin", "fix")


@pytest.mark.parametrize(
    "mask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700), (0o002, 0o664, 0o775)]
)
def test_written_files_get_the_umasks_modes(tmp_path, mask, file_mode, dir_mode):
    from hld.atomic import new_dir, write_text

    old = os.umask(mask)
    try:
        write_text(tmp_path / "a.txt", "x")
        with new_dir(tmp_path / "d") as tmp:
            (tmp / "sub").mkdir()
            (tmp / "sub" / "w.bin").write_bytes(b"1")
            os.chmod(tmp / "sub" / "w.bin", 0o600)  # as safetensors writes its files
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == file_mode
    assert (tmp_path / "d").stat().st_mode & 0o777 == dir_mode
    assert (tmp_path / "d" / "sub").stat().st_mode & 0o777 == dir_mode
    assert (tmp_path / "d" / "sub" / "w.bin").stat().st_mode & 0o777 == file_mode


def test_new_dir_clears_only_dead_processes_temporary_directories(tmp_path):
    import socket
    import subprocess
    import sys

    from hld.atomic import new_dir

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    gone = tmp_path / f".out.tmp-{host}-{int(dead.stdout)}-abcd1234"
    live = tmp_path / f".out.tmp-{host}-{os.getpid()}-efgh5678"
    elsewhere = tmp_path / f".out.tmp-another-host-{int(dead.stdout)}-ijkl9012"
    for d in (gone, live, elsewhere):
        d.mkdir()
    with new_dir(tmp_path / "out") as tmp:
        (tmp / "f").write_text("x")
    assert not gone.exists() and live.is_dir() and elsewhere.is_dir() and (tmp_path / "out" / "f").is_file()


def test_torch_save_into_a_file_that_refuses_a_write_raises_that_oserror(tmp_path):
    """A full disk mid-torch.save: torch's zip writer meets the failed write again when it closes and raises a
    RuntimeError in its place; `torch_save` raises the write's own OSError, which hld words in one line."""
    import errno

    import torch

    from hld.atomic import torch_save

    class Full:
        def __init__(self, room: int) -> None:
            self.room, self.n = room, 0

        def write(self, b) -> int:
            if self.n + len(b) > self.room:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.n += len(b)
            return len(b)

        def flush(self) -> None:
            pass

    obj = {"w": torch.zeros(4096)}
    with pytest.raises(OSError) as exc:
        torch_save(obj, Full(1000))
    assert exc.value.errno == errno.ENOSPC
    with open(tmp_path / "ok.pt", "wb") as fh:  # room enough: saved as torch.save saves it
        torch_save(obj, fh)
    assert torch.equal(torch.load(tmp_path / "ok.pt")["w"], obj["w"])
