"""What a run writes, in the cases that once went wrong (issue 24): a compiled run still writes its layer
diagnostics; its files honour the umask; a run in which no step was applied fails and exports nothing."""

from __future__ import annotations

import json
import os

import pytest

from helpers import train_argv
from hld.cli import main


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


@pytest.mark.slow
def test_a_run_with_no_applied_step_fails(tmp_path, capsys, monkeypatch):
    # issue 24 item 10: every step non-finite (NaN weights before the first step) in a run shorter than the
    # 5-in-a-row stop used to finish and report success; it is one line, exit 2, and nothing is exported
    import torch

    from helpers import one_line_error, train_argv
    from hld.train import loop

    real = loop.launch_step

    def nan_weights_first(s, step):
        with torch.no_grad():
            for p in s.student.parameters():
                p.fill_(float("nan"))
        return real(s, step)

    monkeypatch.setattr(loop, "launch_step", nan_weights_first)
    run = tmp_path / "run"
    one_line_error(capsys, train_argv(run), "no step of the run was applied")
    assert not (run / "summary.json").exists() and not (run / "student").exists()
