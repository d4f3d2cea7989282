"""Issue 31, item 5: memory fail-fast. `hld train` compares `hld plan`'s memory estimate with this machine's
memory before anything is allocated: `data.seq_len=300000` (plan: ~692 GiB) started anyway and died on a
90 GB allocation with a traceback. `train.memory_check=false` goes on, and may be changed on --resume."""

from __future__ import annotations

import pytest

import hld.plan
import hld.train.loop
from helpers import one_line_error, train_argv
from hld.cli import main

HUGE = ("data.seq_len=300000", "data.val_tokens=300000", "budget.tokens=1200000")


def test_a_run_that_cannot_fit_is_refused_before_any_allocation(tmp_path, capsys, monkeypatch):
    def no_build(*a, **k):
        raise AssertionError("build() ran: the run was not refused before allocating")

    monkeypatch.setattr(hld.train.loop, "build", no_build)
    line = one_line_error(capsys, train_argv(tmp_path / "r", *HUGE), "by hld plan's estimate")
    need, have = (float(x.split(" GiB")[0].replace(",", "")) for x in line.split("~")[1].split("has ")[:2])
    assert need > 100 and "GiB of RAM" in line and "train.memory_check=false" in line, line
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_the_override_goes_on_and_may_change_on_resume(tmp_path, capsys, monkeypatch):
    real = hld.plan.machine_memory
    monkeypatch.setattr(hld.plan, "machine_memory", lambda device: (1 << 20, "RAM"))  # a 1 MiB machine
    one_line_error(capsys, train_argv(tmp_path / "r"), "and this machine has 0.0 GiB")
    assert main(train_argv(tmp_path / "r", "train.memory_check=false")) == 0
    monkeypatch.setattr(hld.plan, "machine_memory", real)
    assert main([*train_argv(tmp_path / "r"), "--resume"]) == 0  # the key is not part of the run's identity
