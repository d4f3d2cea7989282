"""A command-line flag out of range, or a flag naming what it cannot use (`hld eval --limit/--max-docs/
--batch-size` under 1, `--data` empty or shorter than a window, `--model` an unfinished run;
`hld study --cell/--cache ""`; `hld inspect-teacher --windows` under 1), is one line naming the flag
(never the config key it stands for), exit 2 (issues 15 and 24)."""

from __future__ import annotations

import json
import shutil

import pytest

from helpers import C4_VALIDATION
from helpers import one_line_error as _one_line


@pytest.mark.parametrize("limit", ["0", "-3"])
@pytest.mark.slow
def test_eval_limit_not_positive(capsys, finished_run, limit):
    _one_line(
        capsys,
        ["eval", "--model", str(finished_run), "--tasks", "hld_mc", "--limit", limit, "--quiet"],
        f"--limit {limit} is not a positive number",
    )


def test_eval_max_docs_zero(capsys, finished_run):
    _one_line(
        capsys,
        ["eval", "--model", str(finished_run), "--data", C4_VALIDATION, "--max-docs", "0", "--quiet"],
        "--max-docs 0 is not a positive number",
    )


@pytest.mark.parametrize("size", ["0", "-1"])
def test_eval_batch_size_not_positive(capsys, finished_run, size):
    _one_line(
        capsys,
        ["eval", "--model", str(finished_run), "--data", "sample:validation", "--batch-size", size, "--json"],
        f"--batch-size {size} is not a positive number",
    )


def test_eval_data_errors_name_the_flags_and_the_file(tmp_path, capsys, finished_run):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    line = _one_line(capsys, ["eval", "--model", str(finished_run), "--data", str(empty), "--quiet"], str(empty))
    assert "--data" in line and "data.train" not in line
    short = tmp_path / "short.jsonl"
    short.write_text(json.dumps({"text": "a few words"}) + "\n")
    line = _one_line(
        capsys,
        ["eval", "--model", str(finished_run), "--data", str(short), "--seq-len", "4096", "--quiet"],
        "--seq-len=4096",
    )
    assert "data.seq_len" not in line and str(short) in line


def test_eval_of_an_unfinished_run(tmp_path, capsys, finished_run):
    copy = tmp_path / "r"
    shutil.copytree(finished_run, copy, ignore=shutil.ignore_patterns("student", "summary.json"))
    line = _one_line(
        capsys, ["eval", "--model", str(copy), "--data", "sample:validation", "--quiet"], "has not finished"
    )
    assert "hld train --resume" in line


@pytest.mark.parametrize("flag", ["--cell", "--cache"])
def test_an_empty_cell_or_cache_id_is_refused(tmp_path, capsys, flag):
    """`hld study --cell ""` ran the whole study."""
    _one_line(capsys, ["study", "--config", "demo", "--out", str(tmp_path / "s"), flag, ""], f"{flag} is empty")
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("n", ["-3", "0"])
def test_inspect_teacher_refuses_a_windows_count_under_1(capsys, n):
    _one_line(capsys, ["inspect-teacher", "--config", "smoke", "--windows", n], f"--windows {n} is not a positive")
