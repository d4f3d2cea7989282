"""`hld train` end to end on the tiny fixtures: every arm produces a complete run directory; an
interrupted run resumed from its checkpoint ends bitwise equal to an uninterrupted one; every user
error exits with code 2 and one line `hld: error: ...` (no traceback)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from helpers import weights_to_inf_after_each_step
from hld.cli import main
from hld.config import load_config, to_dict
from hld.train import loop

ASSETS = Path(__file__).resolve().parents[1] / "assets"
METHODS = ("ce", "kd", "hld-joint", "hld-first")


def _cli(capsys, argv: list[str]) -> tuple[int, str, str]:
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def _train_argv(out: Path, overrides: list[str], *extra: str) -> list[str]:
    return ["train", "--config", "smoke", "--out", str(out), *overrides, *extra]


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def small_vocab_teacher(tmp_path_factory) -> Path:
    """The tiny teacher's architecture with a 256-row embedding, shipped with the 512-token tokenizer."""
    from transformers import AutoConfig, Gemma3ForCausalLM

    out = tmp_path_factory.mktemp("small-vocab-teacher")
    cfg = AutoConfig.from_pretrained(ASSETS / "tiny_teacher")
    cfg.vocab_size = 256
    torch.manual_seed(0)
    Gemma3ForCausalLM(cfg).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ASSETS / "tiny_teacher" / name, out / name)
    return out


