"""Issue 24: five data-loss paths and the exit-0 nonsense results of a held-out sweep, each reproduced
(every test here failed before its fix), plus the sweep's smaller cases ("Also"). Victim files are
compared byte for byte afterwards."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import ASSETS, TINY_TEACHER, tiny_overrides, train_argv
from helpers import one_line_error as _one_line
from hld.cli import main


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


def _flip_tensor_byte(path: Path) -> None:
    """Invert one byte inside the data of the first tensor of a torch file (its zip structure intact)."""
    import torch

    def tensors(obj):
        if isinstance(obj, torch.Tensor):
            yield obj
        elif isinstance(obj, dict):
            for v in obj.values():
                yield from tensors(v)

    t = next(t for t in tensors(torch.load(path, weights_only=True)) if t.numel() >= 8 and t.is_floating_point())
    data = bytearray(path.read_bytes())
    i = data.find(t.contiguous().numpy().tobytes())
    assert i >= 0
    data[i + 1] ^= 0xFF
    path.write_bytes(bytes(data))


def _flip(path: Path, at: float = 0.5) -> None:
    """Invert one byte at the relative position `at` (inside the tensor data of a torch or safetensors file)."""
    data = bytearray(path.read_bytes())
    i = int(len(data) * at)
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished tiny hld-joint run (it writes hidden_stats.pt and a final checkpoint)."""
    run = tmp_path_factory.mktemp("finished") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HLD_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        assert main(train_argv(run, "objective.method=hld-joint")) == 0
    return run


@pytest.fixture
def run_copy(tmp_path, finished) -> Path:
    shutil.copytree(finished, tmp_path / "run")
    return tmp_path / "run"


# --------------------------------------------------------------------------- data loss


@pytest.mark.slow
def test_train_refuses_a_directory_that_is_not_a_run(tmp_path, capsys, finished):
    """1: the user's config.yaml, summary.json, cka.json and student/ (a copied run's outputs, no metrics
    or checkpoints) were all overwritten with exit 0."""
    victim = tmp_path / "mine"
    victim.mkdir()
    for name in ("config.yaml", "summary.json", "cka.json"):
        shutil.copy(finished / name, victim / name)
    shutil.copytree(finished / "student", victim / "student")
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


@pytest.mark.slow
def test_two_trains_into_one_out_cannot_both_run(tmp_path, capsys):
    """4: no lock, metrics interleaved, config of one and weights of the other, both exit 0. The run
    directory is held by a flock (taken here as another process would); once released, a run goes through
    and leaves no lock file."""
    from hld.locks import sole_holder

    run = tmp_path / "run"
    run.mkdir()
    with sole_holder(run / ".run.lock") as got:
        assert got
        line = _one_line(capsys, train_argv(run), "another hld train is writing")
        assert f"pid {os.getpid()}" in line
    assert not (run / "metrics.jsonl").exists()
    assert main(train_argv(run)) == 0
    assert not (run / ".run.lock").exists() and (run / "summary.json").is_file()


