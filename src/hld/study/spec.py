"""A study: arms x students x budgets x a grid of shared hyperparameters x seeds, each cell an
ordinary run. This module reads and checks the study YAML (the cells: hld.study.grid).

    name: demo-study
    base: demo                        # run-config preset name or YAML path
    overrides: []                     # dotted overrides applied to every cell
    arms: [ce, kd, hld-joint, hld-first]
    students: [tiny-1l, tiny-2l]      # student.preset values
    budgets: [{tokens: 32768}]        # each a dict of budget.* keys
    grid: {train.lr: [1.0e-3, 3.0e-3], objective.alpha: [0.5]}   # cartesian product
    seeds: [0]
    tasks: [shipped]                  # downstream tasks (lm-eval) scored on every cell and the teacher
    task_limit: 200                   # the first N items of each task (null: all)
    score_students: true              # false: only the teacher is scored on the tasks
    equal_flops: kd                   # also run ce at the FLOPs kd's cell spent, teacher counted
    signals: [topk]                   # teacher signals the distilled arms train on: topk, sampled, online
    signal_overrides: {sampled: [teacher.cache_samples=20]}   # dotted overrides of one signal's cells
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from hld.config import (
    PRESET_DIR,
    BudgetConfig,
    ObjectiveConfig,
    RunConfig,
    field_help,
    read_yaml,
    resolve_config_path,
)
from hld.errors import HldError
from hld.study.naming import budget_id, fmt_value
from hld.study.signals import SIGNALS, parse_signals

STUDY_DIR = PRESET_DIR / "studies"
ARMS: tuple[str, ...] = typing.get_args(typing.get_type_hints(ObjectiveConfig)["method"])

# key -> help: the study schema (the YAML comment and the error messages' source)
STUDY_KEYS = {
    "name": "study name (default output directory studies/<name>)",
    "base": "run config every cell starts from: a preset name or a YAML path (relative to this file)",
    "overrides": "dotted overrides applied to every cell, e.g. [data.seq_len=64]",
    "arms": f"training objectives to compare, a subset of {list(ARMS)}",
    "students": "student.preset values, one set of cells per student size",
    "budgets": "list of budgets, each a mapping of budget.* keys, e.g. [{tokens: 32768}]",
    "grid": "shared hyperparameters: dotted key -> list of values; cells take the cartesian product",
    "seeds": "train.seed values; seeds are the replicates of a configuration",
    "tasks": "downstream tasks scored through lm-eval on every finished cell and on the teacher: harness "
    "names, `shipped` (the offline tasks) or `paper`; [] for none",
    "task_limit": "score only the first N items of each task (null: every item)",
    "score_students": "score the students on `tasks` too (false: the teacher only, e.g. when students this "
    "small stay at chance and cannot separate the arms)",
    "equal_flops": "an arm with a teacher (e.g. kd): every teacher-free arm (ce) also runs at the FLOPs that "
    "arm's cell spent with the teacher counted, for the equal-FLOPs verdicts (null: equal "
    "budgets only)",
    "signals": f"teacher signals every distilled arm trains on, a subset of {list(SIGNALS)}: topk = the offline "
    "top-k cache, sampled = a cache of sampled tokens, online = the teacher in the loop (full distribution); "
    "default [topk]",
    "signal_overrides": "dotted overrides for the cells of one signal only, e.g. {sampled: [teacher.cache_samples=20]} "
    "(checked only for the signals the study lists)",
}
REQUIRED = ("name", "arms", "students", "budgets")
# keys a study sets itself, per cell: a grid or override may not set them
CONTROLLED = {
    "name": "the cell id",
    "objective.method": "arms:",
    "student.preset": "students:",
    "train.seed": "seeds:",
    "teacher.cache": "the study's shared teacher caches",
    "teacher.cache_signal": "signals:",
}


@dataclass(frozen=True)
class Study:
    name: str
    base: str
    overrides: tuple[str, ...]
    arms: tuple[str, ...]
    students: tuple[str, ...]
    budgets: tuple[dict, ...]  # budget.* key (without the prefix) -> value
    grid: dict = field(default_factory=dict)  # dotted key -> tuple of values
    seeds: tuple[int, ...] = (0,)
    tasks: tuple[str, ...] = ()  # downstream tasks (expanded: `shipped` -> its task names)
    task_limit: Optional[int] = None
    score_students: bool = True
    equal_flops: Optional[str] = None  # arm whose spent FLOPs (teacher counted) the ce arm is rerun at
    source: Optional[str] = None  # the YAML it was read from
    signals: tuple[str, ...] = ("topk",)  # teacher signals of the distilled arms (hld.study.signals)
    signal_overrides: dict = field(default_factory=dict)  # signal -> its cells' own dotted overrides


def resolve_study_path(name_or_path: str) -> Path:
    return resolve_config_path(name_or_path, STUDY_DIR, kind="study config")


def load_study(name_or_path: str, overrides: Optional[list[str]] = None) -> Study:
    """Read a study YAML. `overrides` whose key is a study key (`arms=[ce,kd]`, `budgets=[{tokens: 512}]`)
    replace that entry; every other (dotted) override is appended to the study's run overrides."""
    path = resolve_study_path(name_or_path)
    raw = read_yaml(path)
    extra = []
    for item in overrides or []:
        key, sep, text = item.partition("=")
        if sep and key.strip() in STUDY_KEYS:
            try:
                raw[key.strip()] = yaml.safe_load(text)
            except yaml.YAMLError as exc:
                raise HldError(f"study override {item!r} is not valid YAML", "quote it, e.g. 'arms=[ce, kd]'") from exc
        else:
            extra.append(item)
    study = parse_study(raw, source=path)
    return dataclasses.replace(study, overrides=study.overrides + _str_list({"overrides": extra}, "overrides"))


