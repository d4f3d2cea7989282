"""`hld eval` against a direct transformers computation of the README's window protocol: ids + EOS
per document, concatenated, cut into chunks of seq_len - 1 (last partial one dropped), each window
BOS + chunk, every position predicts the next token of its window, ppl = exp(mean NLL)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from helpers import SEQ_LEN, reference_ppl
from hld.cli import main

ASSETS = Path(__file__).resolve().parents[1] / "assets"
VAL_GLOB = str(ASSETS / "c4" / "c4-validation.*.json.gz")


def _eval(capsys, *args: str) -> dict:
    rc = main(["eval", *args, "--seq-len", str(SEQ_LEN), "--dtype", "float32", "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.slow
def test_eval_matches_a_direct_transformers_computation(capsys):
    teacher = ASSETS / "tiny_teacher"
    want, count, n_windows = reference_ppl(teacher)
    row = _eval(capsys, "--model", str(teacher), "--data", VAL_GLOB)
    assert row["windows"] == n_windows and row["tokens"] == count
    assert row["ppl"] == pytest.approx(want, rel=1e-5)
    assert row["loss"] == pytest.approx(math.log(want), rel=1e-5)
    # the batch size and a document limit change nothing but what they should
    assert _eval(capsys, "--model", str(teacher), "--data", VAL_GLOB, "--batch-size", "1")["ppl"] == pytest.approx(
        want, rel=1e-6
    )
    few, few_count, _ = reference_ppl(teacher, max_docs=3)
    row3 = _eval(capsys, "--model", str(teacher), "--data", VAL_GLOB, "--max-docs", "3")
    assert row3["tokens"] == few_count and row3["ppl"] == pytest.approx(few, rel=1e-5)


@pytest.mark.slow
def test_eval_of_a_run_directory(capsys, tmp_path, overrides):
    run = tmp_path / "run"
    ov = [*overrides, "objective.method=ce", "data.val_tokens=1000000"]  # validate on every window
    assert main(["train", "--config", "smoke", "--out", str(run), *ov, "--quiet"]) == 0
    capsys.readouterr()
    want, count, _ = reference_ppl(run / "student")
    row = _eval(capsys, "--model", str(run), "--data", VAL_GLOB)
    assert row["tokens"] == count
    assert row["ppl"] == pytest.approx(want, rel=1e-5)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["val/ppl"] == pytest.approx(row["ppl"], rel=1e-6)  # val/ppl in training = hld eval


@pytest.mark.parametrize(
    "args, problem",
    [
        (["--model", "/no/such/model", "--data", VAL_GLOB], "/no/such/model does not exist"),
        (["--model", str(ASSETS / "c4"), "--data", VAL_GLOB], "no config.json"),
        (
            ["--model", str(ASSETS / "tiny_teacher"), "--data", str(ASSETS / "c4" / "nothing-*.jsonl")],
            "matches no file",
        ),
    ],
)
def test_eval_user_errors(capsys, args, problem):
    rc = main(["eval", *args, "--seq-len", str(SEQ_LEN)])
    out, err = capsys.readouterr()
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hld: error: ") and problem in lines[0], err


def test_eval_seq_len_too_short(capsys):
    rc = main(["eval", "--model", str(ASSETS / "tiny_teacher"), "--data", VAL_GLOB, "--seq-len", "1"])
    assert rc == 2 and "--seq-len 1 is too short" in capsys.readouterr().err
