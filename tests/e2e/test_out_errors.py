"""An output location that cannot be one (`--out` naming an existing file, a read-only place, a run name
with a path in it) is one line naming the path and what to do, exit 2, and nothing is written
(issue 15). Read-only locations are tested as root, whom chmod does not stop: a path under /sys
(sysfs refuses new entries, EPERM) and a path whose parent is a file (ENOTDIR)."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import one_line_error as _one_line
from helpers import tiny_overrides
from helpers import train_argv as _argv

# the demo study scores the teacher on harness tasks: without lm-eval (the GPU machine) that error would
# come first; these rows are about --out
NO_TASKS = ["tasks=[]"]


@pytest.mark.parametrize("command", ["train", "cache-teacher", "study"])
def test_out_naming_an_existing_file(tmp_path, capsys, command):
    f = tmp_path / "notes.txt"
    f.write_bytes(b"keep\n")
    argv = {
        "train": _argv(f),
        "cache-teacher": ["cache-teacher", "--config", "smoke", "--out", str(f), *tiny_overrides(), "--quiet"],
        "study": ["study", "--config", "demo", "--out", str(f), *NO_TASKS, "--quiet"],
    }[command]
    _one_line(capsys, argv, "is an existing file")
    assert f.read_bytes() == b"keep\n"


@pytest.mark.parametrize("where", ["sys", "file-parent"])
@pytest.mark.parametrize("command", ["train", "study"])
def test_out_in_a_read_only_location(tmp_path, capsys, command, where):
    (tmp_path / "plain").write_text("x")
    out = f"/sys/hld-test-{command}" if where == "sys" else str(tmp_path / "plain" / "out")
    argv = _argv(Path(out)) if command == "train" else ["study", "--config", "demo", "--out", out, *NO_TASKS, "--quiet"]
    line = _one_line(capsys, argv, "cannot create")
    assert "pick a writable --out" in line and "free disk space" not in line


def test_read_only_out_does_not_say_free_disk_space(tmp_path, capsys):
    line = _one_line(capsys, _argv(Path("/sys/hld-test-ro")), "cannot create the run directory")
    assert "free disk space" not in line


def test_name_outside_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _one_line(capsys, ["train", "--config", "smoke", *tiny_overrides(), "name=../x", "--quiet"], "is not a plain name")
    assert list(tmp_path.iterdir()) == []
