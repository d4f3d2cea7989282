"""`--resume` where no usable checkpoint is left (issue 15: each was a dead end): a run stopped before its
first checkpoint starts again from step 0; a corrupt checkpoint names a way out that works; a finished
run without its checkpoint points at `hld export`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from helpers import one_line_error as _one_line
from helpers import train_argv as _argv
from hld.cli import main


def _stopped_before_the_first_checkpoint(run: Path) -> None:
    """Make a finished run what SIGINT/SIGKILL before the first checkpoint, or a mid-run error, leaves:
    config.yaml and some metrics lines, no checkpoint."""
    shutil.rmtree(run / "checkpoints")
    shutil.rmtree(run / "student")
    (run / "summary.json").unlink()
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text(lines[0] + "\n")


@pytest.mark.slow
def test_resume_without_a_checkpoint_starts_from_step_0(capsys, finished_run_copy):
    run = finished_run_copy
    _stopped_before_the_first_checkpoint(run)
    line = _one_line(capsys, _argv(run), "already holds a run")
    assert "step 0" in line and "--resume" in line  # the way out it names works:
    assert main([*_argv(run), "--resume", "--json"]) == 0
    cap = capsys.readouterr()
    assert "no checkpoint in" in cap.err and "starting its run from step 0" in cap.err
    assert json.loads(cap.out.strip().splitlines()[-1])["steps"] == 4
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # the stale line before the stop is dropped, not repeated


@pytest.mark.slow
def test_corrupt_checkpoint_names_a_way_out_that_works(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(_argv(run, "budget.tokens=1024", "train.checkpoint_every_steps=2")) == 0
    (run / "summary.json").unlink()
    ckpt = run / "checkpoints" / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    capsys.readouterr()
    line = _one_line(
        capsys,
        [*_argv(run, "budget.tokens=1024", "train.checkpoint_every_steps=2"), "--resume"],
        "is corrupt or unreadable",
    )
    assert "delete it and rerun with --resume" in line
    ckpt.unlink()  # as the line says
    assert main([*_argv(run, "budget.tokens=1024", "train.checkpoint_every_steps=2"), "--resume"]) == 0
    assert json.loads((run / "summary.json").read_text())["steps"] == 8


def test_resume_of_a_finished_run_without_checkpoint(capsys, finished_run_copy):
    copy = finished_run_copy
    shutil.rmtree(copy / "checkpoints")
    line = _one_line(capsys, [*_argv(copy), "--resume"], "no checkpoint in")
    assert "has finished" in line and "hld export" in line
