"""The rows of docs/errors.md that tests/e2e/test_cli.py does not cover, through the CLI in-process:
exit code 2, exactly one line `hld: error: <problem> — <fix>` on stderr, no traceback. And a full
disk, simulated while a checkpoint (one file, or DCP), the summary or the metrics log is written: one
line, exit 2, and nothing left behind that looks complete."""

from __future__ import annotations

import errno
import gzip
import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import TINY_TEACHER, tiny_overrides
from helpers import one_line_error as _one_line
from helpers import train_argv as _argv
from hld import atomic
from hld.cli import main

# --------------------------------------------------------------------------- launch and config


def _torchrun_env(monkeypatch, world: str, rank: str = "0") -> None:
    # what torchrun sets for each process; the checks run before any process group is joined
    for k, v in {"WORLD_SIZE": world, "RANK": rank, "LOCAL_RANK": rank}.items():
        monkeypatch.setenv(k, v)


def test_batch_not_divisible_by_world_size(tmp_path, capsys, monkeypatch):
    _torchrun_env(monkeypatch, "3")
    _one_line(
        capsys, _argv(tmp_path / "r", "train.batch_size=4"), "train.batch_size=4 is not a multiple of the world size 3"
    )
    assert not (tmp_path / "r").exists()


def test_commands_other_than_train_refuse_several_processes(tmp_path, capsys, monkeypatch):
    _torchrun_env(monkeypatch, "2")
    _one_line(capsys, ["run", "--out", str(tmp_path / "demo"), "--quiet"], "`hld run` runs on one process")
    assert not (tmp_path / "demo").exists()


def test_micro_batch_not_dividing_the_per_process_batch(tmp_path, capsys, monkeypatch):
    _torchrun_env(monkeypatch, "2")
    _one_line(
        capsys,
        _argv(tmp_path / "r", "train.batch_size=12", "train.micro_batch_size=4"),
        "train.micro_batch_size=4 does not divide the per-process batch 6",
    )


def test_parallel_none_under_torchrun(tmp_path, capsys, monkeypatch):
    _torchrun_env(monkeypatch, "2", rank="0")  # rank 0 prints the line (every rank meets the same error)
    _one_line(capsys, _argv(tmp_path / "r", "train.parallel=none"), "train.parallel=none but torchrun started 2")
    _torchrun_env(monkeypatch, "2", rank="1")  # the other ranks exit 2 silently: one line, not one per rank
    assert main(_argv(tmp_path / "r1", "train.parallel=none")) == 2
    assert capsys.readouterr().err == ""


def test_malformed_launch_environment(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "two")
    _one_line(capsys, _argv(tmp_path / "r"), "environment variable WORLD_SIZE='two' is not an integer")


def test_unknown_parallel_value(tmp_path, capsys):
    _one_line(
        capsys,
        _argv(tmp_path / "r", "train.parallel=zero3"),
        "config train.parallel='zero3' is not one of ['auto', 'none', 'ddp', 'fsdp2']",
    )


def test_contradictory_values(tmp_path, capsys):
    _one_line(
        capsys,
        _argv(tmp_path / "r", "objective.method=hld-first", "objective.hidden.first_share=0"),
        "hld-first needs 0 < objective.hidden.first_share < 1",
    )


