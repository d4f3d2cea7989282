"""`hld report` over a study one of whose cells diverged (validation loss NaN) names that cell as left out
of every comparison (issue 24: its row vanished without a word)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import yaml

from hld.cli import main


def _cell(study: Path, finished: Path, arm: str, val_loss: float) -> None:
    run = study / "runs" / f"tiny__s0__{arm}"
    shutil.copytree(finished, run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["objective"]["method"] = arm
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    summary = json.loads((run / "summary.json").read_text())
    summary.update({"arm": arm, "val/loss": val_loss, "val/ppl": math.exp(val_loss)})
    (run / "summary.json").write_text(json.dumps(summary))


@pytest.mark.slow
def test_report_names_the_cell_whose_validation_loss_is_nan(tmp_path, capsys, hld_run):
    """12: a NaN val/loss in one cell made its row vanish ("no pair … ran") without a word."""
    study = tmp_path / "study"
    _cell(study, hld_run, "ce", 6.0)
    _cell(study, hld_run, "kd", float("nan"))
    assert main(["report", str(study)]) == 0
    out = capsys.readouterr().out
    assert "cell `tiny__s0__kd` (kd) is left out of every comparison" in out and "nan" in out
    assert "cell `tiny__s0__kd` (kd) is left out" in (study / "report.md").read_text()
