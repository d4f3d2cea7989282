"""The shipped `kd-signals` study end to end on the tiny fixtures, on the signals that exist without
the sampled cache (`signals=[topk,online]`, 2 seeds, 2 steps a cell): the online cells build and read
no cache (the teacher runs in their loop) and are charged the teacher's forward exactly as the cached
cells are; the report's cross-signal line kd[topk] vs kd[online] matches a direct computation from its
own results.csv (numpy float64, scipy's paired t-test)."""

from __future__ import annotations

import contextlib
import csv
import io
import json

import numpy as np
import pytest
import yaml

from helpers import tiny_overrides
from hld.cli import main

RUN_OVERRIDES = [o for o in tiny_overrides() if not o.startswith(("student.preset=", "budget."))]
ARGS = ["study", "--config", "kd-signals", "signals=[topk,online]", "seeds=[0,1]", "budgets=[{tokens: 256}]"]


@pytest.mark.slow
def test_a_signals_study_runs_online_cells_without_a_cache_and_pairs_them(tmp_path, monkeypatch):
    from scipy import stats

    monkeypatch.setenv("HLD_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "study"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main([*ARGS, *RUN_OVERRIDES, "data.val_tokens=256", "--out", str(out), "--quiet"])
    assert rc == 0
    groups = [p for p in (out / "caches").iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert len(groups) == 2  # one per seed, for the topk cells only
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert sorted((r["arm"], r["signal"]) for r in rows) == sorted(
        [("ce", "")] * 2 + [("kd", "topk"), ("kd", "online")] * 2
    )
    for r in rows:
        cfg = yaml.safe_load((out / "runs" / r["cell"] / "config.yaml").read_text())
        assert (cfg["teacher"]["cache"] is None) == (r["signal"] != "topk")
    flops = {(r["arm"], r["signal"]): float(r["flops"]) for r in rows}
    assert flops[("kd", "online")] == flops[("kd", "topk")] > flops[("ce", "")]  # the teacher counted alike
    loss = {(r["signal"], int(r["seed"])): float(r["val_loss"]) for r in rows if r["arm"] == "kd"}
    x = np.array([loss[("topk", s)] for s in (0, 1)], dtype=np.float64)
    y = np.array([loss[("online", s)] for s in (0, 1)], dtype=np.float64)
    (line,) = [r for r in csv.DictReader(open(out / "paired.csv")) if r["comparison"] == "kd[topk] vs kd[online]"]
    assert abs(float(line["mean_diff"]) - (x - y).mean()) < 1e-12
    if np.std(x - y) > 0:
        assert abs(float(line["p"]) - stats.ttest_rel(x, y).pvalue) < 1e-6
    assert "**kd[topk] vs kd[online], equal student tokens**" in (out / "report.md").read_text()
    meta = json.loads((out / "study.json").read_text())
    assert meta["study"]["signals"] == ["topk", "online"] and len(meta["caches"]) == 2
