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


def test_no_modules_import_each_other_in_a_circle():
    layers = _layers()
    graph = layers.module_graph()
    # the walk sees module-level, function-local and TYPE_CHECKING imports alike
    assert "hld.config_checks" in graph["hld.config"]  # module level
    assert "hld.eval.hld_lm" in graph["hld.eval.harness"]  # inside evaluate_tasks
    assert "hld.data.store" in graph["hld.cache.meta"]  # under TYPE_CHECKING
    assert "hld.atomic" in graph["hld.train.loop"]  # `from hld import atomic` names the module
    assert layers.cycles(graph) == []


def test_a_circle_is_reported_once_as_a_closed_path():
    layers = _layers()
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}, "f": {"d"}}
    assert layers.cycles(graph) == [["a", "b", "c", "a"], ["e", "e"]]
    assert layers.cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
