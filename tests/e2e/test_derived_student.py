"""A depth-pruned student through the whole tool: every arm trains through `hld train`, the calibration is
counted in the run's FLOPs and in `hld plan`, hld maps each kept block to its teacher block with no
projector weights, and the exported student reloads in plain transformers with `hld eval`'s loss."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hld.cli import main
from hld.config import load_config

DERIVED = ["student.preset=depth-2", "student.init.calibration_windows=4", "objective.hidden.mapping=kept"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, overrides) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("derived")
    out = {}
    for arm in ("ce", "kd", "hld-joint", "hld-first"):
        out[arm] = root / arm
        argv = ["train", "--config", "smoke", "--out", str(out[arm]), *overrides, *DERIVED, f"objective.method={arm}"]
        assert main([*argv, "--quiet"]) == 0
    return out


@pytest.mark.slow
def test_every_arm_trains_a_derived_student_and_counts_its_calibration(runs, overrides):
    from hld.flops import planned_calibration
    from hld.plan import teacher_shapes

    cfg = load_config("smoke", [*overrides, *DERIVED])
    teacher = teacher_shapes(cfg.teacher.model)[0]
    rank, calib = planned_calibration(cfg.student, teacher, cfg.data.seq_len)
    assert rank == "block_influence" and calib > 0
    kept = None
    for run in runs.values():
        d = json.loads((run / "derivation.json").read_text())
        s = json.loads((run / "summary.json").read_text())
        steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        train = [m for m in steps if "train/loss" in m]
        per_step = sum(s["flops_per_token"][m["phase"]] * m_tokens for m, m_tokens in _tokens(train))
        assert d["calibration_flops"] == pytest.approx(calib) and s["calibration_flops"] == pytest.approx(calib)
        assert s["flops"] == pytest.approx(calib + per_step)  # spent before step 0, then each step's
        assert kept is None or d["kept"] == kept  # one ranking, whatever the arm
        kept = d["kept"]
        assert s["student_params_non_embedding"] < 63_000  # 2 of the tiny teacher's 3 blocks
    hld = json.loads((runs["hld-joint"] / "cka.json").read_text())
    assert hld["pairs"] == [[k + 1, b + 1] for k, b in enumerate(kept)]  # each block to the block it came from
    ckpt = torch.load(runs["hld-joint"] / "checkpoints" / "checkpoint.pt", weights_only=False)
    assert not ckpt["projectors"]  # identity projectors: no weights


def _tokens(train: list[dict]):
    prev = 0
    for m in train:
        yield m, m["tokens"] - prev
        prev = m["tokens"]


@pytest.mark.slow
def test_plan_shows_the_origin_and_charges_the_calibration_in_both_accountings(overrides, capsys):
    assert main(["plan", "--config", "smoke", *overrides, *DERIVED, "objective.method=kd", "--json"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    row = row.get("runs", [row])[0] if "runs" in row else row
    assert row["origin"].startswith("2 of 3 teacher blocks, ranked by block_influence on 4")
    for key in ("teacher_counted", "teacher_not_counted"):
        assert row["length"][key]["flops"] > row["calibration_flops"] > 0
    budget = 3 * row["calibration_flops"]
    by_flops = [*overrides, *DERIVED, f"budget.flops={budget}", "budget.tokens=null"]
    assert main(["plan", "--config", "smoke", *by_flops]) == 0
    assert "calibration" in capsys.readouterr().out
    rc = main(["plan", "--config", "smoke", *overrides, *DERIVED, "budget.flops=10", "budget.tokens=null"])
    assert rc == 2 and "spent before training" in capsys.readouterr().err


@pytest.mark.slow
def test_exported_student_reloads_in_plain_transformers_with_hld_evals_loss(runs, tmp_path, assets, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "hf"
    assert main(["export", str(runs["kd"]), str(out), "--quiet"]) == 0
    capsys.readouterr()
    data = str(assets / "c4" / "c4-validation.*.json.gz")
    assert main(["eval", "--model", str(out), "--data", data, "--seq-len", "32", "--json"]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    model = AutoModelForCausalLM.from_pretrained(out).eval()  # plain transformers, nothing of hld
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.num_hidden_layers == 2
    texts = []
    for path in sorted((assets / "c4").glob("c4-validation.*.json.gz")):
        with gzip.open(path, "rt") as fh:
            texts += [json.loads(line)["text"] for line in fh]
    stream: list[int] = []
    for t in texts:  # the window protocol, written out: each document's tokens + EOS, joined, cut in 31s
        stream += tok(t, add_special_tokens=False, split_special_tokens=True)["input_ids"] + [tok.eos_token_id]
    total, n = 0.0, 0
    with torch.no_grad():
        for w in range(len(stream) // 31):
            x = torch.tensor([[tok.bos_token_id, *stream[w * 31 : (w + 1) * 31]]])
            logits = model(input_ids=x).logits[0, :-1].double()
            total += float(F.cross_entropy(logits, x[0, 1:], reduction="sum"))
            n += 31
    assert got["tokens"] == n
    assert got["loss"] == pytest.approx(total / n, abs=1e-4)


@pytest.mark.slow
def test_a_student_that_keeps_every_block_starts_as_the_teacher(tmp_path, overrides):
    """depth-3 of a 3-block teacher is the teacher: its first step's KD term (KL to the teacher) and hidden
    loss (each block's standardised state against the same teacher block's) are 0."""
    out = tmp_path / "all"
    argv = ["train", "--config", "smoke", "--out", str(out), *overrides, *DERIVED, "student.preset=depth-3"]
    assert main([*argv, "objective.method=hld-joint", "train.lr=1e-9", "--quiet"]) == 0
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1
    assert abs(first["train/kd"]) < 1e-5 and abs(first["train/hidden"]) < 1e-9


@pytest.mark.slow
def test_a_frozen_embedding_stays_the_teachers_and_no_final_checkpoint_is_kept(tmp_path, overrides, assets):
    from safetensors.torch import load_file

    out = tmp_path / "frozen"
    extra = ["train.freeze_embedding=true", "train.keep_final_checkpoint=false", "objective.method=kd"]
    assert main(["train", "--config", "smoke", "--out", str(out), *overrides, *DERIVED, *extra, "--quiet"]) == 0
    got = load_file(out / "student" / "model.safetensors")
    want = load_file(assets / "tiny_teacher" / "model.safetensors")
    key = "model.embed_tokens.weight"
    assert torch.equal(got[key], want[key])  # frozen: the teacher's rows, bit for bit
    moved = [k for k in got if k.startswith("model.layers.0.") and not torch.equal(got[k], want[k])]
    assert moved  # the blocks trained
    assert not (out / "checkpoints").exists() and (out / "summary.json").exists()
    assert main(["train", "--config", "smoke", "--out", str(out), *overrides, *DERIVED, *extra, "--resume"]) == 2


@pytest.mark.slow
def test_a_narrowed_derived_student_trains_exports_and_reloads(tmp_path, overrides):
    """depth-2 with d_ff 48 of 96 and 1 of 2 query heads: hld-joint through identity projectors (the residual
    width is the teacher's), its widths and the width pass's FLOPs recorded, reloaded by transformers."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "narrow"
    narrow = ["student.d_ff=48", "student.n_heads=1", "objective.method=hld-joint"]
    assert main(["train", "--config", "smoke", "--out", str(out), *overrides, *DERIVED, *narrow, "--quiet"]) == 0
    d = json.loads((out / "derivation.json").read_text())
    assert (d["widths"]["d_ff"], d["widths"]["n_heads"]) == (48, 1)
    assert all(len(b["channels"]) == 48 and len(b["heads"]) == 1 for b in d["widths"]["per_block"])
    assert "narrowed to 1 heads (1 kv), d_ff 48" in d["origin"]
    lm = AutoModelForCausalLM.from_pretrained(out / "student")
    assert (lm.config.intermediate_size, lm.config.num_attention_heads, lm.config.num_hidden_layers) == (48, 1, 2)
