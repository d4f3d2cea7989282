"""A training process killed at any moment (SIGKILL) or preempted (SIGTERM) resumes to the same
final weights, bitwise, as an uninterrupted run with the same config (CPU)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hld.cli import main

STEPS = 40  # 40 steps of 4 x 32 tokens


def _argv(run: Path, overrides: list[str]) -> list[str]:
    return [
        "train",
        "--config",
        "smoke",
        "--out",
        str(run),
        *overrides,
        f"budget.tokens={STEPS * 128}",
        "objective.method=hld-joint",
        "train.checkpoint_every_steps=3",
        "--quiet",
    ]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    ck = torch.load(run / "checkpoints" / "checkpoint.pt", weights_only=True)
    assert ck["step"] == STEPS
    return {**{f"s.{k}": v for k, v in ck["student"].items()}, **{f"p.{k}": v for k, v in ck["projectors"].items()}}


def _start(run: Path, overrides: list[str], hld_cache_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "HLD_CACHE_DIR": str(hld_cache_dir)}
    return subprocess.Popen(
        [sys.executable, "-m", "hld", *_argv(run, overrides)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_steps(run: Path, proc: subprocess.Popen, n: int, timeout_s: float = 120) -> None:
    deadline = time.time() + timeout_s
    metrics = run / "metrics.jsonl"
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        if metrics.exists() and len(metrics.read_text().splitlines()) >= n:
            return
        time.sleep(0.05)
    raise AssertionError("the run did not get going in time")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, overrides) -> dict[str, torch.Tensor]:
    run = tmp_path_factory.mktemp("ref") / "run"
    assert main(_argv(run, overrides)) == 0
    return _weights(run)


def _assert_bitwise(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_sigkill_then_resume_is_bitwise_identical(tmp_path, overrides, reference, hld_cache_dir):
    run = tmp_path / "run"
    proc = _start(run, overrides, hld_cache_dir)
    _wait_for_steps(run, proc, 8)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ck = torch.load(run / "checkpoints" / "checkpoint.pt", weights_only=True)
    assert 0 < ck["step"] < STEPS  # killed mid-run, after at least one checkpoint
    assert main([*_argv(run, overrides), "--resume"]) == 0
    _assert_bitwise(_weights(run), reference)
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))  # lines after the checkpoint were dropped and re-logged


@pytest.mark.slow
def test_sigterm_saves_and_exits_zero_then_resumes(tmp_path, overrides, reference, hld_cache_dir):
    run = tmp_path / "run"
    proc = _start(run, overrides, hld_cache_dir)
    _wait_for_steps(run, proc, 5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "preempted at step" in err and "--resume" in err
    ck = torch.load(run / "checkpoints" / "checkpoint.pt", weights_only=True)
    assert 5 <= ck["step"] < STEPS
    assert not (run / "summary.json").exists()
    assert main([*_argv(run, overrides), "--resume"]) == 0
    _assert_bitwise(_weights(run), reference)
