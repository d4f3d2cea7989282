"""The shipped offline tasks: the checked-in files are what scripts/build_eval_tasks.py builds
(seeded, byte-identical), from the validation split only, and every item obeys its definition."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
TASKS = ROOT / "src" / "hld" / "eval" / "tasks"
SAMPLE = ROOT / "src" / "hld" / "assets" / "sample_corpus"


def _script():
    spec = importlib.util.spec_from_file_location("build_eval_tasks", ROOT / "scripts" / "build_eval_tasks.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _rows(name: str) -> list[dict]:
    return [json.loads(x) for x in (TASKS / name).read_text(encoding="utf-8").splitlines()]


def test_shipped_files_equal_a_fresh_build(tmp_path):
    script = _script()
    first, second = script.build(), script.build()
    assert first == second  # seeded: the same bytes every time
    for name, data in first.items():
        assert (TASKS / name).read_bytes() == data, f"{name} is stale: rerun scripts/build_eval_tasks.py"
    assert script.main(["--check"]) == 0


def test_built_from_the_validation_split_only():
    manifest = json.loads((TASKS / "manifest.json").read_text())
    val = SAMPLE / manifest["source"]
    assert val.name.startswith("c4-validation.")
    assert hashlib.sha256(val.read_bytes()).hexdigest() == manifest["source_sha256"]
    with gzip.open(val, "rt", encoding="utf-8") as fh:
        validation_text = " ".join(" ".join(json.loads(x)["text"].split()) for x in fh)
    for row in _rows("hld_lambada.jsonl"):  # each passage is validation text, verbatim (whitespace collapsed)
        assert row["text"] in validation_text
    for row in _rows("hld_mc.jsonl"):
        assert row["ctx"] in validation_text and row["endings"][row["label"]] in validation_text


def test_lambada_items_obey_their_definition():
    rows = _rows("hld_lambada.jsonl")
    m = json.loads((TASKS / "manifest.json").read_text())["hld_lambada"]
    assert len(rows) == m["items"] >= 300 and len({r["text"] for r in rows}) == len(rows)
    for r in rows:
        words = r["text"].split(" ")
        target = words[-1]
        assert re.fullmatch(r"[A-Za-z]{3,}", target), target
        assert target in {w.strip(".,;:!?()[]\"'") for w in words[:-1]}  # predictable: seen before
        assert 40 <= len(words) <= 100 and not r["text"].endswith(".")


def test_mc_items_obey_their_definition():
    rows = _rows("hld_mc.jsonl")
    m = json.loads((TASKS / "manifest.json").read_text())["hld_mc"]
    assert len(rows) == m["items"] >= 300
    labels = [r["label"] for r in rows]
    for r in rows:
        assert len(r["endings"]) == 4 and len(set(r["endings"])) == 4 and 0 <= r["label"] < 4
        true = r["endings"][r["label"]]
        for other in r["endings"]:
            assert abs(len(other) - len(true)) <= 0.4 * len(true)  # distractors of similar length
    assert all(labels.count(i) > len(rows) / 8 for i in range(4))  # the answer's position is shuffled


def test_task_yamls_name_their_data_and_chance():
    for name, chance in (("hld_lambada", None), ("hld_mc", 0.25)):
        text = (TASKS / f"{name}.yaml").read_text()
        cfg = yaml.load(text.replace("!function", ""), Loader=yaml.SafeLoader)
        assert cfg["task"] == name and cfg["dataset_kwargs"]["data_file"] == f"{name}.jsonl"
        assert cfg["metadata"]["chance"] == chance
