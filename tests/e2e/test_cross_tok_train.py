"""A student with its own tokenizer through the whole tool (issue 34, items 6-8): `hld train` with
`student.tokenizer` pairs the text, trains ce / kd / hld-joint on the cross-tokenizer losses against the
teacher online, validates in bits per character and exports the student with its own tokenizer. The
checks are independent of the run's code: the exported student is reloaded by plain transformers and
scored on the validation windows by `F.cross_entropy`, the characters counted from the decoded text."""

from __future__ import annotations

import json
import math

import pytest
import torch

from hld.cli import main


@pytest.fixture(scope="module")
def student_tokenizer(tmp_path_factory):
    from helpers import C4_TRAIN

    out = tmp_path_factory.mktemp("tok") / "bpe"
    assert main(["train-tokenizer", "--data", C4_TRAIN, "--vocab-size", "600", "--out", str(out), "--quiet"]) == 0
    return out


def _train(tmp_path, overrides, tok, *extra) -> tuple[dict, list[dict]]:
    out = tmp_path / "run"
    argv = ["train", "--config", "smoke", "--out", str(out), *overrides, f"student.tokenizer={tok}", *extra]
    assert main([*argv, "--quiet"]) == 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return json.loads((out / "summary.json").read_text()), lines


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["uld", "alm", "gold"])
def test_kd_across_tokenizers_trains_and_validates_in_bits_per_character(tmp_path, overrides, student_tokenizer, loss):
    summary, lines = _train(
        tmp_path, overrides, student_tokenizer, "objective.method=kd", f"objective.cross_tokenizer.loss={loss}"
    )
    train = [x for x in lines if "train/kd" in x]
    assert train and all(math.isfinite(x["train/kd"]) and x["train/kd"] > 0 for x in train)
    assert all(x["train/loss"] == pytest.approx(0.5 * x["train/ce"] + 0.5 * x["train/kd"], rel=1e-5) for x in train)
    assert math.isfinite(summary["val/bpc"]) and summary["val/bpc"] > 0
    assert summary["student_params"] < 600 * 64 * 2 + 10**6  # the student's own 600-row embedding


@pytest.mark.slow
def test_the_exported_student_carries_its_tokenizer_and_scores_what_validation_said(
    tmp_path, overrides, student_tokenizer
):
    """The student exported by a cross-tokenizer run, reloaded by plain transformers with the tokenizer in
    its directory, scores the run's validation windows to the run's own val/loss and val/bpc: NLL by
    `F.cross_entropy` over each window's tokens, characters from the decoded text."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hld.config import load_config
    from hld.train.resources import Resources

    summary, _ = _train(tmp_path, overrides, student_tokenizer, "objective.method=hld-joint")
    out = tmp_path / "run" / "student"
    tok = AutoTokenizer.from_pretrained(out)
    assert (
        len(tok) == 600 and (out / "tokenizer.json").read_bytes() == (student_tokenizer / "tokenizer.json").read_bytes()
    )
    lm = AutoModelForCausalLM.from_pretrained(out).eval()
    assert lm.get_input_embeddings().weight.shape[0] == 600
    cfg = load_config("smoke", [*overrides, f"student.tokenizer={student_tokenizer}"])
    res = Resources()
    n = max(1, cfg.data.val_tokens // cfg.data.seq_len)
    sample = res.paired_windows(cfg.data, res.tokenizer(cfg.teacher.model), tok, validation=True, n=n).sample(n)
    nll, count, chars = 0.0, 0, 0
    with torch.no_grad():
        for ids, length in zip(sample.rows.student_ids, sample.rows.student_lengths):
            x = torch.as_tensor(ids[:length], dtype=torch.long)[None]
            logits = lm(input_ids=x).logits[0, :-1].double()
            nll += float(torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum"))
            count += int(length) - 1
            chars += len(tok.decode(ids[1:length], skip_special_tokens=True))
    assert summary["val/loss"] == pytest.approx(nll / count, rel=1e-4)
    assert summary["val/bpc"] == pytest.approx(nll / math.log(2) / chars, rel=1e-4)


@pytest.mark.slow
def test_ce_with_its_own_tokenizer_reads_no_teacher_and_the_same_windows(tmp_path, overrides, student_tokenizer):
    summary, lines = _train(tmp_path, overrides, student_tokenizer, "objective.method=ce")
    assert "train/kd" not in lines[0] and math.isfinite(summary["val/bpc"])
    assert summary["flops_per_token"]["ce"] == pytest.approx(lines[-1]["flops"] / lines[-1]["tokens"], rel=1e-9)


@pytest.mark.slow
def test_micro_batches_of_paired_windows_train_as_the_whole_batch(tmp_path, overrides, student_tokenizer):
    """hld-joint across tokenizers with each step in two micro-batches (each its own chunks, teacher rows and
    alignments) logs and validates what the whole batch does: the objectives' sums add up over the parts."""
    whole, lines = _train(tmp_path / "whole", overrides, student_tokenizer, "objective.method=hld-joint")
    parts, part_lines = _train(
        tmp_path / "parts", overrides, student_tokenizer, "objective.method=hld-joint", "train.micro_batch_size=2"
    )
    assert len(lines) == len(part_lines)
    for a, b in zip(lines, part_lines):
        for key in ("train/loss", "train/ce", "train/kd", "train/hidden"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), key
    assert parts["val/bpc"] == pytest.approx(whole["val/bpc"], rel=1e-4)


@pytest.mark.slow
def test_the_cross_tok_study_reports_bits_per_character_with_its_references(tmp_path, overrides, student_tokenizer):
    """The shipped cross-tok study, shrunk onto the fixtures: every cell, the teacher's reference (on its own
    tokens of the students' validation text) and the n-gram rows (on the student's tokens) carry bits per
    character, and the teacher's per-token loss, in another unit, is left out of the students' column."""
    out = tmp_path / "study"
    keep = [o for o in overrides if not o.startswith(("student.preset", "train.batch_size", "budget.tokens"))]
    argv = ["study", "--config", "cross-tok", "--out", str(out), *keep, f"student.tokenizer={student_tokenizer}"]
    argv += ["data.val_tokens=256", "seeds=[0]", "grid={objective.cross_tokenizer.loss: [gold]}"]
    assert main([*argv, "budgets=[{tokens: 512}]", "--quiet"]) == 0
    meta = json.loads((out / "study.json").read_text())
    (teacher,) = meta["teacher_reference"]
    assert teacher["student_tokenizer"] == str(student_tokenizer) and teacher["val_bpc"] > 0
    assert all(r["val_bpc"] > 0 for r in meta["ngram_reference"])
    report = (out / "report.md").read_text()
    assert "val bits/char" in report
    row = next(line for line in report.splitlines() if line.startswith("| teacher `"))
    assert f"{teacher['val_bpc']:.4f}" in row and f"{teacher['val_loss']:.4f}" not in row