def test_truncated_gzip(tmp_path, capsys):
    path = tmp_path / "c4-train.00000-of-00001.json.gz"
    good = gzip.compress(
        ("\n".join(json.dumps({"text": f"document {i} " + "word " * 300}) for i in range(20)) + "\n").encode()
    )
    path.write_bytes(good[: len(good) // 2])
    _one_line(capsys, _argv(tmp_path / "r", f"data.train={path}"), "truncated")


# --------------------------------------------------------------------------- resume


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
@pytest.mark.slow
def test_projector_shape_mismatch_on_resume(tmp_path, capsys, mode):
    """Same config, but the teacher directory now holds a narrower model, whose projectors (64 -> 32) would
    not fit the checkpoint's (64 -> 48): the checkpoint's identity names the other teacher first."""
    from transformers import AutoConfig, Gemma3ForCausalLM

    teacher, run = tmp_path / "teacher", tmp_path / "run"
    shutil.copytree(TINY_TEACHER, teacher)
    argv = _argv(run, f"teacher.model={teacher}", "objective.method=hld-joint", f"train.parallel={mode}")
    assert main(argv) == 0
    cfg = AutoConfig.from_pretrained(teacher)
    cfg.hidden_size, cfg.head_dim, cfg.query_pre_attn_scalar = 32, 16, 16
    torch.manual_seed(0)
    Gemma3ForCausalLM(cfg).save_pretrained(teacher)
    capsys.readouterr()
    line = _one_line(capsys, [*argv, "--resume"], "belongs to another run")
    assert "its teacher weights is 'dir:" in line and "this run's 'dir:" in line


@pytest.mark.slow
def test_resume_with_another_parallel_mode(tmp_path, capsys):
    # the checkpoint format follows train.parallel, which is part of the config --resume compares
    run = tmp_path / "run"
    assert main(_argv(run, "train.parallel=fsdp2")) == 0
    capsys.readouterr()
    _one_line(capsys, [*_argv(run, "train.parallel=ddp"), "--resume"], "--resume with a config that differs")


@pytest.mark.parametrize("damage", ["truncated", "missing"])
@pytest.mark.slow
def test_corrupt_sharded_checkpoint(tmp_path, capsys, damage):
    run = tmp_path / "run"
    argv = _argv(run, "objective.method=hld-joint", "train.parallel=fsdp2")
    assert main(argv) == 0
    shard = next((run / "checkpoints").glob("step-*.dcp")) / "__0_0.distcp"
    if damage == "truncated":
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    else:
        shard.unlink()
    capsys.readouterr()
    _one_line(capsys, [*argv, "--resume"], "step-00000004.dcp is corrupt or unreadable")


# --------------------------------------------------------------------------- teacher cache (CLI)


@pytest.fixture
def cache_dir(tmp_path, capsys) -> Path:
    out = tmp_path / "cache"
    assert main(["cache-teacher", "--config", "smoke", "--out", str(out), *tiny_overrides(), "--quiet"]) == 0
    capsys.readouterr()
    return out


def test_cache_built_for_another_packing(tmp_path, capsys, cache_dir):
    _one_line(
        capsys,
        _argv(tmp_path / "r", f"teacher.cache={cache_dir}", "data.seq_len=16", "budget.tokens=256"),
        "was built with another seq_len",
    )


def test_corrupt_cache_shard(tmp_path, capsys, cache_dir):
    shard = next((cache_dir / "parts").glob("*.topk_values.bin"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    _one_line(capsys, _argv(tmp_path / "r", f"teacher.cache={cache_dir}"), "is corrupt (checksum mismatch)")


# --------------------------------------------------------------------------- full disk


def _no_debris(run: Path) -> None:
    """No temporary file or directory left anywhere in the run directory."""
    left = [p for p in run.rglob(".*") if ".tmp" in p.name or p.name.endswith(".old")]
    assert not left, left
    assert not [p for p in run.iterdir() if p.name.startswith(".student")], list(run.iterdir())


def _full_disk_torch_save(monkeypatch, fail_from_call: int = 1) -> None:
    """torch.save writes part of its output, then the disk is full (from the n-th call on). DCP's
    writer calls torch.save per tensor too."""
    real, calls = torch.save, {"n": 0}

    def save(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] < fail_from_call:
            return real(obj, f, *args, **kwargs)
        if isinstance(f, (str, os.PathLike)):
            Path(f).write_bytes(b"\x80\x02partial")
        else:
            f.write(b"\x80\x02partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", save)


@pytest.mark.slow
def test_full_disk_while_writing_the_checkpoint(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    _full_disk_torch_save(monkeypatch)
    _one_line(capsys, _argv(run), "checkpoint.pt: No space left on device")
    assert not (run / "checkpoints" / "checkpoint.pt").exists()
    assert not (run / "summary.json").exists() and not (run / "student").exists()
    _no_debris(run)


@pytest.mark.slow
def test_full_disk_keeps_the_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    _full_disk_torch_save(monkeypatch, fail_from_call=2)  # the step-2 checkpoint is written, step 4's is not
    line = _one_line(
        capsys,
        _argv(run, "budget.tokens=1024", "train.checkpoint_every_steps=2"),
        "checkpoint.pt: No space left on device",
    )
    assert "free disk space" in line
    monkeypatch.undo()
    assert torch.load(run / "checkpoints" / "checkpoint.pt", weights_only=True)["step"] == 2
    assert not (run / "summary.json").exists()
    _no_debris(run)


@pytest.mark.slow
def test_full_disk_while_writing_a_sharded_checkpoint(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    _full_disk_torch_save(monkeypatch)
    _one_line(capsys, _argv(run, "train.parallel=fsdp2"), "step-00000004.dcp: No space left on device")
    assert not list((run / "checkpoints").glob("*step-*"))  # neither a complete-looking nor a temporary one
    assert not (run / "summary.json").exists() and not (run / "student").exists()
    _no_debris(run)


@pytest.mark.slow
def test_full_disk_while_writing_the_summary(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    real = os.replace

    def replace(src, dst, *args, **kwargs):
        if Path(dst).name == "summary.json":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(atomic.os, "replace", replace)
    _one_line(capsys, _argv(run), "No space left on device")
    assert not (run / "summary.json").exists()
    _no_debris(run)
    monkeypatch.undo()  # space freed: the run resumes at its last step and completes
    assert main([*_argv(run), "--resume"]) == 0
    assert json.loads((run / "summary.json").read_text())["steps"] == 4


@pytest.mark.slow
def test_full_disk_while_logging_metrics(tmp_path, hld_cache_dir):
    """A real limit, not a patch: the process may not grow any file past a few KB more than the
    commented config.yaml (RLIMIT_FSIZE; the kernel answers EFBIG, as a full disk answers ENOSPC).
    metrics.jsonl reaches it first, mid-run."""
    assert main(_argv(tmp_path / "warm")) == 0  # tokenised corpora cached beforehand (bigger than the limit)
    run = tmp_path / "run"
    cap = (tmp_path / "warm" / "config.yaml").stat().st_size + 4096

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (cap, cap))

    env = {**os.environ, "HLD_CACHE_DIR": str(hld_cache_dir), "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "hld", *_argv(run, "budget.tokens=16384")],  # 128 steps: ~33 KB of metric lines
        env=env,
        preexec_fn=limit,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hld: error: could not write into"), proc.stderr[-3000:]
    assert "File too large" in lines[0] and "free disk space" in lines[0]
    logged = (run / "metrics.jsonl").read_text().splitlines()
    assert 5 < len(logged) < 128  # stopped mid-run, at the limit
    assert not (run / "summary.json").exists() and not (run / "student").exists()
    assert not (run / "checkpoints").exists()
