"""`hld run` end to end on the tiny fixtures: the shipped demo study (two students, four arms, a
two-point learning-rate grid, the shipped downstream tasks on their first items) at equal FLOPs with
the teacher counted. Its arms' FLOPs agree within 1%; the CE arm reads more tokens than KD by exactly
the teacher's share (measured here with FlopCounterMode); report.md, results.csv and the plots are
written; the verdicts, for validation loss and for each task, match the CSV; a rerun scores nothing
twice."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import re

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from helpers import T975, TINY_TEACHER, VERDICT, tiny_overrides
from hld.cli import main

BUDGET = 4.0e8
TASK_LIMIT = 6
RUN_OVERRIDES = [o for o in tiny_overrides() if not o.startswith(("student.preset=", "budget."))] + \
                ["data.val_tokens=256"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("demo") / "run"
    buf = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(buf):
        mp.setenv("HLD_CACHE_DIR", str(tmp_path_factory.mktemp("demo-cache")))
        argv = ["run", "--out", str(out), f"budgets=[{{flops: {BUDGET}}}]", f"task_limit={TASK_LIMIT}",
                *RUN_OVERRIDES, "--json"]
        rc = main(argv)
        assert rc == 0
        mtimes = {p.parent.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*/downstream.json")}
        rc = main(argv)  # everything is done: nothing is trained or scored again
    assert rc == 0
    rows = list(csv.DictReader(open(out / "results.csv")))
    results = [json.loads(line) for line in buf.getvalue().strip().splitlines() if line.startswith("{")]
    return {"out": out, "rows": rows, "result": results[-1], "first": results[0], "mtimes": mtimes}


def test_run_writes_the_report_csv_and_plots(demo):
    out = demo["out"]
    assert len(demo["rows"]) == 16  # 2 students x 2 learning rates x 4 arms
    assert {r["arm"] for r in demo["rows"]} == {"ce", "kd", "hld-joint", "hld-first"}
    assert {r["student"] for r in demo["rows"]} == {"tiny-1l", "tiny-2l"}
    for name in ("loss_vs_flops", "training_curves", "paired_differences"):
        assert (out / "plots" / f"{name}.png").stat().st_size > 10_000
    report = (out / "report.md").read_text()
    assert "## Best grid point per arm" in report and "at equal compute" in report
    ref = json.loads((out / "study.json").read_text())["teacher_reference"]
    assert len(ref) == 1 and math.isfinite(ref[0]["val_loss"])
    assert f"validation loss {ref[0]['val_loss']:.4f} nats" in report  # the teacher's reference line


def test_every_cell_and_the_teacher_are_scored_on_the_shipped_tasks_once(demo):
    out, rows = demo["out"], demo["rows"]
    assert len(demo["first"]["trained"]) == 16 and demo["result"]["trained"] == []
    assert len(demo["mtimes"]) == 16
    for r in rows:
        scores = json.loads((out / "runs" / r["cell"] / "downstream.json").read_text())
        assert (out / "runs" / r["cell"] / "downstream.json").stat().st_mtime_ns == demo["mtimes"][r["cell"]]
        assert set(scores) == {"hld_lambada", "hld_mc"}
        for task, s in scores.items():
            assert s["n"] == TASK_LIMIT and s["limit"] == TASK_LIMIT
            assert float(r[f"{task}:{s['metric']}"]) == s["value"]
            assert 0 <= s["value"] <= 1 and s["value"] * TASK_LIMIT == pytest.approx(round(s["value"] * TASK_LIMIT))
    assert json.loads((out / "runs" / rows[0]["cell"] / "downstream.json").read_text())["hld_mc"]["chance"] == 0.25
    ref = json.loads((out / "study.json").read_text())["teacher_reference"][0]
    assert set(ref["tasks"]) == {"hld_lambada", "hld_mc"}
    report = (out / "report.md").read_text()
    assert "**Downstream tasks**" in report and "hld_mc:acc" in report


def test_arms_get_equal_flops_within_one_percent(demo):
    for r in demo["rows"]:
        assert 0.99 * BUDGET < float(r["flops"]) <= BUDGET, r["cell"]


def _teacher_forward_per_token(T: int = 32) -> float:
    """FlopCounterMode on the tiny teacher: its matmuls exactly; its attention bmm's are dense
    (T x T), the causal half of which is what a token costs (tests/unit/test_flops.py)."""
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(TINY_TEACHER, dtype=torch.float32, attn_implementation="eager").eval()
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        lm(input_ids=torch.randint(3, 512, (1, T)))
    counts = {str(k): float(v) for k, v in fc.get_flop_counts()["Global"].items()}
    return (counts["aten.mm"] + counts.get("aten.bmm", 0.0) * (T + 1) / (2 * T)) / T


def test_ce_reads_more_tokens_than_kd_by_the_teachers_share(demo):
    teacher = _teacher_forward_per_token()
    by = {(r["configuration"], r["arm"]): r for r in demo["rows"]}
    for conf in {r["configuration"] for r in demo["rows"]}:
        ce, kd = by[(conf, "ce")], by[(conf, "kd")]
        per_ce = float(ce["flops"]) / int(ce["tokens"])
        per_kd = float(kd["flops"]) / int(kd["tokens"])
        assert per_kd - per_ce == pytest.approx(teacher, rel=1e-6)  # KD's token costs the teacher's forward more
        # ... so at equal FLOPs CE reads (student + teacher) / student times KD's tokens, to within the
        # 4 tokens (one per window of the last step) each arm may fall short of the budget
        expected = int(kd["tokens"]) * per_kd / per_ce
        assert abs(int(ce["tokens"]) - expected) <= 4 * (1 + per_kd / per_ce)
        assert int(ce["tokens"]) > int(kd["tokens"])


TASK_VERDICT = re.compile(
    r"^- \*\*(?P<arm>[\w-]+) vs (?P<base>[\w-]+) on (?P<task>\w+)\*\*: \S+ beat \S+ in (?P<wins>\d+) of (?P<n>\d+) "
    r"configurations; mean Δ (?P<metric>\w+) (?P<mean>[+-]\d+\.\d+) \(95% CI \[(?P<lo>[+-]\d+\.\d+), "
    r"(?P<hi>[+-]\d+\.\d+)\] over \d+ configurations\)")


def test_task_verdicts_match_results_csv(demo):
    out, rows = demo["out"], demo["rows"]
    said = [m.groupdict() for m in map(TASK_VERDICT.match, (out / "report.md").read_text().splitlines()) if m]
    assert len(said) == 3 * 2  # (hld-joint, hld-first vs kd; kd vs ce) x 2 tasks
    for s in said:
        col = f"{s['task']}:{s['metric']}"
        value = {(r["configuration"], r["arm"]): float(r[col]) for r in rows}
        d = np.array([value[(c, s["arm"])] - value[(c, s["base"])] for c, a in value if a == s["arm"]])
        half = T975[len(d) - 1] * d.std(ddof=1) / math.sqrt(len(d))
        assert (int(s["wins"]), int(s["n"])) == (int((d > 0).sum()), 4)  # higher accuracy wins
        got = [float(s[k]) for k in ("mean", "lo", "hi")]
        assert got == pytest.approx([d.mean(), d.mean() - half, d.mean() + half], abs=6e-4)


def test_verdicts_match_results_csv(demo):
    out, rows = demo["out"], demo["rows"]
    said = {(m["arm"], m["base"]): m.groupdict()
            for m in map(VERDICT.match, (out / "report.md").read_text().splitlines()) if m}
    assert set(said) == {("hld-joint", "kd"), ("hld-first", "kd"), ("kd", "ce")}
    loss = {(r["configuration"], r["arm"]): float(r["val_loss"]) for r in rows}
    for (arm, base), s in said.items():
        d = np.array([loss[(c, arm)] - loss[(c, base)] for c, a in loss if a == arm])
        half = T975[len(d) - 1] * d.std(ddof=1) / math.sqrt(len(d))
        assert (int(s["wins"]), int(s["n"])) == (int((d < 0).sum()), 4)
        got = [float(s[k]) for k in ("mean", "lo", "hi", "ratio")]
        assert got == pytest.approx([d.mean(), d.mean() - half, d.mean() + half, math.exp(d.mean())], abs=6e-5)
    assert demo["result"]["verdicts"] == [line[2:] for line in (out / "report.md").read_text().splitlines()
                                          if VERDICT.match(line) or TASK_VERDICT.match(line)]