def parse_study(raw: dict, *, source: Optional[Path] = None) -> Study:
    where = f"study {source}" if source else "study"
    unknown = sorted(set(raw) - set(STUDY_KEYS))
    if unknown:
        raise HldError(f"unknown key {unknown[0]!r} in {where}", f"valid keys: {', '.join(STUDY_KEYS)}")
    missing = [k for k in REQUIRED if k not in raw]
    if missing:
        raise HldError(f"{where} lacks {missing[0]!r}", f"add `{missing[0]}:` ({STUDY_KEYS[missing[0]]})")
    base = str(raw.get("base", "demo"))
    if source is not None and (source.parent / base).is_file():
        base = str(source.parent / base)
    return Study(
        name=_name(raw["name"]),
        base=base,
        overrides=_str_list(raw, "overrides"),
        arms=_arms(raw["arms"]),
        students=_nonempty_list(raw, "students", str),
        budgets=_budgets(raw["budgets"]),
        grid=_grid(raw.get("grid") or {}),
        seeds=_nonempty_list(raw, "seeds", int, default=[0]),
        tasks=_tasks(raw.get("tasks")),
        task_limit=_task_limit(raw.get("task_limit")),
        score_students=_bool(raw, "score_students"),
        equal_flops=_equal_flops(raw),
        source=str(source) if source else None,
        signals=parse_signals(raw.get("signals")),
        signal_overrides=_signal_overrides(raw),
    )


def _signal_overrides(raw: dict) -> dict:
    """signal -> its overrides; only the study's own signals are checked (a sampled-only key loads where
    the study runs without `sampled`)."""
    value = raw.get("signal_overrides") or {}
    if not isinstance(value, dict) or not all(k in SIGNALS for k in value):
        raise HldError(
            f"study signal_overrides: {value!r} should map teacher signals ({', '.join(SIGNALS)}) to override lists",
            "write e.g. signal_overrides: {sampled: [teacher.cache_samples=20]}",
        )
    listed = parse_signals(raw.get("signals"))
    return {
        k: _str_list({"signal_overrides": v}, "signal_overrides") if k in listed else tuple(v or ())
        for k, v in value.items()
    }


def _bool(raw: dict, key: str, default: bool = True) -> bool:
    value = raw.get(key, default)
    if not isinstance(value, bool):
        raise HldError(f"study {key}: {value!r} should be true or false", f"write {key}: true")
    return value


def _equal_flops(raw: dict) -> Optional[str]:
    value = raw.get("equal_flops")
    if value is None:
        return None
    arms = list(raw.get("arms") or [])
    if value not in arms or value == "ce" or "ce" not in arms:
        raise HldError(
            f"study equal_flops: {value!r} should name a distilled arm of the study, with ce among the arms",
            "write e.g. equal_flops: kd (or null)",
        )
    return str(value)


