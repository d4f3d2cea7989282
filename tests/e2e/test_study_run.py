"""`hld study` and `hld report` end to end on the tiny fixtures: the shipped demo study (15 cells:
4 arms at equal tokens and ce at kd's FLOPs, 3 seeds, 2 steps each) is interrupted inside its third
cell and rerun; the rerun skips the finished cells
(their summary.json untouched), restarts the partial one cleanly and trains the rest; the report's
verdict lines match an independent computation from results.csv; `hld report` rebuilds the report
from the run directories alone; user errors exit with code 2 and one line."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import shutil

import pytest

from helpers import VERDICT, check_verdicts, tiny_overrides
from hld.cli import main
from hld.train import loop

# the fixtures' teacher and data, small validation; the study itself sets students and budgets
RUN_OVERRIDES = [o for o in tiny_overrides() if not o.startswith(("student.preset=", "budget."))] + [
    "data.val_tokens=256"
]
STUDY_ARGS = ["study", "--config", "scratch", "seeds=[0, 1, 2]", "budgets=[{tokens: 256}]", "tasks=[]", *RUN_OVERRIDES]


def _main(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(argv)
    return rc, out.getvalue()


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> dict:
    """The demo study, interrupted in its 3rd cell by Ctrl-C, then rerun to completion."""
    out = tmp_path_factory.mktemp("study") / "demo"
    first_cells: list[str] = []
    real_train, real_step = loop.train, loop.launch_step
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HLD_CACHE_DIR", str(tmp_path_factory.mktemp("study-cache")))

        def interrupted_train(cfg, run_dir, **kw):
            first_cells.append(cfg.name)
            if len(first_cells) == 3:

                def step_then_stop(s, step):
                    if step == 1:
                        raise KeyboardInterrupt
                    return real_step(s, step)

                mp.setattr(loop, "launch_step", step_then_stop)
            return real_train(cfg, run_dir, **kw)

        mp.setattr(loop, "train", interrupted_train)
        rc, _ = _main([*STUDY_ARGS, "--out", str(out), "--quiet"])
        assert rc == 130
        mp.setattr(loop, "train", real_train)
        mp.setattr(loop, "launch_step", real_step)
        finished = sorted(p.parent.name for p in (out / "runs").glob("*/summary.json"))
        mtimes = {name: (out / "runs" / name / "summary.json").stat().st_mtime_ns for name in finished}
        partial_lines = (out / "runs" / first_cells[2] / "metrics.jsonl").read_text().splitlines()
        rc, stdout = _main([*STUDY_ARGS, "--out", str(out), "--json"])
        assert rc == 0
    return {
        "out": out,
        "first_cells": first_cells,
        "finished_before": finished,
        "mtimes": mtimes,
        "partial_lines": partial_lines,
        "result": json.loads(stdout.strip().splitlines()[-1]),
    }


@pytest.mark.slow
def test_an_interrupted_study_resumes_without_redoing_finished_cells(study):
    out, result, first = study["out"], study["result"], study["first_cells"]
    assert study["finished_before"] == sorted(first[:2]) and len(study["partial_lines"]) == 1
    assert sorted(result["skipped"]) == sorted(first[:2])
    assert len(result["trained"]) == 13 and first[2] in result["trained"] and result["cells"] == 15
    for name, mtime in study["mtimes"].items():
        assert (out / "runs" / name / "summary.json").stat().st_mtime_ns == mtime, name
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert len(runs) == 15 and all((out / "runs" / r / "summary.json").exists() for r in runs)
    # the interrupted cell was restarted cleanly: every step logged once
    steps = [json.loads(line)["step"] for line in (out / "runs" / first[2] / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    # KD/HLD cells read one shared cache; CE cells none
    for r in runs:
        cache = (out / "runs" / r / "config.yaml").read_text().split("\n  cache: ", 1)[1].split("\n", 1)[0]
        assert (cache == "null") == r.endswith("__ce"), r
    assert len([p for p in (out / "caches").iterdir() if p.is_dir()]) == 3  # one per seed: its own batch order


@pytest.mark.slow
def test_results_csv_has_one_row_per_cell(study):
    out = study["out"]
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 15 and {r["arm"] for r in rows} == {"ce", "kd", "hld-joint", "hld-first"}
    for r in rows:
        summary = json.loads((out / "runs" / r["cell"] / "summary.json").read_text())
        assert float(r["val_loss"]) == pytest.approx(summary["val/loss"]) and int(r["tokens"]) == summary["tokens"]
        assert r["configuration"] == r["cell"].rsplit("__", 2)[0]
        assert int(r["student_params_non_embedding"]) < int(r["student_params"])
    budget = [r for r in rows if r["accounting"] == "budget"]
    assert {int(r["tokens"]) for r in budget} == {256}  # equal student tokens
    ce_flops = {r["seed"]: float(r["flops"]) for r in budget if r["arm"] == "ce"}
    assert all(float(r["flops"]) > ce_flops[r["seed"]] for r in budget if r["arm"] != "ce")
    kd = {r["seed"]: r for r in budget if r["arm"] == "kd"}
    for r in (r for r in rows if r["accounting"] == "flops"):  # ce again, at the FLOPs kd spent
        assert r["arm"] == "ce" and r["match"] == kd[r["seed"]]["configuration"]
        assert 0.99 * float(kd[r["seed"]]["flops"]) < float(r["flops"]) <= float(kd[r["seed"]]["flops"])
        assert int(r["tokens"]) > 256


def _verdicts_in(report: str) -> dict:
    return {
        (m["arm"], m["base"], m["acc"], m["conf"]): m.groupdict() for m in map(VERDICT.match, report.splitlines()) if m
    }


def test_report_verdicts_match_results_csv(study):
    out = study["out"]
    report = (out / "report.md").read_text()
    check_verdicts(report, out / "results.csv")
    assert len(_verdicts_in(report)) == 4  # kd vs ce in each accounting, hld-* vs kd once
    assert study["result"]["verdicts"] == [line[2:] for line in report.splitlines() if VERDICT.match(line)]
    for name in ("loss_vs_flops", "training_curves", "paired_differences"):
        assert (out / "plots" / f"{name}.png").stat().st_size > 10_000


@pytest.mark.slow
def test_hld_report_rebuilds_from_run_directories_alone(study, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(study["out"] / "runs", copy / "runs", ignore=shutil.ignore_patterns("student", "checkpoints"))
    rc, stdout = _main(["report", str(copy), "--json"])
    assert rc == 0
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["cells"] == 15 and len(result["plots"]) == 5  # 3 + the two CKA plots
    assert _verdicts_in((copy / "report.md").read_text()) == _verdicts_in((study["out"] / "report.md").read_text())
    assert (copy / "results.csv").read_text() == (study["out"] / "results.csv").read_text()


@pytest.mark.slow
def test_a_cell_with_a_final_checkpoint_but_no_summary_resumes(study, tmp_path):
    out = tmp_path / "demo"
    shutil.copytree(study["out"], out, ignore=shutil.ignore_patterns("caches"))
    cell = sorted((out / "runs").iterdir())[-1]
    before = json.loads((cell / "summary.json").read_text())
    metrics = (cell / "metrics.jsonl").read_text()  # tokens_per_s differs if the cell were trained again
    (cell / "summary.json").unlink()
    for path in (out / "runs").glob("*/config.yaml"):  # the caches moved with the study directory
        path.write_text(path.read_text().replace(str(study["out"].resolve()), str(out.resolve())))
    rc, stdout = _main([*STUDY_ARGS, "--out", str(out), "--json"])
    assert rc == 0
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["trained"] == [cell.name] and len(result["skipped"]) == 14
    assert (cell / "metrics.jsonl").read_text() == metrics and (cell / "summary.json").exists()
    rows = {r["cell"]: r for r in csv.DictReader(open(out / "results.csv"))}
    assert float(rows[cell.name]["val_loss"]) == pytest.approx(before["val/loss"])


@pytest.mark.slow
def test_user_errors_exit_2_with_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\narms: [kd, hld]\nstudents: [tiny-1l]\nbudgets: [{tokens: 512}]\n")
    cases = [
        ["study", "--config", str(bad)],
        ["study", "--config", "demo", "seeds=[0, 0]"],
        ["study", "--config", "demo", "student.preset=tiny-4l"],
        ["report", str(tmp_path)],
        ["study", "--config", "demo", "tasks=[hld_mc, hellaswog]", "--out", str(tmp_path / "typo")],
    ]
    for argv in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("hld: error: ") and "\n" not in err and "Traceback" not in err, err
    assert "unknown lm-eval task 'hellaswog'" in err and not (tmp_path / "typo" / "runs").exists()


def test_a_finished_cell_with_another_config_is_refused(study, tmp_path, capsys):
    out = tmp_path / "demo"
    shutil.copytree(study["out"] / "runs", out / "runs", ignore=shutil.ignore_patterns("student", "checkpoints"))
    rc = main([*STUDY_ARGS, "train.weight_decay=0.05", "--out", str(out)])
    assert rc == 2 and "trained with a different config" in capsys.readouterr().err


@pytest.mark.slow
def test_sigterm_during_a_studys_cache_build_is_one_line_and_leaves_no_debris(tmp_path, capsys, monkeypatch):
    """A study stopped (SIGTERM: a scheduler, `kill`) while it builds a teacher cache: exit 2 with one
    line naming the cache and the way on, no temporary cache directory left (the build's directory
    waits for the rerun, which completes it)."""
    import os
    import signal

    from hld.cache import writer as cache_writer

    real = cache_writer._signal_rows

    def topk_then_sigterm(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    out = tmp_path / "demo"
    args = [*STUDY_ARGS, "arms=[kd]", "seeds=[0]", "equal_flops=null", "--out", str(out), "--quiet"]
    monkeypatch.setattr(cache_writer, "_signal_rows", topk_then_sigterm)
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hld: error: stopped by SIGTERM while building the teacher cache"), err
    assert "rerun the same command" in err[0]
    # no temporary directory: the build's own (resumed by the rerun) and its lock file
    left = sorted(p.name.rsplit(".", 1)[-1] for p in (out / "caches").iterdir() if p.name.startswith("."))
    assert left == ["build", "lock"]
    monkeypatch.setattr(cache_writer, "_signal_rows", real)
    assert main(args) == 0
    assert len(list((out / "runs").glob("*/summary.json"))) == 1
    assert [p.suffix for p in (out / "caches").iterdir() if p.name.startswith(".")] == [".lock"]
