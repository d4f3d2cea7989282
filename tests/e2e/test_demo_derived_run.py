"""`hld run` end to end on the tiny fixtures: the shipped demo (a student made of its teacher's blocks,
healed by ce, kd and hld-joint at equal tokens and ce at kd's FLOPs, three seeds). The tiny teacher has 3
blocks, so the demo's 9 kept blocks become 2 (`students=[depth-2]`, `student.init.blocks=[0, 2]`): every
cell is a derived student with its calibration-free origin recorded, no final checkpoint is kept, the
report prints both kd vs ce lines and the hld line, and the derived students keep the teacher's embedding."""

from __future__ import annotations

import contextlib
import csv
import io
import json

import pytest
import torch

from helpers import ANY_VERDICT, TINY_TEACHER, tiny_overrides
from hld.cli import main

OVERRIDES = [o for o in tiny_overrides() if not o.startswith(("student.preset=", "budget."))] + [
    "data.val_tokens=256",
    "students=[depth-2]",
    "student.init.blocks=[0, 2]",
    "budgets=[{tokens: 512}]",
    "task_limit=4",
]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("demo") / "run"
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(io.StringIO()):
        mp.setenv("HLD_CACHE_DIR", str(tmp_path_factory.mktemp("demo-cache")))
        assert main(["run", "--out", str(out), *OVERRIDES, "--json"]) == 0
    return {"out": out, "rows": list(csv.DictReader(open(out / "results.csv")))}


@pytest.mark.slow
def test_the_demo_heals_a_derived_student_in_every_cell(demo):
    from safetensors.torch import load_file

    out, rows = demo["out"], demo["rows"]
    assert len(rows) == 3 * (3 + 1)
    assert {r["arm"] for r in rows} == {"ce", "kd", "hld-joint"} and {r["student"] for r in rows} == {"depth-2"}
    teacher_emb = load_file(TINY_TEACHER / "model.safetensors")["model.embed_tokens.weight"]
    for r in rows:
        run = out / "runs" / r["cell"]
        d = json.loads((run / "derivation.json").read_text())
        assert d["kept"] == [0, 2] and d["rank"] == "explicit" and d["calibration_flops"] == 0
        assert not (run / "checkpoints").exists()
        emb = load_file(run / "student" / "model.safetensors")["model.embed_tokens.weight"]
        assert torch.equal(emb, teacher_emb)  # frozen: the teacher's
    cka = json.loads((out / "runs" / next(r["cell"] for r in rows if r["arm"] == "hld-joint") / "cka.json").read_text())
    assert cka["pairs"] == [[1, 1], [2, 3]]  # each kept block to the teacher block it came from
    report = (out / "report.md").read_text()
    lines = [line for line in report.splitlines() if ANY_VERDICT.match(line)]
    heads = {line.split("**")[1] for line in lines}
    assert {h.split(",")[0] for h in heads} == {"kd vs ce", "hld-joint vs kd"}
    assert any("equal FLOPs" in h or "FLOPs" in h for h in heads if h.startswith("kd vs ce"))