def _python(code: str) -> subprocess.Popen:
    """`code` in another Python process on this tree's sources, its stdout piped (it holds something)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)


@pytest.mark.slow
def test_a_second_train_process_is_refused_while_the_first_runs(tmp_path, capsys):
    """The same, with a real second process holding the lock (a flock is released when its holder dies)."""
    run = tmp_path / "run"
    run.mkdir()
    code = (
        "import sys, time\nfrom hld.locks import sole_holder\n"
        f"with sole_holder(__import__('pathlib').Path({str(run / '.run.lock')!r})) as g:\n"
        "    print(g, flush=True)\n    time.sleep(60)\n"
    )
    proc = _python(code)
    try:
        assert proc.stdout.readline().strip() == "True"
        _one_line(capsys, train_argv(run), "another hld train is writing")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert main(train_argv(run)) == 0  # the killed holder's lock is gone with it


def test_export_force_refuses_an_out_holding_the_current_directory(tmp_path, capsys, monkeypatch, finished):
    """5: `hld export RUN OUT --force` with OUT a parent of the cwd deleted the cwd and a sibling file."""
    parent = tmp_path / "parent"
    (parent / "here").mkdir(parents=True)
    (parent / "sibling.txt").write_text("keep\n")
    (parent / "here" / "work.txt").write_text("keep too\n")
    before = _snapshot(parent)
    monkeypatch.chdir(parent / "here")
    _one_line(capsys, ["export", str(finished), str(parent), "--force"], "contains the current directory")
    _one_line(capsys, ["export", str(finished), ".", "--force"], "is the current directory")
    assert _snapshot(parent) == before


# --------------------------------------------------------------------------- silent wrong results


@pytest.fixture
def teacher_without_tokenizer(tmp_path) -> Path:
    d = tmp_path / "teacher"
    d.mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy(TINY_TEACHER / name, d / name)
    return d


def test_a_tokenizer_far_smaller_than_the_vocabulary_is_refused(tmp_path, capsys, teacher_without_tokenizer):
    """6: without tokenizer files transformers builds a 5-token tokenizer (the corpus becomes UNK/EOS)."""
    from transformers import AutoTokenizer

    assert len(AutoTokenizer.from_pretrained(teacher_without_tokenizer)) == 5  # what the sweep met
    t = str(teacher_without_tokenizer)
    line = _one_line(capsys, train_argv(tmp_path / "r", f"teacher.model={t}"), "has 5 tokens")
    assert "vocabulary 512" in line
    argv = ["eval", "--model", t, "--data", str(ASSETS / "c4" / "c4-validation.*.json.gz"), "--seq-len", "32"]
    _one_line(capsys, [*argv, "--max-docs", "4"], "has 5 tokens")


def test_damaged_student_weights_are_refused_wherever_a_run_is_loaded(tmp_path, capsys, run_copy):
    """7: `hld eval --model RUN` and `teacher.model=RUN` accepted them (only export checked the sha256)."""
    _flip(run_copy / "student" / "model.safetensors", 0.7)
    data = ["--data", str(ASSETS / "c4" / "c4-validation.*.json.gz"), "--seq-len", "32", "--max-docs", "4"]
    _one_line(capsys, ["eval", "--model", str(run_copy), *data], "sha256 mismatch")
    argv = train_argv(tmp_path / "r", f"teacher.model={run_copy}", "objective.method=kd")
    _one_line(capsys, argv, "sha256 mismatch")


def test_an_intact_run_still_loads_as_a_model(capsys, finished):
    data = ["--data", str(ASSETS / "c4" / "c4-validation.*.json.gz"), "--seq-len", "32", "--max-docs", "4"]
    assert main(["eval", "--model", str(finished), *data, "--quiet"]) == 0


@pytest.mark.parametrize("name", ["checkpoints/checkpoint.pt", "hidden_stats.pt"])
@pytest.mark.slow
def test_a_bit_flipped_checkpoint_or_statistics_file_is_refused_on_resume(capsys, run_copy, name):
    """8: a flipped byte in checkpoint.pt or hidden_stats.pt trained on (val loss 9.19 / 12.03 vs 8.97)."""
    import torch

    path = run_copy / name
    assert (run_copy / f"{name}.sha256").is_file()  # recorded when written
    _flip_tensor_byte(path)
    torch.load(path, weights_only=True)  # still loads: only the checksum tells
    _one_line(capsys, [*train_argv(run_copy, "objective.method=hld-joint"), "--resume"], "sha256 differs")


@pytest.mark.slow
def test_resume_after_the_data_changed_is_refused(tmp_path, capsys):
    """11: `--resume` after the data file changed continued on other text."""
    data = tmp_path / "data"
    data.mkdir()
    for f in (ASSETS / "c4").glob("c4-train.*.json.gz"):
        shutil.copy(f, data / f.name)
    spec = f"data.train={data}/c4-train.*.json.gz"
    run = tmp_path / "run"
    assert main(train_argv(run, spec)) == 0
    first = sorted(data.glob("*.json.gz"))[0]
    shutil.copy(ASSETS / "c4" / "c4-validation.00000-of-00001.json.gz", first)  # same name, other text
    _one_line(capsys, [*train_argv(run, spec), "--resume"], "the training data differs")


def _cell(study: Path, finished: Path, arm: str, val_loss: float) -> None:
    run = study / "runs" / f"tiny__s0__{arm}"
    shutil.copytree(finished, run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["objective"]["method"] = arm
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    summary = json.loads((run / "summary.json").read_text())
    summary.update({"arm": arm, "val/loss": val_loss, "val/ppl": math.exp(val_loss)})
    (run / "summary.json").write_text(json.dumps(summary))


@pytest.mark.slow
def test_report_names_the_cell_whose_validation_loss_is_nan(tmp_path, capsys, finished):
    """12: a NaN val/loss in one cell made its row vanish ("no pair … ran") without a word."""
    study = tmp_path / "study"
    _cell(study, finished, "ce", 6.0)
    _cell(study, finished, "kd", float("nan"))
    assert main(["report", str(study)]) == 0
    out = capsys.readouterr().out
    assert "cell `tiny__s0__kd` (kd) is left out of every comparison" in out and "nan" in out
    assert "cell `tiny__s0__kd` (kd) is left out" in (study / "report.md").read_text()


# --------------------------------------------------------------------------- also


@pytest.mark.slow
def test_compiled_ce_run_writes_its_layer_diagnostics(tmp_path, capsys, monkeypatch):
    """`train.compile=true` crashed after training in eval/cka.py (KeyError 0): a CE run's graph was
    compiled without forward hooks, so the diagnostics' hooks never fired. The eager `backend` keeps the
    test fast; dynamo's handling of hooks (what failed) is the same under inductor."""
    import functools

    import torch

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    run = tmp_path / "run"
    assert main(train_argv(run, "train.compile=true", "objective.method=ce")) == 0
    cka = json.loads((run / "cka.json").read_text())
    assert len(cka["cka"]) == 3 and all(0 <= v <= 1 + 1e-9 for row in cka["cka"] for v in row)


