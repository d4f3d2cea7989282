"""A derived student with a narrower residual stream (`student.d_model`, `student.init.residual`) through the
whole tool: hld maps its states to the teacher's space through its fixed basis, the residual pass is counted
in the run's FLOPs and in `hld plan`, and the exported student reloads in plain transformers."""

from __future__ import annotations

import json

import pytest
import torch

from hld.cli import main
from hld.config import load_config

DERIVED = ["student.preset=depth-2", "student.init.calibration_windows=4", "objective.hidden.mapping=kept"]


@pytest.mark.slow
def test_every_channel_kept_starts_as_the_teacher_through_the_basis(tmp_path, overrides):
    """depth-3 of a 3-block teacher with all 48 residual channels kept by `prune`: the states go through the
    basis (a selection of every channel), and the first step's KD and hidden loss are 0."""
    out = tmp_path / "all"
    argv = ["train", "--config", "smoke", "--out", str(out), *overrides, *DERIVED, "student.preset=depth-3"]
    assert main([*argv, "student.d_model=48", "objective.method=hld-joint", "train.lr=1e-9", "--quiet"]) == 0
    d = json.loads((out / "derivation.json").read_text())
    assert d["residual"]["how"] == "prune" and d["residual"]["channels"] == list(range(48))
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert abs(first["train/kd"]) < 1e-4 and abs(first["train/hidden"]) < 1e-6


@pytest.mark.slow
def test_the_exported_narrow_student_is_the_derived_one(tmp_path, overrides):
    """Trained at lr 1e-12 (its weights do not move), exported by `hld export` and loaded by plain
    transformers, a projected d_model-32 student gives the logits of the student built in-process from the
    teacher and the same derivation (`derived_student`)."""
    from transformers import AutoModelForCausalLM

    from hld.models.derive import derived_student
    from hld.train.resources import Resources

    narrow = [*DERIVED, "student.d_model=32", "student.init.residual=project", "objective.method=kd"]
    out = tmp_path / "run"
    argv = ["train", "--config", "smoke", "--out", str(out), *overrides, *narrow, "train.lr=1e-12", "--quiet"]
    assert main(argv) == 0
    assert main(["export", str(out), str(tmp_path / "hf"), "--quiet"]) == 0
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    cfg = load_config("smoke", [*overrides, *narrow])
    res = Resources()
    tok = res.tokenizer(cfg.teacher.model)
    train = res.train_windows(cfg.data, tok)
    d = res.derivation(cfg.student, cfg.teacher.model, cfg.teacher.dtype, train, device=torch.device("cpu"))
    want = derived_student(res.teacher(cfg.teacher.model, cfg.teacher.dtype).model, d).eval()
    ids = torch.as_tensor(train[:2], dtype=torch.long)
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=ids).logits, want(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_a_projected_student_trains_is_counted_and_reloads(tmp_path, overrides, capsys):
    from transformers import AutoModelForCausalLM

    from hld.flops import planned_calibration
    from hld.plan import teacher_shapes

    narrow = [*DERIVED, "student.d_model=32", "student.init.residual=project"]
    out = tmp_path / "project"
    argv = ["train", "--config", "smoke", "--out", str(out), *overrides, *narrow, "objective.method=hld-joint"]
    assert main([*argv, "--quiet"]) == 0
    d = json.loads((out / "derivation.json").read_text())
    s = json.loads((out / "summary.json").read_text())
    assert (d["residual"]["how"], d["residual"]["d_model"]) == ("project", 32)
    assert "residual d_model 32 by project" in d["origin"]
    cfg = load_config("smoke", [*overrides, *narrow])
    want = planned_calibration(cfg.student, teacher_shapes(cfg.teacher.model)[0], cfg.data.seq_len)[1]
    assert d["calibration_flops"] == pytest.approx(want) and s["calibration_flops"] == pytest.approx(want)
    ckpt = torch.load(out / "checkpoints" / "checkpoint.pt", weights_only=False)
    assert not ckpt["projectors"]  # the basis is fixed: no weights, nothing saved
    assert main(["plan", "--config", "smoke", *overrides, *narrow, "objective.method=hld-joint", "--json"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    row = row.get("runs", [row])[0] if "runs" in row else row
    assert "residual d_model 32 by project" in row["origin"] and row["calibration_flops"] == pytest.approx(want)
    assert main(["export", str(out), str(tmp_path / "hf"), "--quiet"]) == 0
    lm = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()  # plain transformers
    assert (lm.config.hidden_size, lm.config.num_hidden_layers) == (32, 2)
    ids = torch.tensor([[2, 17, 40, 99, 7]])
    assert torch.isfinite(lm(input_ids=ids).logits).all()
