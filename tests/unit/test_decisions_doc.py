"""docs/decisions.md cannot drift from the code: every default its tables name is read back and
compared with config.py's dataclass defaults (or, in "The embedded default" section, with the shipped
demo study and the run config its cells resolve to).

A table row names a default in one of two ways: its choice column names exactly one config key in
parentheses, `(`objective.hidden.loss`)`, and its default column starts with a backticked value
(`mse`); or its default column starts with backticked `key: value` items (`budget.count_teacher: true`,
`train.precision: float32` and `teacher.dtype: float32`)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from hld.config import RunConfig, to_dict
from hld.study.results import get_dotted
from hld.study.spec import cell_config, expand, load_study

DECISIONS = Path(__file__).resolve().parents[2] / "docs" / "decisions.md"
EMBEDDED = "The embedded default"
# the defaults the file must keep naming (a claim silently dropped from a table would pass otherwise)
REQUIRED = {
    "objective.hidden.mapping",
    "objective.hidden.normalize_teacher",
    "objective.hidden.loss",
    "objective.hidden.skip_first_position",
    "budget.count_teacher",
    "train.precision",
    "teacher.dtype",
}
REQUIRED_DEMO = {
    "train.precision",
    "teacher.dtype",
    "train.batch_size",
    "train.lr",
    "score_students",
    "task_limit",
    "budgets",
}


def _cells(row: str) -> list[str]:
    return [c.strip() for c in re.split(r"(?<!\\)\|", row.strip())[1:-1]]


def _leading_items(text: str) -> list[tuple[str, str]]:
    """The `key: value` items a default column starts with (separated by commas, `and` or `;`)."""
    items = []
    rest = text
    while m := re.match(r"\s*(?:,|;|and)?\s*`([A-Za-z_][\w.]*): ([^`]*)`", rest):
        items.append((m[1], m[2]))
        rest = rest[m.end() :]
    return items


def claims() -> list[tuple[str, str, str]]:
    """(section, key, value as written) for every default the tables of decisions.md name."""
    keys = set(_leaves(to_dict(RunConfig())))
    out, section = [], ""
    for line in DECISIONS.read_text().splitlines():
        if line.startswith("## "):
            section = line[3:]
        if not line.startswith("| ") or line.startswith("|---"):
            continue
        cells = _cells(line)
        if len(cells) < 3:
            continue
        choice, default = cells[0], cells[1]
        named = [k for k in re.findall(r"\(`([\w.]+)`\)", choice) if k in keys]
        lead = _leading_items(default)
        if lead:
            out += [(section, k, v) for k, v in lead]
        elif len(named) == 1 and (m := re.match(r"`([^`:]+)`", default)):
            out.append((section, named[0], m[1]))
    return out


def _leaves(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_leaves(v, f"{prefix}{k}."))
        out[prefix + k] = v
    return out


def _same(value: str, actual) -> bool:
    written = yaml.safe_load(value)
    if isinstance(actual, tuple):
        actual = list(actual)
    if isinstance(actual, float) or isinstance(written, float):
        return written == pytest.approx(actual)
    return written == actual


def test_decisions_names_the_defaults_it_must():
    found = {(s.startswith(EMBEDDED), k) for s, k, _ in claims()}
    assert {k for embedded, k in found if not embedded} >= REQUIRED
    assert {k for embedded, k in found if embedded} >= REQUIRED_DEMO


def test_every_default_in_decisions_is_the_codes():
    defaults = to_dict(RunConfig())
    study = load_study("demo")
    demo_cfg = to_dict(cell_config(study, next(c for c in expand(study) if c.arm == "kd")))
    study_keys = {f.name: getattr(study, f.name) for f in dataclasses.fields(study)}
    wrong = []
    for section, key, value in claims():
        if section.startswith(EMBEDDED):
            actual = study_keys[key] if key in study_keys else get_dotted(demo_cfg, key)
        else:
            actual = get_dotted(defaults, key)
        if not _same(value, actual):
            wrong.append(f"{section}: {key} is `{value}` in docs/decisions.md, {actual!r} in the code")
    assert not wrong, "\n".join(wrong)


def test_a_wrong_default_is_caught(tmp_path, monkeypatch):
    import sys

    text = DECISIONS.read_text().replace(
        "| teacher normalisation (`objective.hidden.normalize_teacher`) | `standardize`",
        "| teacher normalisation (`objective.hidden.normalize_teacher`) | `rms`",
    )
    assert text != DECISIONS.read_text()
    (tmp_path / "decisions.md").write_text(text)
    monkeypatch.setattr(sys.modules[__name__], "DECISIONS", tmp_path / "decisions.md")
    with pytest.raises(AssertionError, match="normalize_teacher is `rms`"):
        test_every_default_in_decisions_is_the_codes()


def test_the_readme_points_at_the_generated_demo_report_instead_of_retyping_it():
    root = DECISIONS.parents[1]
    readme = (root / "README.md").read_text()
    report = (root / "docs" / "demo-report.md").read_text()
    assert "docs/demo-report.md" in readme
    assert report.startswith("# Study `demo`") and "Generated by `hld report`" in report  # the tool's own file
    for needed in ("- **Ran on**:", "- **Precision that ran**", "Teacher signal fidelity", "Power of each line"):
        assert needed in report, needed
    # no per-arm table or verdict line copied into the README: their one place is the report
    assert "| tiny-2l | tokens=4096 |" not in readme
    assert not re.search(r"^- (\*\*)?(hld-joint|hld-first|kd) vs ", readme, re.M)
    for png in re.findall(r"\]\((plots/[\w.]+\.png)\)", report):  # its plots are checked in beside it
        assert (root / "docs" / png).is_file(), png