def test_a_key_written_twice_in_a_config_is_refused(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: x\ntrain:\n  lr: 1.0e-3\n  batch_size: 4\n  lr: 3.0e-4\n")
    _one_line(capsys, ["plan", "--run", "--config", str(cfg)], "sets 'lr' twice in one section (lines 3 and 5)")
    study = tmp_path / "s.yaml"
    study.write_text("name: s\narms: [ce]\nseeds: [0]\narms: [kd]\n")
    _one_line(capsys, ["study", "--config", str(study), "--list"], "sets 'arms' twice")


@pytest.mark.parametrize("flag", ["--cell", "--cache"])
def test_an_empty_cell_or_cache_id_is_refused(tmp_path, capsys, flag):
    """`hld study --cell ""` ran the whole study."""
    _one_line(capsys, ["study", "--config", "demo", "--out", str(tmp_path / "s"), flag, ""], f"{flag} is empty")
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("n", ["-3", "0"])
def test_inspect_teacher_refuses_a_windows_count_under_1(capsys, n):
    _one_line(capsys, ["inspect-teacher", "--config", "smoke", "--windows", n], f"--windows {n} is not a positive")


def test_pairs_under_a_mapping_that_ignores_them_are_refused(capsys):
    """`objective.hidden.pairs` was silently ignored under `mapping: uniform` (docs/decisions.md)."""
    argv = ["plan", "--run", "--config", "smoke", "objective.method=hld-joint", "objective.hidden.pairs=[[1, 1]]"]
    _one_line(capsys, argv, "objective.hidden.mapping=uniform ignores it")
    assert main([*argv[:-1], "objective.hidden.mapping=explicit", argv[-1], *tiny_overrides()]) == 0


@pytest.mark.slow
def test_files_of_a_run_honour_the_umask(tmp_path, monkeypatch):
    """Files written through the atomic writer were 0600 (directories 0700) whatever the umask."""
    old = os.umask(0o022)
    try:
        run = tmp_path / "run"
        assert main(train_argv(run)) == 0
    finally:
        os.umask(old)
    for p in [run, *run.rglob("*")]:
        mode = p.stat().st_mode & 0o777
        assert mode == (0o755 if p.is_dir() else 0o644), (p, oct(mode))


def test_a_killed_exports_temporary_directory_is_cleared_by_the_next(tmp_path, capsys, finished):
    """SIGKILL left export/GGUF temporary directories (549 MB) that nothing ever removed."""
    out = tmp_path / "export"
    code = (
        "import time\nfrom pathlib import Path\nfrom hld.atomic import new_dir\n"
        f"with new_dir(Path({str(out)!r})) as tmp:\n"
        "    (tmp / 'model.safetensors').write_bytes(bytes(1 << 20))\n    print(tmp, flush=True)\n    time.sleep(60)\n"
    )
    proc = _python(code)
    left = Path(proc.stdout.readline().strip())
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert left.is_dir() and left.name.startswith(".export.tmp-")
    other = tmp_path / f".export.tmp-{socket.gethostname()}-{os.getpid()}-live"  # a live process's: kept
    other.mkdir()
    assert main(["export", str(finished), str(out), "--quiet"]) == 0
    assert not left.exists() and other.is_dir() and (out / "model.safetensors").is_file()


@pytest.mark.slow
def test_a_run_with_no_applied_step_fails(tmp_path, capsys, monkeypatch):
    # issue 24 item 10: every step non-finite (NaN weights before the first step) in a run shorter than the
    # 5-in-a-row stop used to finish and report success; it is one line, exit 2, and nothing is exported
    import torch

    from helpers import one_line_error, train_argv
    from hld.train import loop

    real = loop.train_step

    def nan_weights_first(s, step):
        with torch.no_grad():
            for p in s.student.parameters():
                p.fill_(float("nan"))
        return real(s, step)

    monkeypatch.setattr(loop, "train_step", nan_weights_first)
    run = tmp_path / "run"
    one_line_error(capsys, train_argv(run), "no step of the run was applied")
    assert not (run / "summary.json").exists() and not (run / "student").exists()
