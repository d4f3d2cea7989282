"""One `hld train` at a time writes a run directory (issue 24: two trains into one --out interleaved their
metrics and mixed one's config with the other's weights, both exit 0): a flock on RUN_DIR/.run.lock,
removed when the run ends and released by the kernel when its holder dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import one_line_error as _one_line
from helpers import train_argv
from hld.cli import main


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
