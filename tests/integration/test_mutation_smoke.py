"""Mutation smoke (docs/testing.md, "Mutation testing"): mutmut mutates the learning-rate schedule
(hld.train.schedule) and every mutant must make tests/unit/test_lr_schedule.py fail. ~20-45 s on a
2-core CPU. The other target modules take minutes each: `python scripts/mutation.py`, not CI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_every_lr_schedule_mutant_is_killed(tmp_path):
    pytest.importorskip("mutmut", reason="the `test` extra installs mutmut")
    cmd = [sys.executable, str(ROOT / "scripts" / "mutation.py"), "schedule", "--expect", "all", "--workdir"]
    out = subprocess.run(cmd + [str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "schedule: " in out.stdout and " killed " in out.stdout, out.stdout[-4000:]
