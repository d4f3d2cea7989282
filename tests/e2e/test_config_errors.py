"""A config value, key or override that is not valid is refused before anything trains, in one line
`hld: error: <problem> — <fix>` naming the key, exit 2 (issue 15: each of these was a traceback or a
misleading line; issue 24: a key written twice, and pairs a mapping ignores, were taken silently)."""

from __future__ import annotations

import json

import pytest

from helpers import one_line_error as _one_line
from helpers import tiny_overrides
from helpers import train_argv as _argv
from hld.cli import main


@pytest.mark.parametrize(
    "overrides, problem",
    [
        (["budget.tokens=null", "budget.flops=inf"], "budget.flops=inf is outside"),
        (["budget.tokens=null", "budget.flops=1e30"], "more than the limit of 10,000,000"),
        (["teacher.cache_top_k=-5"], "teacher.cache_top_k=-5 is outside [1, "),
        (["train.log_every_steps=0"], "train.log_every_steps=0 is outside [1, "),
        (["student.n_heads=3"], "student d_model=64 is not a multiple of n_heads=3"),
    ],
)
def test_config_values_that_were_tracebacks(tmp_path, capsys, overrides, problem):
    _one_line(capsys, _argv(tmp_path / "r", *overrides), problem)
    # refused before training: at most the resolved config.yaml (a FLOPs budget needs the models' sizes)
    assert not (tmp_path / "r").exists() or [p.name for p in (tmp_path / "r").iterdir()] == ["config.yaml"]


def test_max_docs_zero_names_the_key(tmp_path, capsys):
    _one_line(capsys, _argv(tmp_path / "r", "data.max_train_docs=0"), "data.max_train_docs=0 is outside [1, ")


def test_override_without_a_key(tmp_path, capsys):
    line = _one_line(capsys, _argv(tmp_path / "r", "=5"), "override '=5' has no key")
    assert "did you mean" not in line


def test_a_key_written_twice_in_a_config_is_refused(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: x\ntrain:\n  lr: 1.0e-3\n  batch_size: 4\n  lr: 3.0e-4\n")
    _one_line(capsys, ["plan", "--run", "--config", str(cfg)], "sets 'lr' twice in one section (lines 3 and 5)")
    study = tmp_path / "s.yaml"
    study.write_text("name: s\narms: [ce]\nseeds: [0]\narms: [kd]\n")
    _one_line(capsys, ["study", "--config", str(study), "--list"], "sets 'arms' twice")


def test_pairs_under_a_mapping_that_ignores_them_are_refused(capsys):
    """`objective.hidden.pairs` was silently ignored under `mapping: uniform` (docs/decisions.md)."""
    argv = ["plan", "--run", "--config", "smoke", "objective.method=hld-joint", "objective.hidden.pairs=[[1, 1]]"]
    _one_line(capsys, argv, "objective.hidden.mapping=uniform ignores it")
    assert main([*argv[:-1], "objective.hidden.mapping=explicit", argv[-1], *tiny_overrides()]) == 0


def test_training_on_a_top_0_cache(tmp_path, capsys):
    """A cache claiming top-0 logits (what teacher.cache_top_k=0 used to build) is refused."""
    cache = tmp_path / "cache"
    assert main(["cache-teacher", "--config", "smoke", "--out", str(cache), *tiny_overrides(), "--quiet"]) == 0
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["identity"]["top_k"] = 0
    (cache / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    _one_line(capsys, _argv(tmp_path / "r", f"teacher.cache={cache}"), "holds top-0 logits")
