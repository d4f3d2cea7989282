"""Imports between hld's packages run one way (scripts/import_layers.py): every module is ranked,
and none imports a higher-ranked one."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "import_layers.py"


def _layers():
    spec = importlib.util.spec_from_file_location("import_layers", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_unit_is_ranked_and_imports_run_one_way():
    layers = _layers()
    found = layers.edges()
    assert ("train", "distill") in found  # the walk sees real imports
    assert {u for e in found for u in e} <= set(layers.RANK)
    assert layers.against_order(found) == []


def test_an_upward_import_is_reported():
    layers = _layers()
    assert layers.against_order({("distill", "train"), ("eval", "train")}) == [("distill", "train"), ("eval", "train")]
