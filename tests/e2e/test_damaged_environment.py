"""Issue 23, the environment and names: an unusable HLD_CACHE_DIR (a file, a symbolic link loop, a
read-only place), a full disk under the token store, and path components over 255 bytes are one line
with the fix, exit 2, before anything is written (they were NotADirectoryError, OSError 40,
PermissionError and OSError 36 tracebacks)."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import one_line_error as _one_line
from helpers import tiny_overrides, train_argv

SRC = Path(__file__).resolve().parents[2] / "src"


def _bad_cache_dir(tmp_path: Path, how: str) -> str:
    if how == "file":
        (tmp_path / "a-file").write_text("mine\n")
        return str(tmp_path / "a-file")
    if how == "loop":
        os.symlink(tmp_path / "b", tmp_path / "a")
        os.symlink(tmp_path / "a", tmp_path / "b")
        return str(tmp_path / "a" / "cache")
    if how == "under-a-file":
        (tmp_path / "a-file").write_text("mine\n")
        return str(tmp_path / "a-file" / "cache")
    return "/sys/hld-test-cache"  # sysfs refuses new entries, even to root


@pytest.mark.parametrize("how", ["file", "loop", "under-a-file", "read-only"])
@pytest.mark.parametrize("command", ["train", "tokenize", "gguf"])
def test_an_unusable_hld_cache_dir_is_one_line(tmp_path, capsys, monkeypatch, how, command):
    monkeypatch.setenv("HLD_CACHE_DIR", _bad_cache_dir(tmp_path, how))
    argv = {
        "train": train_argv(tmp_path / "run"),
        "tokenize": ["tokenize", "--config", "smoke", *tiny_overrides(), "--quiet"],
        "gguf": ["eval", "--model", str(tmp_path / "m.gguf"), "--data", "sample:validation"],
    }[command]
    if command == "gguf":
        (tmp_path / "m.gguf").write_bytes(b"GGUF" + bytes(64))
    line = _one_line(capsys, argv, "HLD_CACHE_DIR")
    assert "point HLD_CACHE_DIR at a writable directory" in line
    if how in ("file", "under-a-file"):
        assert (tmp_path / "a-file").read_text() == "mine\n"


@pytest.mark.slow
def test_a_full_disk_under_the_token_store_is_one_line(tmp_path):
    """A file-size limit (RLIMIT_FSIZE: writes past it fail with EFBIG, as on a full disk) under
    `hld tokenize`: one line naming the file, no traceback."""

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of the signal's kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048))

    env = {
        **os.environ,
        "PYTHONPATH": str(SRC),
        "HLD_CACHE_DIR": str(tmp_path / "cache"),
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    argv = [sys.executable, "-m", "hld", "tokenize", "--config", "smoke", *tiny_overrides(), "--quiet"]
    p = subprocess.run(argv, env=env, preexec_fn=limit, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hld: error: ") and "free disk space" in lines[0], p.stderr
    assert "Traceback" not in p.stderr


LONG = "n" * 256


@pytest.mark.parametrize(
    "command", ["train", "train-name", "study", "export", "cache-teacher", "tokenize", "cache-dir"]
)
def test_an_over_long_name_is_one_line(tmp_path, capsys, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    argv = {
        "train": train_argv(tmp_path / LONG / "run"),
        "train-name": ["train", "--config", "smoke", *tiny_overrides(), f"name={LONG}", "--quiet"],
        "study": ["study", "--config", "demo", "--out", str(tmp_path / LONG), "--quiet"],
        "export": ["export", str(tmp_path / "run"), str(tmp_path / LONG)],
        "cache-teacher": ["cache-teacher", "--config", "smoke", "--out", LONG, *tiny_overrides(), "--quiet"],
        "tokenize": ["tokenize", "--config", "smoke", "--out", LONG, *tiny_overrides(), "--quiet"],
        "cache-dir": ["tokenize", "--config", "smoke", *tiny_overrides(), "--quiet"],
    }[command]
    if command == "cache-dir":
        monkeypatch.setenv("HLD_CACHE_DIR", str(tmp_path / LONG))
    line = _one_line(capsys, argv, "is 256 bytes, over the 255 a file name may have")
    assert "use a shorter name" in line
    assert list(tmp_path.iterdir()) == []
