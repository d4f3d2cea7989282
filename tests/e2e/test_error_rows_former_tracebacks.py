"""Issue 15: the rows that were tracebacks, dead ends or misleading lines, each now one line
`hld: error: <problem> — <fix>` and exit 2 (or, for the resume dead end, a run that continues).
Read-only locations are tested as root, whom chmod does not stop: a path under /sys (sysfs refuses
new entries, EPERM) and a path whose parent is a file (ENOTDIR)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from helpers import C4_VALIDATION, tiny_overrides
from helpers import one_line_error as _one_line
from helpers import train_argv as _argv
from hld.cli import main


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("finished") / "run"
    assert main(_argv(run)) == 0
    return run


# --------------------------------------------------------------------------- tracebacks -> one line


@pytest.mark.parametrize(
    "overrides, problem",
    [
        (["budget.tokens=null", "budget.flops=inf"], "budget.flops=inf is outside"),
        (["budget.tokens=null", "budget.flops=1e30"], "more than the limit of 10,000,000"),
        (["teacher.cache_top_k=-5"], "teacher.cache_top_k=-5 is outside [1, "),
        (["train.log_every_steps=0"], "train.log_every_steps=0 is outside [1, "),
        (["student.n_heads=3"], "student d_model=64 is not a multiple of n_heads=3"),
    ],
)
def test_config_values_that_were_tracebacks(tmp_path, capsys, overrides, problem):
    _one_line(capsys, _argv(tmp_path / "r", *overrides), problem)
    # refused before training: at most the resolved config.yaml (a FLOPs budget needs the models' sizes)
    assert not (tmp_path / "r").exists() or [p.name for p in (tmp_path / "r").iterdir()] == ["config.yaml"]


def test_training_on_a_top_0_cache(tmp_path, capsys):
    """A cache claiming top-0 logits (what teacher.cache_top_k=0 used to build) is refused."""
    cache = tmp_path / "cache"
    assert main(["cache-teacher", "--config", "smoke", "--out", str(cache), *tiny_overrides(), "--quiet"]) == 0
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["identity"]["top_k"] = 0
    (cache / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    _one_line(capsys, _argv(tmp_path / "r", f"teacher.cache={cache}"), "holds top-0 logits")


@pytest.mark.parametrize("limit", ["0", "-3"])
@pytest.mark.slow
def test_eval_limit_not_positive(capsys, finished, limit):
    _one_line(
        capsys,
        ["eval", "--model", str(finished), "--tasks", "hld_mc", "--limit", limit, "--quiet"],
        f"--limit {limit} is not a positive number",
    )


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


# --------------------------------------------------------------------------- the resume dead end


def _started_without_checkpoint(run: Path) -> None:
    """What SIGINT/SIGKILL before the first checkpoint, or a mid-run error, leaves: config.yaml and
    some metrics lines, no checkpoint."""
    assert main(_argv(run)) == 0
    shutil.rmtree(run / "checkpoints")
    shutil.rmtree(run / "student")
    (run / "summary.json").unlink()
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text(lines[0] + "\n")


@pytest.mark.slow
def test_resume_without_a_checkpoint_starts_from_step_0(tmp_path, capsys):
    run = tmp_path / "run"
    _started_without_checkpoint(run)
    capsys.readouterr()
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


def test_resume_of_a_finished_run_without_checkpoint(tmp_path, capsys, finished):
    copy = tmp_path / "r"
    shutil.copytree(finished, copy)
    shutil.rmtree(copy / "checkpoints")
    line = _one_line(capsys, [*_argv(copy), "--resume"], "no checkpoint in")
    assert "has finished" in line and "hld export" in line


# --------------------------------------------------------------------------- misleading messages


def test_max_docs_zero_names_the_key(tmp_path, capsys):
    _one_line(capsys, _argv(tmp_path / "r", "data.max_train_docs=0"), "data.max_train_docs=0 is outside [1, ")


def test_eval_max_docs_zero(capsys, finished):
    _one_line(
        capsys,
        ["eval", "--model", str(finished), "--data", C4_VALIDATION, "--max-docs", "0", "--quiet"],
        "--max-docs 0 is not a positive number",
    )


@pytest.mark.parametrize("size", ["0", "-1"])
def test_eval_batch_size_not_positive(capsys, finished, size):
    _one_line(
        capsys,
        ["eval", "--model", str(finished), "--data", "sample:validation", "--batch-size", size, "--json"],
        f"--batch-size {size} is not a positive number",
    )


def test_eval_data_errors_name_the_flags_and_the_file(tmp_path, capsys, finished):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    line = _one_line(capsys, ["eval", "--model", str(finished), "--data", str(empty), "--quiet"], str(empty))
    assert "--data" in line and "data.train" not in line
    short = tmp_path / "short.jsonl"
    short.write_text(json.dumps({"text": "a few words"}) + "\n")
    line = _one_line(
        capsys,
        ["eval", "--model", str(finished), "--data", str(short), "--seq-len", "4096", "--quiet"],
        "--seq-len=4096",
    )
    assert "data.seq_len" not in line and str(short) in line


def test_eval_of_an_unfinished_run(tmp_path, capsys, finished):
    copy = tmp_path / "r"
    shutil.copytree(finished, copy, ignore=shutil.ignore_patterns("student", "summary.json"))
    line = _one_line(
        capsys, ["eval", "--model", str(copy), "--data", "sample:validation", "--quiet"], "has not finished"
    )
    assert "hld train --resume" in line


def test_override_without_a_key(tmp_path, capsys):
    line = _one_line(capsys, _argv(tmp_path / "r", "=5"), "override '=5' has no key")
    assert "did you mean" not in line


def test_name_outside_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _one_line(capsys, ["train", "--config", "smoke", *tiny_overrides(), "name=../x", "--quiet"], "is not a plain name")
    assert list(tmp_path.iterdir()) == []


def test_read_only_out_does_not_say_free_disk_space(tmp_path, capsys):
    line = _one_line(capsys, _argv(Path("/sys/hld-test-ro")), "cannot create the run directory")
    assert "free disk space" not in line


def test_sigterm_outside_a_step_or_a_cache_build_is_one_line(capsys, monkeypatch):
    """SIGTERM where no finer handler runs (here: `hld eval`'s perplexity) ends the command with one line
    and exit 2, after the cleanups of whatever it was writing (the default action ended it silently);
    the handler is restored afterwards."""
    import os
    import signal

    import hld.commands as commands
    from helpers import TINY_TEACHER

    real = commands._eval_perplexity

    def sigterm_then_eval(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(commands, "_eval_perplexity", sigterm_then_eval)
    before = signal.getsignal(signal.SIGTERM)
    line = _one_line(
        capsys,
        ["eval", "--model", str(TINY_TEACHER), "--data", C4_VALIDATION, "--max-docs", "2", "--quiet"],
        "hld eval stopped by SIGTERM",
    )
    assert "rerun the same command" in line
    assert signal.getsignal(signal.SIGTERM) is before
