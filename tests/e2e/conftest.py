"""Finished tiny runs the end-to-end tests share, each trained once per session (`hld train` of the
smoke preset on the fixtures, helpers.train_argv): `finished_run` (kd, the preset's method) and
`hld_run` (hld-joint: it writes hidden_stats.pt and projectors as well).

A test that only reads a run takes the shared one; it is checked byte for byte after each test, and a
test that changed it fails at teardown (the run is then restored, so one failure does not spread to
the tests after it). A test that changes a run takes `finished_run_copy` / `hld_run_copy`: a fresh
copy at tmp_path/"run"."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import train_argv
from hld.cli import main


def _tree(root: Path) -> dict[str, str]:
    """Every path below `root` with its sha256, or what it is (links not followed)."""
    out = {}
    for p in sorted(root.rglob("*")):
        key = str(p.relative_to(root))
        if p.is_symlink():
            out[key] = f"-> {os.readlink(p)}"
        elif p.is_file():
            out[key] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[key] = "dir" if p.is_dir() else "other"
    return out


class SharedRun:
    """One finished run, its bytes when trained, and a pristine copy to restore it from."""

    def __init__(self, base: Path, *extra: str) -> None:
        self.path = base / "run"
        self._pristine = base / "pristine"
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("HLD_CACHE_DIR", str(base / "hld-cache"))
            assert main(train_argv(self.path, *extra)) == 0
        shutil.copytree(self.path, self._pristine, symlinks=True)
        self._tree = _tree(self.path)

    def check_unchanged(self) -> None:
        now = _tree(self.path) if self.path.is_dir() else {}
        if now == self._tree:
            return
        changed = sorted(k for k in self._tree.keys() | now.keys() if self._tree.get(k) != now.get(k))
        shutil.rmtree(self.path, ignore_errors=True)
        shutil.copytree(self._pristine, self.path, symlinks=True)
        pytest.fail(f"the shared run {self.path} was changed ({', '.join(changed) or 'removed'}): take its copy")

    def copy_to(self, dest: Path) -> Path:
        shutil.copytree(self.path, dest, symlinks=True)
        return dest


@pytest.fixture(scope="session")
def _shared_kd_run(tmp_path_factory) -> SharedRun:
    return SharedRun(tmp_path_factory.mktemp("finished-kd"))


@pytest.fixture(scope="session")
def _shared_hld_run(tmp_path_factory) -> SharedRun:
    return SharedRun(tmp_path_factory.mktemp("finished-hld-joint"), "objective.method=hld-joint")


@pytest.fixture
def finished_run(_shared_kd_run) -> Iterator[Path]:
    """The shared finished kd run; read it, never change it (checked after the test)."""
    yield _shared_kd_run.path
    _shared_kd_run.check_unchanged()


@pytest.fixture
def finished_run_copy(_shared_kd_run, tmp_path) -> Path:
    """A fresh copy of the finished kd run at tmp_path/"run", the test's to change."""
    return _shared_kd_run.copy_to(tmp_path / "run")


@pytest.fixture
def hld_run(_shared_hld_run) -> Iterator[Path]:
    """The shared finished hld-joint run; read it, never change it (checked after the test)."""
    yield _shared_hld_run.path
    _shared_hld_run.check_unchanged()


@pytest.fixture
def hld_run_copy(_shared_hld_run, tmp_path) -> Path:
    """A fresh copy of the finished hld-joint run at tmp_path/"run", the test's to change."""
    return _shared_hld_run.copy_to(tmp_path / "run")
