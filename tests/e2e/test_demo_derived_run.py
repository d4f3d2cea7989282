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


@pytest.mark.slow
def test_the_report_states_the_unhealed_student_and_the_gap_each_arm_recovered(demo, assets):
    """study.json's derived_reference: the teacher without its block 1 (deleted from its ModuleList, not
    through hld's pruning), scored with a plain cross-entropy on the window protocol written out."""
    import copy
    import gzip

    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, rows = demo["out"], demo["rows"]
    meta = json.loads((out / "study.json").read_text())
    (ref,) = meta["derived_reference"]
    assert ref["student"] == "depth-2" and ref["kept"] == [0, 2]
    lm = AutoModelForCausalLM.from_pretrained(TINY_TEACHER, dtype=torch.float32).eval()
    lm = copy.deepcopy(lm)
    del lm.model.layers[1]
    lm.config.num_hidden_layers, lm.config.use_cache = 2, False
    lm.config.layer_types = lm.config.layer_types[:2]
    tok = AutoTokenizer.from_pretrained(TINY_TEACHER)
    stream: list[int] = []
    for path in sorted((assets / "c4").glob("c4-validation.*.json.gz")):
        with gzip.open(path, "rt") as fh:
            for line in fh:
                text = json.loads(line)["text"]
                stream += tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] + [
                    tok.eos_token_id
                ]
    x = torch.tensor([[tok.bos_token_id, *stream[w * 31 : (w + 1) * 31]] for w in range(256 // 32)])
    with torch.no_grad():
        logits = lm(input_ids=x).logits[:, :-1].double()
    want = float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1)))
    assert ref["val_loss"] == pytest.approx(want, abs=1e-4)
    report = (out / "report.md").read_text()
    assert "| depth-2 before training (teacher blocks [0, 2]) |" in report
    teacher = meta["teacher_reference"][0]["val_loss"]
    kd = [float(r["val_loss"]) for r in rows if r["arm"] == "kd"]
    share = (ref["val_loss"] - sum(kd) / len(kd)) / (ref["val_loss"] - teacher)
    assert f"| depth-2 | tokens=512 | kd | {ref['val_loss']:.4f} |" in report and f"{share:.1%} |" in report


@pytest.mark.slow
def test_the_unhealed_students_cka_is_every_curves_step_0(demo):
    """study.json's derived_reference holds the unhealed student's CKA per mapped pair: 1 for the pair
    whose student layer is the teacher's own block on the teacher's own input (block 0), below 1 for
    block 2 read after block 0 alone; every cell's CKA curve starts there, at 0 tokens."""
    from pathlib import Path

    from hld.study.figures import _cka_curve

    out = demo["out"]
    ref = json.loads((out / "study.json").read_text())["derived_reference"]
    assert len(ref) == 1 and set(ref[0]["cka"]) == {"s1_t1", "s2_t3"}
    assert ref[0]["cka"]["s1_t1"] == pytest.approx(1.0, abs=1e-6)
    assert 0 < ref[0]["cka"]["s2_t3"] < 1 - 1e-3
    for r in demo["rows"]:
        tokens, cka = _cka_curve(Path(out) / "runs" / r["cell"], ref[0]["cka"])
        assert tokens[0] == 0 and tokens[-1] > 0
        assert cka[0] == pytest.approx((1.0 + ref[0]["cka"]["s2_t3"]) / 2, abs=1e-6)
