"""Issue 15, generated: every numeric config key x {0, -1, nan, inf, 1e30} (and the integer 10**30
for integer keys). Each either exits 2 with one line naming the key, raised by `load_config` before
anything trains, or trains validly on the tiny fixtures with the value unchanged (never a traceback,
never a silent clamp, never a negative learning rate). Which outcome each case has is pinned in
ACCEPTED / REFUSED_AT_RUN. Validation costs milliseconds; only the combinations that pass it train
(a few seconds each, marked slow)."""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing

import pytest
import yaml

from helpers import tiny_overrides
from hld import config as config_mod
from hld.cli import main
from hld.config import RunConfig, load_config
from hld.config_checks import RANGES
from hld.errors import HldError

VALUES = ["0", "-1", "nan", "inf", "1e30"]


def _numeric_keys(cls: type = RunConfig, prefix: str = "") -> dict[str, type]:
    out = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.update(_numeric_keys(tp, prefix + f.name + "."))
            continue
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        if tp in (int, float):  # bool is its own type in the annotations
            out[prefix + f.name] = tp
    return out


NUMERIC = _numeric_keys()
CASES = [(k, v) for k, tp in NUMERIC.items() for v in VALUES + ([str(10**30)] if tp is int else [])]


def test_every_numeric_key_has_a_range():
    assert set(NUMERIC) == set(RANGES), set(NUMERIC) ^ set(RANGES)
    assert {k for k, _, _ in config_mod.field_help()} >= set(NUMERIC)


def _overrides(key: str, value: str) -> list[str]:
    extra = ["budget.tokens=null"] if key == "budget.flops" else []
    return [*tiny_overrides(), *extra, f"{key}={value}"]


def _get(cfg, key: str):
    for part in key.split("."):
        cfg = cfg[part] if isinstance(cfg, dict) else getattr(cfg, part)
    return cfg


# The expected outcome of every case, pinned (a value wrongly accepted or wrongly refused fails):
# these train validly with the value unchanged; budget.flops=1e30 passes the config checks and is
# refused in one line once the models' sizes show it needs more steps than can be run; every other
# case is refused by `load_config` in one line naming the key.
ACCEPTED = {
    ("objective.alpha", "0"),
    ("objective.alpha_schedule.final", "0"),
    ("objective.alpha_schedule.warmup_share", "0"),
    ("objective.alpha_schedule.decay_share", "0"),
    ("objective.hidden.beta", "0"),
    ("objective.hidden.beta_schedule.final", "0"),
    ("objective.hidden.beta_schedule.warmup_share", "0"),
    ("objective.hidden.beta_schedule.decay_share", "0"),
    ("objective.hidden.first_share", "0"),
    ("objective.cross_tokenizer.gold_uld_weight", "0"),  # gold's exact part alone (read only with a student tokenizer)
    ("train.seed", "0"),
    ("train.min_lr_ratio", "0"),
    ("train.weight_decay", "0"),
    ("train.warmup_share", "0"),
    ("train.decay_share", "0"),
    ("train.grad_clip", "0"),
    ("train.eval_every_steps", "0"),
    ("train.checkpoint_every_steps", "0"),
}
REFUSED_AT_RUN = {("budget.flops", "1e30")}


def test_the_pinned_outcomes_name_real_cases():
    assert ACCEPTED | REFUSED_AT_RUN <= set(CASES)


def _expect(key: str, value: str) -> str:
    if (key, value) in ACCEPTED:
        return "trains"
    return "refused at run" if (key, value) in REFUSED_AT_RUN else "refused at load"


def _accepted_case(case: tuple[str, str]):
    """The cases that train are the slow ones (a few seconds each): marked slow, the rest are fast."""
    return pytest.param(*case, marks=pytest.mark.slow) if case in ACCEPTED | REFUSED_AT_RUN else case


@pytest.mark.parametrize("key, value", [_accepted_case(c) for c in CASES], ids=[f"{k}={v}" for k, v in CASES])
def test_a_numeric_value_trains_validly_or_is_one_line(tmp_path, capsys, key, value):
    expect = _expect(key, value)
    try:
        cfg = load_config("smoke", _overrides(key, value))
    except HldError as exc:
        assert expect == "refused at load", f"{key}={value} was refused: {exc.line()}"
        line = exc.line()
        assert "\n" not in line and " — " in line, line
        assert key.split(".")[-1] in line, line  # the message names the key
        argv = ["train", "--config", "smoke", "--out", str(tmp_path / "r"), *_overrides(key, value), "--quiet"]
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"hld: error: {line}"], err
        assert not (tmp_path / "r").exists()
        return
    assert expect != "refused at load", f"{key}={value} passed the config checks; expected a one-line refusal"
    given = yaml.safe_load(value)
    have = _get(cfg, key)
    assert have == given or (isinstance(given, str) and have == float(given)), (have, given)  # not clamped
    run = tmp_path / "r"
    rc = main(["train", "--config", "smoke", "--out", str(run), *_overrides(key, value), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    if expect == "refused at run":
        assert rc == 2 and len(err) == 1 and err[0].startswith("hld: error: ") and " — " in err[0], err
        return
    assert rc == 0, err
    assert _get(yaml.safe_load((run / "config.yaml").read_text()), key) == have
    summary = json.loads((run / "summary.json").read_text())
    assert math.isfinite(summary["val/ppl"]) and summary["steps"] >= 1
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r["lr"] >= 0 and math.isfinite(r["train/loss"]) for r in lines if "lr" in r)