def _tasks(value: Any) -> tuple[str, ...]:
    from hld.eval.harness import expand_tasks  # pure: needs no lm-eval to read a study

    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise HldError(f"study tasks: {value!r} should be a list of task names", "write e.g. tasks: [shipped]")
    return tuple(expand_tasks(value))


def _task_limit(value: Any) -> Optional[int]:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise HldError(
            f"study task_limit: {value!r} should be a positive integer or null", "write e.g. task_limit: 200"
        )
    return value


def _name(value: Any) -> str:
    if not isinstance(value, (str, int)) or not re.fullmatch(r"[A-Za-z0-9._-]+", str(value)):
        raise HldError(f"study name {value!r} is not a plain name", "use letters, digits, '.', '_' or '-'")
    return str(value)


def _nonempty_list(raw: dict, key: str, tp: type, default: Optional[list] = None) -> tuple:
    value = raw.get(key, default)
    ok = isinstance(value, list) and value and all(isinstance(v, tp) and not isinstance(v, bool) for v in value)
    if not ok:
        raise HldError(
            f"study {key}: {value!r} should be a non-empty list of {tp.__name__}",
            f"write e.g. {key}: [{'0' if tp is int else 'tiny-2l'}]",
        )
    if len(set(value)) != len(value):
        raise HldError(f"study {key} repeats a value ({value})", "list each value once")
    return tuple(value)


def _str_list(raw: dict, key: str) -> tuple[str, ...]:
    value = raw.get(key) or []
    if not isinstance(value, list) or not all(isinstance(v, str) and "=" in v for v in value):
        raise HldError(f"study {key} must be a list of 'key=value' strings", "write e.g. [data.seq_len=64]")
    for item in value:
        _check_settable(item.split("=", 1)[0].strip(), f"study {key}")
    return tuple(value)


def _arms(value: Any) -> tuple[str, ...]:
    arms = _nonempty_list({"arms": value}, "arms", str)
    bad = [a for a in arms if a not in ARMS]
    if bad:
        raise HldError(f"unknown arm {bad[0]!r} in study arms", f"choose from {', '.join(ARMS)}")
    return arms


def _budgets(value: Any) -> tuple[dict, ...]:
    names = [f.name for f in dataclasses.fields(BudgetConfig)]
    if not isinstance(value, list) or not value or not all(isinstance(b, dict) and b for b in value):
        raise HldError(
            f"study budgets: {value!r} should be a non-empty list of mappings", "write e.g. budgets: [{tokens: 32768}]"
        )
    for b in value:
        for k, v in b.items():
            if k not in names:
                raise HldError(f"unknown budget key {k!r} in study budgets", f"valid keys: {', '.join(names)}")
            if not _is_scalar(v):
                raise HldError(f"study budget {k}={v!r} is not a single value", "give one number per budget entry")
    if len({budget_id(b) for b in value}) != len(value):
        raise HldError("study budgets repeat a budget", "list each budget once")
    return tuple(dict(b) for b in value)


def _grid(value: Any) -> dict:
    if not isinstance(value, dict):
        raise HldError(
            f"study grid must be a mapping of dotted keys to lists, got {value!r}",
            "write e.g. grid: {train.lr: [1.0e-3, 3.0e-3]}",
        )
    out = {}
    for key, values in value.items():
        _check_settable(str(key), "study grid")
        if not isinstance(values, list) or not values or not all(_is_scalar(v) for v in values):
            raise HldError(
                f"study grid {key}: {values!r} should be a non-empty list of single values",
                f"write e.g. {key}: [0.5, 1.0]",
            )
        if len({fmt_value(v) for v in values}) != len(values):
            raise HldError(f"study grid {key} repeats a value ({values})", "list each value once")
        out[str(key)] = tuple(values)
    return out


def _check_settable(key: str, where: str) -> None:
    if key in CONTROLLED or key.startswith("budget."):
        set_by = CONTROLLED.get(key, "budgets:")
        raise HldError(f"{where} sets {key}, which the study sets per cell", f"use {set_by} instead")
    if key not in {k for k, _, _ in field_help(RunConfig)}:
        raise HldError(f"{where} names {key!r}, which is not a run config key", "see `hld config` for the keys")


def _is_scalar(v: Any) -> bool:
    return isinstance(v, (str, int, float, bool)) or v is None
