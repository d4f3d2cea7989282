"""Issue 31, item 4: nothing read blind. Every path hld reads is checked to be a regular file (or a
directory) of bounded size before it is opened: a symbolic link to /dev/zero was read whole (22.5 GB of
RSS in 47 s), a FIFO as data.train blocked forever, a dangling checkpoint.pt link read "no checkpoint yet"
and threw the saved steps away, and four more were tracebacks. Every stand-in lies under the test's
temporary directory; a FIFO gets a writer thread that opens and closes it, so code that opened it by
mistake reads an empty file (and the test fails) instead of hanging."""

from __future__ import annotations

import glob
import os
import shutil
import threading
from pathlib import Path

import pytest

from helpers import C4_TRAIN, one_line_error, train_argv


def fifo(path: Path) -> Path:
    """A FIFO at `path`, with a daemon writer that unblocks any reader (a regression fails, never hangs)."""
    os.mkfifo(path)

    def unblock() -> None:
        with open(path, "wb"):
            pass

    threading.Thread(target=unblock, daemon=True).start()
    return path


def zero(path: Path) -> Path:
    path.symlink_to("/dev/zero")
    return path


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def dangling(path: Path) -> Path:
    path.symlink_to(path.parent / "gone")
    return path


@pytest.fixture
def run(finished_run_copy) -> Path:
    return finished_run_copy


# --------------------------------------------------------------------------- --config


@pytest.mark.parametrize(
    "make, problem",
    [
        (lambda p: _write(p, ""), "is empty"),
        (lambda p: _write(p, "# only a comment\n"), "is empty"),
        (zero, "is a character device"),
        (fifo, "is a FIFO"),
        (dangling, "which does not exist"),
        (lambda p: p.mkdir() or p, "is a directory"),
    ],
    ids=["empty", "comments-only", "dev-zero", "fifo", "dangling", "directory"],
)
def test_a_config_file_that_is_not_a_config_is_refused(tmp_path, capsys, make, problem):
    cfg = make(tmp_path / "cfg.yaml")
    one_line_error(capsys, ["train", "--config", str(cfg), "--out", str(tmp_path / "r")], problem)
    assert not (tmp_path / "r").exists()


def test_a_config_over_its_size_cap_is_refused(tmp_path, capsys, monkeypatch):
    import hld.config

    monkeypatch.setattr(hld.config, "MAX_CONFIG_BYTES", 64)
    cfg = tmp_path / "big.yaml"
    cfg.write_text("train:\n  lr: 0.001\n" + "# padding\n" * 20)
    one_line_error(capsys, ["plan", "--config", str(cfg)], "more than the 64")


# --------------------------------------------------------------------------- data.train


@pytest.mark.parametrize(
    "make, problem",
    [(zero, "is a character device"), (fifo, "is a FIFO"), (dangling, "which does not exist")],
    ids=["dev-zero", "fifo", "dangling"],
)
def test_a_data_file_that_is_not_a_regular_file_is_refused_before_it_is_opened(tmp_path, capsys, make, problem):
    data = make(tmp_path / "train.jsonl")
    one_line_error(capsys, train_argv(tmp_path / "r", f"data.train={data}"), problem)


def test_a_data_line_over_the_maximum_is_refused(tmp_path, capsys, monkeypatch):
    import hld.data.sources

    monkeypatch.setattr(hld.data.sources, "MAX_LINE_BYTES", 1000)
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "short"}\n{"text": "' + "x" * 2000 + '"}\n')
    line = one_line_error(capsys, train_argv(tmp_path / "r", f"data.train={data}"), "is longer than 1,000")
    assert "train.jsonl:2" in line


# --------------------------------------------------------------------------- a run's files on --resume


def _resume(run: Path) -> list[str]:
    return [*train_argv(run), "--resume"]


def test_a_run_config_linked_to_dev_zero_is_refused(run, capsys):
    (run / "config.yaml").unlink()
    zero(run / "config.yaml")
    one_line_error(capsys, _resume(run), "is a character device")


@pytest.mark.parametrize(
    "make, problem",
    [
        (lambda p: p.mkdir() or p, "is a directory"),
        (dangling, "which does not exist"),
        (zero, "is a character device"),  # its .sha256 is kept: never hashed (it was, forever)
        (fifo, "is a FIFO"),
    ],
    ids=["directory", "dangling", "dev-zero", "fifo"],
)
def test_a_checkpoint_that_is_not_a_file_is_refused_and_nothing_is_thrown_away(run, capsys, make, problem):
    ck = run / "checkpoints" / "checkpoint.pt"
    ck.unlink()
    make(ck)
    metrics = (run / "metrics.jsonl").read_bytes()
    one_line_error(capsys, _resume(run), problem)
    assert os.path.lexists(ck) and (run / "metrics.jsonl").read_bytes() == metrics  # not "starting from step 0"


def test_checkpoints_a_regular_file_is_refused(run, capsys):
    shutil.rmtree(run / "checkpoints")
    (run / "checkpoints").write_text("not a directory\n")
    one_line_error(capsys, _resume(run), "checkpoints")


def test_metrics_a_directory_is_refused(run, capsys):
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").mkdir()
    one_line_error(capsys, _resume(run), "is a directory")


def test_a_summary_linked_to_dev_zero_is_refused_by_export(run, tmp_path, capsys):
    (run / "summary.json").unlink()
    zero(run / "summary.json")
    one_line_error(capsys, ["export", str(run), str(tmp_path / "out")], "is a character device")


def test_a_cache_manifest_linked_to_dev_zero_is_refused(tmp_path, capsys):
    cache = tmp_path / "cache"
    cache.mkdir()
    zero(cache / "manifest.json")
    argv = train_argv(tmp_path / "r", "objective.method=kd", f"teacher.cache={cache}")
    one_line_error(capsys, argv, "is a character device")


def test_data_train_is_checked_before_any_read(tmp_path, capsys):
    """A glob matching a regular shard and a FIFO: refused as a whole before the first is tokenised."""
    d = tmp_path / "d"
    d.mkdir()
    for f in glob.glob(C4_TRAIN):
        shutil.copy(f, d / Path(f).name)
    fifo(d / "c4-train.99999-of-99999.json.gz")
    one_line_error(capsys, train_argv(tmp_path / "r", f"data.train={d}/c4-train.*.json.gz"), "is a FIFO")
