"""Issue 15, data loss: commands that write a directory never destroy what it held unless it is
theirs to replace, and a failed or stopped rewrite keeps the old one. Every victim file is compared
byte for byte afterwards. Read-only locations are tested as root, whom chmod does not stop: a path
under /sys (sysfs refuses new files: EPERM) and a path whose parent is a file (ENOTDIR)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from helpers import one_line_error as _one_line
from helpers import tiny_overrides
from hld.cache.reader import FORMAT_VERSION
from hld.cli import main


def _cache_argv(out, *extra: str) -> list[str]:
    return ["cache-teacher", "--config", "smoke", "--out", str(out), *tiny_overrides(), "--quiet", *extra]


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _victim(d: Path) -> dict:
    d.mkdir(parents=True, exist_ok=True)
    (d / "f").write_bytes(b"x\n")
    (d / "sub").mkdir(exist_ok=True)
    (d / "sub" / "thesis.tex").write_bytes(b"\\documentclass{article}\n")
    return _snapshot(d)


# --------------------------------------------------------------------------- hld cache-teacher


def test_cache_teacher_refuses_a_directory_that_is_not_a_cache(tmp_path, capsys):
    before = _victim(tmp_path / "v")
    _one_line(capsys, _cache_argv(tmp_path / "v"), "is not an hld teacher cache")
    assert _snapshot(tmp_path / "v") == before


def test_cache_teacher_refuses_the_current_directory(tmp_path, capsys, monkeypatch):
    before = _victim(tmp_path / "home")
    monkeypatch.chdir(tmp_path / "home")
    _one_line(capsys, _cache_argv("."), "is the current directory")
    assert _snapshot(tmp_path / "home") == before


def test_cache_teacher_refuses_an_existing_file(tmp_path, capsys):
    f = tmp_path / "notes.txt"
    f.write_bytes(b"keep me\n")
    _one_line(capsys, _cache_argv(f), "is an existing file")
    assert f.read_bytes() == b"keep me\n"


@pytest.mark.parametrize("where", ["sys", "file-parent"])
def test_cache_teacher_into_a_read_only_location(tmp_path, capsys, where):
    (tmp_path / "plain").write_text("x")
    out = "/sys/hld-test-cache" if where == "sys" else str(tmp_path / "plain" / "cache")
    line = _one_line(capsys, _cache_argv(out), "cannot")
    assert "pick a writable --out" in line and "free disk space" not in line
    assert (tmp_path / "plain").read_text() == "x"


@pytest.fixture
def built_cache(tmp_path, capsys) -> Path:
    out = tmp_path / "cache"
    assert main(_cache_argv(out)) == 0
    capsys.readouterr()
    return out


def test_a_stopped_rebuild_keeps_the_old_cache(tmp_path, capsys, monkeypatch, built_cache):
    """SIGTERM in the middle of a rebuild (a larger budget needs more windows): one line, the old
    cache byte for byte, no temporary directory left; the new build's directory waits to be resumed
    (with no uncommitted shard: SIGTERM came in the first), and the rerun finishes it."""
    from hld.cache import writer as cache_writer

    before = _snapshot(built_cache)
    real = cache_writer._signal_rows

    def topk_then_sigterm(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(cache_writer, "_signal_rows", topk_then_sigterm)
    _one_line(capsys, _cache_argv(built_cache, "budget.tokens=2048"), "stopped by SIGTERM")
    assert _snapshot(built_cache) == before
    assert sorted(p.name for p in tmp_path.glob(".cache.*")) == [".cache.build", ".cache.lock"]
    assert not list((tmp_path / ".cache.build" / "parts").glob("*.records.jsonl"))  # no shard committed
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or callable(signal.getsignal(signal.SIGTERM))
    monkeypatch.setattr(cache_writer, "_signal_rows", real)
    assert main(_cache_argv(built_cache, "budget.tokens=2048")) == 0
    assert sorted(p.name for p in tmp_path.glob(".cache.*")) == [".cache.lock"]  # the lock file stays


def test_a_failed_rebuild_keeps_the_old_cache(tmp_path, capsys, monkeypatch, built_cache):
    from hld.cache import writer as cache_writer

    before = _snapshot(built_cache)

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache_writer, "_signal_rows", fail)
    line = _one_line(capsys, _cache_argv(built_cache, "budget.tokens=2048"), "No space left on device")
    assert "free disk space" in line
    assert _snapshot(built_cache) == before
    assert not list(tmp_path.glob(".cache.tmp-*"))


def test_a_rebuild_replaces_a_cache_and_clears_a_killed_builds_debris(tmp_path, capsys, built_cache):
    debris = tmp_path / ".cache.tmp-killed"  # what a SIGKILLed build leaves
    debris.mkdir()
    (debris / "shard-00000.tokens.npy").write_bytes(b"partial")
    assert main(_cache_argv(built_cache, "budget.tokens=1024", "--json")) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["tokens"] >= 1024
    assert json.loads((built_cache / "manifest.json").read_text())["format_version"] == FORMAT_VERSION
    assert [p.name for p in tmp_path.glob(".cache.*")] == [".cache.lock"], list(tmp_path.iterdir())


# --------------------------------------------------------------------------- hld export


def test_training_records_the_students_sha256(finished_run):
    from hld.fingerprint import file_sha256

    recorded = json.loads((finished_run / "summary.json").read_text())["student_sha256"]
    # every file of the student: its weights, and its config and tokenizer (a damaged tokenizer file
    # changes what a loaded run computes as surely as its weights)
    files = sorted(p for p in (finished_run / "student").iterdir() if p.is_file())
    assert "model.safetensors" in recorded and "tokenizer.json" in recorded
    assert recorded == {p.name: file_sha256(p) for p in files}


@pytest.mark.parametrize("where", ["same", "inside", "containing"])
def test_export_refuses_an_out_dir_overlapping_the_run(tmp_path, capsys, finished_run_copy, where):
    run = finished_run_copy  # a copy: were the refusal broken, --force would replace it
    before = _snapshot(run.parent)
    out = {"same": run, "inside": run / "export", "containing": run.parent}[where]
    _one_line(capsys, ["export", str(run), str(out), "--force"], "the run directory")
    assert _snapshot(run.parent) == before


def test_export_onto_a_mount_point(capsys, finished_run):
    before = _snapshot(finished_run)
    _one_line(capsys, ["export", str(finished_run), "/proc", "--force"], "is a mount point")
    assert _snapshot(finished_run) == before
    assert not [p for p in Path("/").iterdir() if p.name.startswith(".proc.")]


@pytest.mark.parametrize("where", ["sys", "file-parent"])
def test_export_into_a_read_only_location(tmp_path, capsys, finished_run, where):
    (tmp_path / "plain").write_text("x")
    out = "/sys/hld-test-export" if where == "sys" else str(tmp_path / "plain" / "export")
    line = _one_line(capsys, ["export", str(finished_run), out], "cannot write")
    assert "pick a writable OUT_DIR" in line


@pytest.mark.parametrize("damage", ["truncated", "flipped", "wrong-shape"])
def test_export_verifies_the_weights(tmp_path, capsys, finished_run_copy, damage):
    import torch
    from safetensors.torch import load_file, save_file

    run = finished_run_copy
    weights = run / "student" / "model.safetensors"
    data = weights.read_bytes()
    if damage == "truncated":
        weights.write_bytes(data[: len(data) // 2])
        problem = "is truncated or not safetensors"
    elif damage == "flipped":
        weights.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
        problem = "sha256 mismatch"
    else:
        tensors = load_file(weights)
        tensors["model.norm.weight"] = torch.ones(3)
        save_file(tensors, weights, metadata={"format": "pt"})
        problem = "do not fit its config.json (model.norm.weight"
    out = tmp_path / "export"
    _one_line(capsys, ["export", str(run), str(out)], problem)
    assert not out.exists() and not list(tmp_path.glob(".export*"))


@pytest.mark.parametrize("content", ['{"name": "r", "ste', "[1, 2]"])
def test_export_and_report_over_a_damaged_summary(tmp_path, capsys, finished_run_copy, content):
    run = finished_run_copy
    (run / "summary.json").write_text(content)
    _one_line(capsys, ["export", str(run), str(tmp_path / "export")], "run summary")
    study = tmp_path / "study"
    (study / "runs").mkdir(parents=True)
    os.rename(run, study / "runs" / "cell")
    _one_line(capsys, ["report", str(study)], "run summary")
