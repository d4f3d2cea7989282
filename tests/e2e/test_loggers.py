"""Metric sinks besides metrics.jsonl: TensorBoard event files and an offline W&B run hold exactly
the values metrics.jsonl holds (read back with TensorBoard's reader and by decoding W&B's run file);
an enabled sink whose package is missing is one line naming the extra to install."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from hld.cli import main


def _train(run: Path, overrides: list[str], *extra: str) -> None:
    assert (
        main(["train", "--config", "smoke", "--out", str(run), *overrides, "objective.method=ce", "--quiet", *extra])
        == 0
    )


def _metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _numeric(line: dict) -> dict:
    return {k: v for k, v in line.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


@pytest.mark.slow
def test_tensorboard_events_equal_metrics_jsonl(tmp_path, overrides):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    _train(run, overrides, "log.tensorboard=true")
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    lines = _metrics(run)
    assert set(acc.Tags()["scalars"]) == set().union(*(_numeric(x) for x in lines))
    for key in ("train/loss", "train/ce", "lr", "grad_norm", "tokens"):
        events = acc.Scalars(key)
        assert [e.step for e in events] == [x["step"] for x in lines]
        assert [e.value for e in events] == pytest.approx([x[key] for x in lines], rel=1e-6)  # stored as float32
    last = acc.Scalars("val/ppl")[-1]
    assert (last.step, last.value) == (lines[-1]["step"], pytest.approx(lines[-1]["val/ppl"], rel=1e-6))


def _wandb_records(path: Path):
    """The protobuf records of a W&B run file: a 7-byte header (":W&B", magic, version), then
    LevelDB-log framed records (crc32c, 2-byte length, type FULL/FIRST/MIDDLE/LAST) in 32 KiB blocks."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        n, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7 : pos + 7 + n], pos + 7 + n
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf + chunk if kind == 4 else chunk)
            yield record
        buf = chunk if kind == 2 else buf + chunk if kind == 3 else b""


@pytest.mark.slow
def test_wandb_offline_run_holds_the_logged_values(tmp_path, overrides, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    try:
        _train(run, overrides, "log.wandb=true", "log.wandb_project=hld-test")
    finally:
        wandb.teardown()
    (offline,) = (run / "wandb").glob("offline-run-*")
    run_id = (run / "wandb-run-id").read_text().strip()
    (run_file,) = offline.glob(f"run-{run_id}.wandb")
    history, run_record = [], None
    for r in _wandb_records(run_file):
        kind = r.WhichOneof("record_type")
        if kind == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
        elif kind == "run":
            run_record = r.run
    lines = _metrics(run)
    assert [h["_step"] for h in history] == [x["step"] for x in lines]
    for h, x in zip(history, lines):
        assert {k: h[k] for k in _numeric(x)} == pytest.approx(_numeric(x), rel=1e-12)
    assert run_record.project == "hld-test" and run_record.display_name == "smoke"
    config = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in run_record.config.update}
    assert config["objective"]["method"] == "ce" and config["log"]["wandb_project"] == "hld-test"


@pytest.mark.parametrize(
    "sink, module, extra",
    [("tensorboard", "torch.utils.tensorboard", "hld[tensorboard]"), ("wandb", "wandb", "hld[wandb]")],
)
def test_a_missing_sink_package_is_one_line(tmp_path, overrides, monkeypatch, capsys, sink, module, extra):
    monkeypatch.setitem(sys.modules, module, None)  # `import` of it now raises ImportError
    rc = main(["train", "--config", "smoke", "--out", str(tmp_path / "run"), *overrides, f"log.{sink}=true"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, lines
    assert f"log.{sink}=true needs" in lines[0] and f"pip install '{extra}'" in lines[0]
