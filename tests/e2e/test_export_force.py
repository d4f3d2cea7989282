"""`hld export RUN OUT --force` replaces only an earlier hld export. A held-out sweep ran
`hld export --force RUN ~` and lost a home directory: every directory hld did not write is refused in one
line with nothing touched. Each protected directory is a stand-in made inside the test's temporary
directory — never a real one."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from helpers import one_line_error
from hld.cli import main
from hld.export import MARKER


def _tree(root: Path) -> dict:
    """Every path below `root` (links not followed) with its bytes, or its kind."""
    out = {}
    for p in sorted(root.rglob("*")):
        key = str(p.relative_to(root))
        out[key] = f"-> {os.readlink(p)}" if p.is_symlink() else p.read_bytes() if p.is_file() else "dir"
    return out


def _write(root: Path, files: dict) -> Path:
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(data)
    return root


def _home(d: Path) -> Path:
    return _write(
        d,
        {
            ".bashrc": "export PATH=$HOME/.local/bin:$PATH\n",
            ".ssh/id_ed25519": "PRIVATE KEY\n",
            ".local/lib/python3.11/site-packages/x.py": "x = 1\n",
            ".cache/hld/gguf/model.safetensors": "weights\n",
            "thesis/main.tex": "\\documentclass{article}\n",
        },
    )


def _checkout(d: Path) -> Path:
    return _write(d, {".git/HEAD": "ref: refs/heads/main\n", "src/app.py": "print(1)\n", "README.md": "# app\n"})


def _other_run(d: Path) -> Path:
    return _write(d, {"config.yaml": "seed: 0\n", "metrics.jsonl": "{}\n", "summary.json": "{}\n"})


def _study(d: Path) -> Path:
    return _write(d, {"study.json": "{}\n", "runs/ce-s0/config.yaml": "seed: 0\n", "report.md": "# r\n"})


def _hf_checkpoint(d: Path) -> Path:  # another tool's model: the files an export has, but no marker
    return _write(d, {"config.json": "{}\n", "model.safetensors": "w\n", "README.md": "---\nhld: {}\n---\n"})


def _marker_of_another_kind(d: Path) -> Path:
    return _write(d, {MARKER: json.dumps({"kind": "hld-cache", "files": ["a"]}), "a": "x\n"})


def _marker_damaged(d: Path) -> Path:
    return _write(d, {MARKER: '{"kind": "hld-exp', "config.json": "{}\n"})


def _marker_a_directory(d: Path) -> Path:
    return _write(d, {f"{MARKER}/files": "x\n", "config.json": "{}\n"})


def _marker_to_dev_zero(d: Path) -> Path:  # read blind, it would fill the memory
    _write(d, {"config.json": "{}\n"})
    (d / MARKER).symlink_to("/dev/zero")
    return d


def _marker_a_fifo(d: Path) -> Path:  # read blind, it would block forever
    _write(d, {"config.json": "{}\n"})
    os.mkfifo(d / MARKER)
    return d


STAND_INS = {
    "home": (_home, "not an earlier hld export"),
    "checkout": (_checkout, "not an earlier hld export"),
    "another-run": (_other_run, "not an earlier hld export"),
    "study": (_study, "not an earlier hld export"),
    "hf-checkpoint-without-marker": (_hf_checkpoint, "not an earlier hld export"),
    "marker-of-another-kind": (_marker_of_another_kind, "not an earlier hld export"),
    "marker-damaged": (_marker_damaged, "not an earlier hld export"),
    "marker-a-directory": (_marker_a_directory, "not an earlier hld export"),
    "marker-to-dev-zero": (_marker_to_dev_zero, "not an earlier hld export"),
    "marker-a-fifo": (_marker_a_fifo, "not an earlier hld export"),
}


@pytest.mark.parametrize("kind", sorted(STAND_INS))
def test_force_refuses_a_directory_hld_did_not_write(tmp_path, capsys, finished_run, kind):
    make, problem = STAND_INS[kind]
    victim = make(tmp_path / "victim")
    before = _tree(tmp_path)
    line = one_line_error(capsys, ["export", str(finished_run), str(victim), "--force"], problem)
    assert str(victim) in line
    assert _tree(tmp_path) == before  # nothing touched, no temporary sibling left


def test_force_refuses_a_symlink_and_leaves_its_target(tmp_path, capsys, finished_run):
    target = _home(tmp_path / "home")
    link = tmp_path / "link"
    link.symlink_to(target)
    before = _tree(tmp_path)
    one_line_error(capsys, ["export", str(finished_run), str(link), "--force"], "is a symbolic link")
    assert _tree(tmp_path) == before


def test_force_refuses_a_symlink_even_to_an_earlier_export(tmp_path, capsys, finished_run):
    assert main(["export", str(finished_run), str(tmp_path / "export"), "--quiet"]) == 0
    (tmp_path / "link").symlink_to(tmp_path / "export")
    before = _tree(tmp_path)
    one_line_error(capsys, ["export", str(finished_run), str(tmp_path / "link"), "--force"], "is a symbolic link")
    assert _tree(tmp_path) == before


def test_force_refuses_a_regular_file(tmp_path, capsys, finished_run):
    (tmp_path / "notes.txt").write_text("mine\n")
    one_line_error(capsys, ["export", str(finished_run), str(tmp_path / "notes.txt"), "--force"], "is not a directory")
    assert (tmp_path / "notes.txt").read_text() == "mine\n"


def test_force_refuses_the_parent_of_the_current_directory(tmp_path, capsys, finished_run, monkeypatch):
    """The stand-in `/`: a directory holding the current directory (as `/` and a home directory do)."""
    root = _home(tmp_path / "root")
    (root / "work").mkdir()
    monkeypatch.chdir(root / "work")
    before = _tree(tmp_path)
    one_line_error(capsys, ["export", str(finished_run), str(root), "--force"], "contains the current directory")
    assert _tree(tmp_path) == before


def test_force_accepts_an_earlier_export_and_an_empty_directory(tmp_path, capsys, finished_run):
    out = tmp_path / "export"
    assert main(["export", str(finished_run), str(out), "--quiet"]) == 0
    first = _tree(out)
    assert main(["export", str(finished_run), str(out), "--force", "--quiet"]) == 0
    assert _tree(out) == first  # the same run exported again: the same bytes
    (tmp_path / "empty").mkdir()
    assert main(["export", str(finished_run), str(tmp_path / "empty"), "--force", "--quiet"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "export"]


def test_export_force_refuses_an_out_holding_the_current_directory(tmp_path, capsys, monkeypatch, finished_run):
    """5: `hld export RUN OUT --force` with OUT a parent of the cwd deleted the cwd and a sibling file."""
    parent = tmp_path / "parent"
    (parent / "here").mkdir(parents=True)
    (parent / "sibling.txt").write_text("keep\n")
    (parent / "here" / "work.txt").write_text("keep too\n")
    before = _tree(parent)
    monkeypatch.chdir(parent / "here")
    one_line_error(capsys, ["export", str(finished_run), str(parent), "--force"], "contains the current directory")
    one_line_error(capsys, ["export", str(finished_run), ".", "--force"], "is the current directory")
    assert _tree(parent) == before