# --------------------------------------------------------------------------- happy path


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.slow
def test_train_every_arm(capsys, tmp_path, overrides, method):
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    argv_overrides = [*overrides, f"objective.method={method}"]
    rc, out, err = _cli(capsys, _train_argv(run, argv_overrides, "--json"))
    assert rc == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["arm"] == method and result["steps"] == 4 and result["tokens"] == 512
    assert math.isfinite(result["val/ppl"]) and 1 < result["val/ppl"] < 1e4

    assert {p.name for p in run.iterdir()} >= {"config.yaml", "metrics.jsonl", "checkpoints", "student", "summary.json"}
    # the resolved config is the config the CLI built from smoke + overrides
    assert yaml.safe_load((run / "config.yaml").read_text()) == to_dict(load_config("smoke", argv_overrides))

    lines = _metrics(run)
    assert [m["step"] for m in lines] == [1, 2, 3, 4]
    assert [m["tokens"] for m in lines] == [128, 256, 384, 512]
    assert all(math.isfinite(m["train/loss"]) for m in lines)
    assert "val/ppl" in lines[-1] and lines[-1]["val/ppl"] == result["val/ppl"]
    phases = [m["phase"] for m in lines]
    expected_phases = {
        "ce": ["ce"] * 4,
        "kd": ["kd"] * 4,
        "hld-joint": ["hld-joint"] * 4,
        # first_share 0.2 of 4 steps: the boundary falls inside step 0, which blends both
        "hld-first": ["hidden+kd", "kd", "kd", "kd"],
    }[method]
    assert phases == expected_phases
    if method in ("hld-joint", "hld-first"):
        assert "train/hidden" in lines[0]

    summary = json.loads((run / "summary.json").read_text())
    assert summary == {k: v for k, v in result.items() if k != "run_dir"}

    ckpt = torch.load(run / "checkpoints" / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert ckpt["step"] == 4 and ckpt["tokens"] == 512
    assert (ckpt["projectors"] is not None) == method.startswith("hld")

    student = AutoModelForCausalLM.from_pretrained(run / "student")
    state = student.state_dict()
    for name, tensor in state.items():  # the exported student is the trained one
        assert torch.equal(tensor, ckpt["student"][name]), name
    assert student.config.vocab_size == 512 and student.config.num_hidden_layers == 2


@pytest.mark.slow
def test_resume_is_bitwise_equal_to_an_uninterrupted_run(capsys, tmp_path, overrides, monkeypatch):
    ov = [*overrides, "objective.method=hld-joint", "budget.tokens=1024", "train.checkpoint_every_steps=2"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert _cli(capsys, _train_argv(a, ov, "--quiet"))[0] == 0

    real_step = loop.launch_step

    def interrupted(s, step):  # killed during step 6, after the checkpoint of step 4 and the log of step 5
        if step == 5:
            raise KeyboardInterrupt
        return real_step(s, step)

    monkeypatch.setattr(loop, "launch_step", interrupted)
    rc, _, err = _cli(capsys, _train_argv(b, ov, "--quiet"))
    assert rc == 130 and "interrupted" in err
    assert torch.load(b / "checkpoints" / "checkpoint.pt", weights_only=True)["step"] == 4
    assert [m["step"] for m in _metrics(b)] == [1, 2, 3, 4, 5]
    assert not (b / "student").exists()

    monkeypatch.setattr(loop, "launch_step", real_step)
    rc, out, err = _cli(capsys, _train_argv(b, ov, "--resume", "--json"))
    assert rc == 0, err

    wa, wb = load_file(a / "student" / "model.safetensors"), load_file(b / "student" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    ca = torch.load(a / "checkpoints" / "checkpoint.pt", weights_only=True)
    cb = torch.load(b / "checkpoints" / "checkpoint.pt", weights_only=True)
    for name in ca["projectors"]:
        assert torch.equal(ca["projectors"][name], cb["projectors"][name]), name
    for pid, st in ca["optimizer"]["state"].items():
        for k, v in st.items():
            assert torch.equal(v, cb["optimizer"]["state"][pid][k]), (pid, k)
    # metrics: step 5 logged before the interruption is replaced, not duplicated; values identical
    drop = ("tokens_per_s",)
    ma = [{k: v for k, v in m.items() if k not in drop} for m in _metrics(a)]
    mb = [{k: v for k, v in m.items() if k not in drop} for m in _metrics(b)]
    assert [m["step"] for m in mb] == list(range(1, 9))
    assert ma == mb
    sa, sb = json.loads((a / "summary.json").read_text()), json.loads((b / "summary.json").read_text())
    assert sa["val/ppl"] == sb["val/ppl"] and sa["flops"] == sb["flops"] and sa["tokens"] == sb["tokens"] == 1024


@pytest.mark.slow
def test_resume_of_an_empty_or_missing_dir_starts(capsys, tmp_path, overrides):
    """A SLURM array task requeued after dying before its run wrote config.yaml passes --resume as always:
    an empty or missing --out starts the run from step 0, as a plain start would (same weights)."""
    ov = [*overrides, "budget.tokens=256"]
    assert _cli(capsys, _train_argv(tmp_path / "plain", ov, "--quiet"))[0] == 0
    (tmp_path / "empty").mkdir()
    for name in ("empty", "missing"):
        rc, _, err = _cli(capsys, _train_argv(tmp_path / name, ov, "--resume", "--quiet"))
        assert rc == 0, err
        assert "starting its run from step 0" in err
        assert [m["step"] for m in _metrics(tmp_path / name)] == [1, 2]
        wa = load_file(tmp_path / "plain" / "student" / "model.safetensors")
        wb = load_file(tmp_path / name / "student" / "model.safetensors")
        assert all(torch.equal(wa[k], wb[k]) for k in wa)


# --------------------------------------------------------------------------- user errors


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _case_missing_config(tmp_path, ov, run):
    return ["train", "--config", str(tmp_path / "no-such.yaml"), "--out", str(tmp_path / "r")], "no-such.yaml"


def _case_unknown_key(tmp_path, ov, run):
    return _train_argv(tmp_path / "r", [*ov, "train.lrr=1"]), "unknown config key train.lrr"


def _case_wrong_type(tmp_path, ov, run):
    return _train_argv(tmp_path / "r", [*ov, "train.batch_size=four"]), "train.batch_size='four' should be of type int"


def _case_bad_override(tmp_path, ov, run):
    return _train_argv(tmp_path / "r", [*ov, "train.lr"]), "not of the form key=value"


def _case_missing_teacher(tmp_path, ov, run):
    return _train_argv(tmp_path / "r", [*ov, f"teacher.model={tmp_path / 'no-teacher'}"]), "no-teacher does not exist"


def _case_layer_out_of_range(tmp_path, ov, run):
    return (
        _train_argv(
            tmp_path / "r",
            [
                *ov,
                "objective.method=hld-joint",
                "objective.hidden.mapping=explicit",
                "objective.hidden.pairs=[[1, 99]]",
            ],
        ),
        "teacher layer 99 is out of range 0..3",
    )


def _case_student_layer_out_of_range(tmp_path, ov, run):
    return (
        _train_argv(
            tmp_path / "r",
            [*ov, "objective.method=hld-first", "objective.hidden.mapping=explicit", "objective.hidden.pairs=[[5, 1]]"],
        ),
        "student layer 5 is out of range 0..2",
    )


def _data_case(name: str, content: bytes, problem: str, *extra: str):
    def case(tmp_path, ov, run):
        path = _write(tmp_path / name, content)
        return _train_argv(tmp_path / "r", [*ov, f"data.train={path}", *extra]), problem

    return case


def _case_resume_files_without_config(tmp_path, ov, run):
    # an empty or missing directory is no error under --resume (it starts: a requeued job that died before
    # writing config.yaml must proceed, test_resume_of_an_empty_or_missing_dir_starts); a directory with a
    # run's files but no config.yaml is one
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "metrics.jsonl").write_text("")
    return _train_argv(tmp_path / "r", ov, "--resume"), "holds a run's files but no config.yaml"


def _case_resume_no_checkpoint(tmp_path, ov, run):
    copy = tmp_path / "r"
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "checkpoints")
    return _train_argv(copy, ov, "--resume"), "no checkpoint in"


def _case_resume_changed_config(tmp_path, ov, run):
    return _train_argv(run, [*ov, "train.lr=1e-3"], "--resume"), "config that differs"


def _case_corrupt_checkpoint(tmp_path, ov, run):
    copy = tmp_path / "r"
    shutil.copytree(run, copy)
    ckpt = copy / "checkpoints" / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    return _train_argv(copy, ov, "--resume"), "is corrupt or unreadable"


def _case_existing_run(tmp_path, ov, run):
    return _train_argv(run, ov), "already holds a run"


def _case_resume_without_out(tmp_path, ov, run):
    return ["train", "--config", "smoke", *ov, "--resume"], "--resume needs --out"


ERROR_CASES = {
    "missing-config": _case_missing_config,
    "unknown-key": _case_unknown_key,
    "wrong-type": _case_wrong_type,
    "override-without-value": _case_bad_override,
    "missing-teacher": _case_missing_teacher,
    "teacher-layer-out-of-range": _case_layer_out_of_range,
    "student-layer-out-of-range": _case_student_layer_out_of_range,
    "empty-data-file": _data_case("empty.jsonl", b"", "holds no document with text"),
    "malformed-json": _data_case(
        "bad.jsonl", b'{"text": "fine"}\n{"text": "no end\n', "bad.jsonl:2 is not a JSON object"
    ),
    "not-utf8": _data_case(
        "latin1.jsonl", '{"text": "caf\u00e9 cr\u00e8me"}\n'.encode("latin-1"), "is not valid UTF-8"
    ),
    "not-utf8-txt": _data_case("latin1.txt", "caf\u00e9\n".encode("latin-1"), "is not valid UTF-8"),
    "shorter-than-a-window": _data_case("short.jsonl", b'{"text": "hi"}\n', "fewer than one window of data.seq_len=32"),
    "missing-text-field": _data_case("nofield.jsonl", b'{"content": "some words here"}\n', "has no 'text' field"),
    "resume-files-without-config": _case_resume_files_without_config,
    "resume-no-checkpoint": _case_resume_no_checkpoint,
    "resume-changed-config": _case_resume_changed_config,
    "corrupt-checkpoint": _case_corrupt_checkpoint,
    "existing-run-without-resume": _case_existing_run,
    "resume-without-out": _case_resume_without_out,
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
@pytest.mark.slow
def test_user_errors_exit_2_with_one_line(capsys, tmp_path, overrides, finished_run, case):
    argv, problem = ERROR_CASES[case](tmp_path, overrides, finished_run)
    before = sorted(p.relative_to(finished_run) for p in finished_run.rglob("*"))
    rc, out, err = _cli(capsys, argv)
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("hld: error: ") and problem in lines[0], lines[0]
    assert " — " in lines[0]  # every error says what to do about it
    assert sorted(p.relative_to(finished_run) for p in finished_run.rglob("*")) == before  # never damaged


@pytest.mark.parametrize("method", ["kd", "ce", "hld-first"])
@pytest.mark.slow
def test_tokenizer_larger_than_the_teacher_vocabulary(capsys, tmp_path, overrides, small_vocab_teacher, method):
    rc, out, err = _cli(
        capsys,
        _train_argv(
            tmp_path / "r", [*overrides, f"teacher.model={small_vocab_teacher}", f"objective.method={method}"], "--json"
        ),
    )
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hld: error: the tokenizer has 512 tokens"), err
    assert "256" in lines[0]
    assert json.loads(out.strip().splitlines()[-1])["error"] == lines[0][len("hld: error: ") :]


@pytest.mark.slow
def test_subprocess_error_is_one_line_without_traceback(tmp_path, overrides, hld_cache_dir):
    bad = _write(tmp_path / "bad.jsonl", b'{"text": "fine"}\n{"text": "no end\n')
    env = {**os.environ, "HLD_CACHE_DIR": str(hld_cache_dir), "HF_HUB_OFFLINE": "1"}
    argv = _train_argv(tmp_path / "r", [*overrides, f"data.train={bad}"])
    proc = subprocess.run([sys.executable, "-m", "hld", *argv], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hld: error: "), proc.stderr
    assert "bad.jsonl:2 is not a JSON object" in lines[0]


def test_debug_shows_the_traceback(tmp_path, overrides):
    from hld.errors import HldError

    with pytest.raises(HldError, match="unknown config key"):
        main(_train_argv(tmp_path / "r", [*overrides, "train.lrr=1"], "--debug"))


@pytest.mark.slow
def test_non_finite_loss_stops_cleanly(capsys, tmp_path, overrides, monkeypatch):
    # every loss after the first update is non-finite; those steps are skipped (not applied) and after 5 in
    # a row the run stops with one line and exit code 2
    weights_to_inf_after_each_step(monkeypatch)
    run = tmp_path / "r"
    rc = main(
        [
            "train",
            "--config",
            "smoke",
            "--out",
            str(run),
            *overrides,
            "budget.tokens=1536",
            "train.warmup_share=0",
            "train.checkpoint_every_steps=1",
            "--quiet",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "non-finite for 5 steps in a row" in err[0]
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["skipped"] for x in lines][-5:] == [True] * 5
    assert not (run / "student").exists()  # no export that looks like a finished run
