"""`hld train --out DIR` and `hld study --out DIR` write only into a directory that is theirs (empty, or an
hld run / study): any other directory is refused in one line and left byte for byte as it was
(issue 24: a copied run's outputs, another tool's config.yaml, another report.md / results.csv /
plots were overwritten, exit 0)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from helpers import one_line_error as _one_line
from helpers import tiny_overrides, train_argv


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_train_refuses_a_directory_that_is_not_a_run(tmp_path, capsys, hld_run):
    """1: the user's config.yaml, summary.json, cka.json and student/ (a copied run's outputs, no metrics
    or checkpoints) were all overwritten with exit 0."""
    victim = tmp_path / "mine"
    victim.mkdir()
    for name in ("config.yaml", "summary.json", "cka.json"):
        shutil.copy(hld_run / name, victim / name)
    shutil.copytree(hld_run / "student", victim / "student")
    before = _snapshot(victim)
    _one_line(capsys, train_argv(victim), "is not an hld run directory")
    assert _snapshot(victim) == before and sorted(p.name for p in victim.iterdir()) == sorted(
        ["config.yaml", "summary.json", "cka.json", "student"]
    )


@pytest.mark.parametrize("resume", [False, True])
def test_train_refuses_another_tools_directory(tmp_path, capsys, resume):
    victim = tmp_path / "mine"
    (victim / "sub").mkdir(parents=True)
    (victim / "config.yaml").write_text("model: resnet\nepochs: 3\n")
    (victim / "sub" / "notes.txt").write_text("keep\n")
    before = _snapshot(victim)
    _one_line(capsys, train_argv(victim, *(["--resume"] if resume else [])), "is not an hld run directory")
    assert _snapshot(victim) == before


@pytest.mark.slow
def test_study_refuses_a_directory_that_is_not_a_study(tmp_path, capsys):
    """2: report.md, results.csv, paired.csv and plots/ of another directory were overwritten."""
    victim = tmp_path / "mine"
    (victim / "plots").mkdir(parents=True)
    for name in ("report.md", "results.csv", "paired.csv", "plots/a.png"):
        (victim / name).write_bytes(b"mine\n")
    before = _snapshot(victim)
    runs = [o for o in tiny_overrides() if not o.startswith(("student.preset=", "budget."))]
    argv = ["study", "--config", "demo", "--out", str(victim), *runs, "--quiet"]
    _one_line(capsys, argv, "is not a study directory")
    assert _snapshot(victim) == before
