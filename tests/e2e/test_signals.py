"""Issue 31, item 6: SIGTERM and SIGINT at any point give the documented one-line stop and exit code (2 for
SIGTERM, 130 for SIGINT), never wrapped as another error: SIGTERM during a study's teacher reload read
"cannot load model '<a valid path>'", and one late in a study ended with exit 143 and no hld: line. Also: a
config whose section is not a mapping is blamed on the file, not on a command-line override."""

from __future__ import annotations

import os
import signal

import pytest

import hld.cli
import hld.commands
from helpers import C4_VALIDATION, TINY_TEACHER, one_line_error, train_argv
from hld.cli import main
from hld.errors import Stopped, sigterm_as_error


def _sigterm(real):
    def wrapped(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    return wrapped


def test_sigterm_while_the_teacher_loads_is_the_stop_line_not_a_loading_error(tmp_path, capsys, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", _sigterm(AutoModelForCausalLM.from_pretrained))
    before = signal.getsignal(signal.SIGTERM)
    line = one_line_error(capsys, train_argv(tmp_path / "r", "objective.method=kd"), "hld train stopped by SIGTERM")
    assert "cannot load" not in line and str(TINY_TEACHER) not in line, line
    assert signal.getsignal(signal.SIGTERM) is before


def test_sigterm_before_the_command_starts_is_the_stop_line(capsys, monkeypatch):
    """The window that ended with exit 143: the handler now covers main() from its first line."""
    monkeypatch.setattr(hld.cli, "_quiet_libraries", _sigterm(hld.cli._quiet_libraries))
    one_line_error(capsys, ["config"], "hld config stopped by SIGTERM")


def test_sigterm_during_cache_reuse_is_not_taken_for_a_damaged_cache(tmp_path, capsys, monkeypatch):
    """`reusable` rebuilds a cache its check raised an HldError on: a SIGTERM there was one, and the
    build went on. Stopped is no HldError: the command stops."""
    import hld.cache.build as build

    monkeypatch.setattr(build, "is_cache", lambda path: True)
    monkeypatch.setattr(build, "CachedTeacher", _sigterm(build.CachedTeacher))
    with sigterm_as_error("stopped by SIGTERM", "rerun"), pytest.raises(Stopped, match="stopped by SIGTERM"):
        build.reusable(tmp_path / "c", None, None, [])


def test_sigint_is_one_line_and_exit_130(capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(hld.commands, "_eval_perplexity", interrupted)
    rc = main(["eval", "--model", str(TINY_TEACHER), "--data", C4_VALIDATION, "--max-docs", "2", "--quiet"])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 130 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("hld: error: hld eval interrupted (SIGINT) — rerun the same command"), lines[0]


def test_a_section_that_is_not_a_mapping_is_blamed_on_the_file(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("train: [1, 2]\n")
    line = one_line_error(capsys, ["plan", "--run", "--config", str(cfg), "train.lr=0.001"], "the config sets train")
    assert "override" not in line and "in the config file" in line, line
    one_line_error(capsys, ["plan", "--run", "--config", "smoke", "train=5", "train.lr=1"], "override 'train.lr'")


def test_sigterm_in_the_last_step_stops_the_command_instead_of_being_dropped(tmp_path, capsys, monkeypatch):
    """The last step does not preempt (the run was about to finish); its flagged SIGTERM was dropped: the
    run finished, and a study went on to its next cell. It is now sent again once the loop is closed."""
    import hld.train.loop as loop

    real = loop.launch_step

    def sigterm_in_the_last(s, step):
        if step == s.total_steps - 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(s, step)

    monkeypatch.setattr(loop, "launch_step", sigterm_in_the_last)
    one_line_error(capsys, train_argv(tmp_path / "r"), "hld train stopped by SIGTERM")
    assert not (tmp_path / "r" / "summary.json").exists()
    monkeypatch.setattr(loop, "launch_step", real)
    assert main([*train_argv(tmp_path / "r"), "--resume"]) == 0


def test_sigterm_outside_a_step_or_a_cache_build_is_one_line(capsys, monkeypatch):
    """SIGTERM where no finer handler runs (here: `hld eval`'s perplexity) ends the command with one line
    and exit 2, after the cleanups of whatever it was writing (the default action ended it silently);
    the handler is restored afterwards."""
    real = hld.commands._eval_perplexity

    def sigterm_then_eval(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(hld.commands, "_eval_perplexity", sigterm_then_eval)
    before = signal.getsignal(signal.SIGTERM)
    line = one_line_error(
        capsys,
        ["eval", "--model", str(TINY_TEACHER), "--data", C4_VALIDATION, "--max-docs", "2", "--quiet"],
        "hld eval stopped by SIGTERM",
    )
    assert "rerun the same command" in line
    assert signal.getsignal(signal.SIGTERM) is before
