"""A study and its cells: the study YAML, read and checked, expanded into cells (each an ordinary run)
with their names.

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

Cells: arms x students x budgets x grid points x seeds. Two accountings from one study (`equal_flops`):
the budgets give every arm the same student tokens (the teacher amortised: one shared cache per seed),
and each teacher-free arm (ce) gets a second cell per configuration and seed whose budget is the FLOPs
the `equal_flops` arm's cell spent with the teacher's forward counted (read from that cell's summary
once it has trained, so the match is exact). The second cell's configuration is the first's plus
`__eqflops`; cell.json names the configuration it matches (`match`) and its accounting.

Names: a cell's id reads `<student>__<budget>__<grid point>__s<seed>__<arm>`, short, filesystem-safe
and distinct for distinct values (the run directory of a cell is its id); its *configuration* is the
id without seed and arm: the unit that pairs HLD with KD (seeds are replicates within it).

`signals` (hld.study.signals): the distilled arms train once per teacher signal — `topk` (the group's
offline top-k cache, the default and what studies did before the key), `sampled` (a cache of sampled
tokens, `teacher.cache_signal=sampled`, its own cache group) and `online` (no cache: the teacher runs
in the loop, KD on its full distribution). Unless the study's signals are the default `[topk]`, a
distilled cell's configuration ends in `__<signal>`; ce ignores the signal (one cell per seed serving
every signal's configuration), and an equal-FLOPs ce cell matches the first signal's cell and serves
the others (every signal charges the teacher's forward to each token alike).
"""

from __future__ import annotations

import dataclasses
import itertools
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
    load_config,
    read_yaml,
    resolve_config_path,
)
from hld.errors import HldError
from hld.study.signals import OVERRIDES, SIGNALS, parse_signals, with_signal

# --------------------------------------------------------------------------- names

SHORT = {"temperature": "T", "tokens": "tok", "flops": "fl", "count_teacher": "teach"}


def fmt_value(v: Any) -> str:
    """A value as it appears in an id: short, filesystem-safe, distinct for distinct values."""
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, float):
        return f"{v:g}"
    return re.sub(r"[^A-Za-z0-9.+-]", "-", str(v))


def _short_names(keys: list[str]) -> dict[str, str]:
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (SHORT.get(s, s) if last.count(s) == 1 else k.replace(".", "-")) for k, s in zip(keys, last)}


def budget_id(budget: dict) -> str:
    return "_".join(f"{SHORT.get(k, k)}{fmt_value(v)}" for k, v in budget.items())


def configuration_id(student: str, budget: dict, point: dict) -> str:
    names = _short_names(list(point))
    parts = [fmt_value(student), budget_id(budget)]
    if point:
        parts.append("_".join(f"{names[k]}{fmt_value(v)}" for k, v in point.items()))
    return "__".join(parts)


def cell_id(configuration: str, seed: int, arm: str) -> str:
    return f"{configuration}__s{seed}__{arm}"


# --------------------------------------------------------------------------- the study file

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


# --------------------------------------------------------------------------- cells

# budget keys that each set a run's length on their own (a budget naming one clears the others)
LENGTH_KEYS = tuple(k for k in ("tokens", "flops") if k in {f.name for f in dataclasses.fields(BudgetConfig)})


@dataclass(frozen=True)
class Cell:
    id: str
    configuration: str  # id without seed and arm
    arm: str
    student: str
    budget: dict
    point: dict  # grid key -> value
    seed: int
    overrides: tuple[str, ...]  # the cell's own overrides, applied after the study's
    accounting: str = "budget"  # "budget": the study's budget as given; "flops": matched to `flops_of`
    match: str = ""  # the configuration whose cells it is paired with (its own, or the one it matches)
    flops_of: Optional[str] = None  # "flops" cells: the cell id whose spent FLOPs are this cell's budget
    serves: tuple[str, ...] = ()  # other configurations this cell stands for (grid keys its arm ignores)
    signal: Optional[str] = "topk"  # the teacher signal it trains on (None: ce, no teacher)

    def describe(self) -> dict:
        return {
            "cell": self.id,
            "configuration": self.configuration,
            "arm": self.arm,
            "student": self.student,
            "budget": dict(self.budget),
            "grid": dict(self.point),
            "seed": self.seed,
            "accounting": self.accounting,
            "match": self.match or self.configuration,
            "flops_of": self.flops_of,
            "serves": list(self.serves),
            "signal": self.signal,
        }


def ignores(arm: str, key: str, point: Optional[dict] = None) -> bool:
    """Does `arm` ignore the config key `key` (at the grid point `point`)? ce reads no objective key (it
    has no teacher term), kd no hidden-loss key (nor the pooling of states across tokenizers), and an HLD
    arm whose grid point sets a loss that reads the raw teacher state (`HiddenLoss.normalized_target` false:
    `lens`, the teacher's logit lens) no `normalize_teacher`. A grid over such keys runs that arm's cell
    once per seed, shared by the grid points that differ only in them (KD against 24 HLD variants: 1 KD
    cell per seed, not 24)."""
    if arm == "ce":
        return key.startswith("objective.")
    if arm == "kd":  # nor how hidden states are pooled across tokenizers
        return key.startswith("objective.hidden.") or key == "objective.cross_tokenizer.pooling"
    loss = (point or {}).get("objective.hidden.loss")
    if key != "objective.hidden.normalize_teacher" or loss is None:
        return False
    from hld.distill.hidden_losses.registry import REGISTRY  # torch: only once a grid sets the loss

    return loss in REGISTRY and not REGISTRY[loss].normalized_target


# --------------------------------------------------------------------------- expansion


def _override(key: str, value: Any) -> str:
    text = value if isinstance(value, str) else yaml.safe_dump(value, default_flow_style=True).splitlines()[0]
    return f"{key}={text}"


def expand(study: Study) -> list[Cell]:
    """Every cell, arms innermost so that each configuration's arms run next to each other. An arm
    that ignores some grid keys of several values (`ignores`), or the signal (ce), gets one cell per
    value of the keys it reads; that cell `serves` every configuration it stands for, and is paired
    with each."""
    keys = list(study.grid)
    cells: list[Cell] = []
    at: dict[str, int] = {}  # cell id -> its index in `cells`
    for student, budget, values, signal, seed, arm in itertools.product(
        study.students,
        study.budgets,
        itertools.product(*(study.grid[k] for k in keys)),
        study.signals,
        study.seeds,
        study.arms,
    ):
        full = dict(zip(keys, values))
        point = _read_point(study, arm, full)
        own_signal = None if arm == "ce" else signal
        conf = _configuration(study, student, budget, point, own_signal)
        served = _configuration(study, student, budget, full, signal)
        cid = cell_id(conf, seed, arm)
        if conf != served and cid in at:  # already planned for another grid point: it serves this one too
            _add_serves(cells, at[cid], served)
            continue
        ov = _cell_overrides(arm, student, seed, cid, budget, point) + _signal_cell_overrides(study, own_signal)
        at[cid] = len(cells)
        cells.append(
            Cell(
                id=cid,
                configuration=conf,
                arm=arm,
                student=student,
                budget=dict(budget),
                point=point,
                seed=seed,
                overrides=tuple(ov),
                match=conf,
                serves=(served,) if conf != served else (),
                signal=own_signal,
            )
        )
        if study.equal_flops and arm == study.arms[-1]:  # after the configuration's arms: its match has run
            read = _read_point(study, study.equal_flops, full)
            of = _configuration(study, student, budget, read, signal)
            flops = _flops_cell(
                student,
                budget,
                _read_point(study, "ce", full),
                seed,
                of=cell_id(of, seed, study.equal_flops),
                match=of,
                named=read,
            )
            if flops.id not in at:
                at[flops.id] = len(cells)
                cells.append(flops)
            elif signal != study.signals[0] and cells[at[flops.id]].match == _configuration(
                study, student, budget, read, study.signals[0]
            ):
                _add_serves(cells, at[flops.id], of)  # the same cell on another signal: it spent the same FLOPs
    ids = [c.id for c in cells]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise HldError(f"two study cells get the same id {dup!r}", "make the grid's values distinct when printed")
    return cells


def _signal_cell_overrides(study: Study, signal: Optional[str]) -> list[str]:
    if signal is None:  # ce: no teacher
        return []
    return list(OVERRIDES[signal]) + list(study.signal_overrides.get(signal, ()))


def _configuration(study: Study, student: str, budget: dict, point: dict, signal: Optional[str]) -> str:
    """A configuration id, on `signal` (None: a cell without a teacher, which ignores it)."""
    conf = configuration_id(student, budget, point)
    return conf if signal is None else with_signal(conf, study.signals, signal)


def _add_serves(cells: list[Cell], index: int, configuration: str) -> None:
    c = cells[index]
    if configuration not in c.serves:
        cells[index] = dataclasses.replace(c, serves=c.serves + (configuration,))


def _read_point(study: Study, arm: str, full: dict) -> dict:
    """The grid point as `arm` sees it: without the keys it ignores that take several values (a key of
    one value stays, so a grid that varies nothing the arm ignores names its cells as before)."""
    return {k: v for k, v in full.items() if not (ignores(arm, k, full) and len(study.grid[k]) > 1)}


def _cell_overrides(arm: str, student: str, seed: int, cid: str, budget: dict, point: dict) -> list[str]:
    ov = [f"objective.method={arm}", f"student.preset={student}", f"train.seed={seed}", f"name={cid}"]
    ov += [_override(f"budget.{k}", v) for k, v in budget.items()]
    if any(k in LENGTH_KEYS for k in budget):  # the base's other length key would contradict this one
        ov += [f"budget.{k}=null" for k in LENGTH_KEYS if k not in budget]
    return ov + [_override(k, v) for k, v in point.items()]


def _flops_cell(
    student: str, budget: dict, point: dict, seed: int, *, of: str, match: str, named: Optional[dict] = None
) -> Cell:
    """The ce cell at the FLOPs the cell `of` spends (its budget is set when `of` has run), paired with
    the configuration `match` (of's). `point`: the grid values ce reads; `named`: those `of` reads, which name
    the cell, so a grid over a key ce ignores and `of` reads (the cross-tokenizer loss) gets one such cell
    per value, each matched to its own `of`."""
    conf = f"{configuration_id(student, budget, named if named is not None else point)}__eqflops"
    cid = cell_id(conf, seed, "ce")
    ov = [o for o in _cell_overrides("ce", student, seed, cid, budget, point) if not o.startswith("budget.")]
    return Cell(
        id=cid,
        configuration=conf,
        arm="ce",
        student=student,
        budget={"flops": f"of {of}"},
        point=dict(point),
        seed=seed,
        overrides=tuple(ov),
        accounting="flops",
        match=match,
        flops_of=of,
        signal=None,
    )


def flops_overrides(spent_flops: float) -> list[str]:
    """A flops cell's budget once its match has run: that FLOP count, every other length key cleared."""
    return [f"budget.flops={spent_flops!r}"] + [f"budget.{k}=null" for k in LENGTH_KEYS if k != "flops"]


def cell_config(study: Study, cell: Cell, extra: Optional[list[str]] = None) -> RunConfig:
    """The cell's resolved run config: base, the study's overrides, then the cell's (then `extra`)."""
    try:
        return load_config(study.base, list(study.overrides) + list(cell.overrides) + list(extra or []))
    except HldError as exc:
        raise HldError(f"study cell {cell.id}: {exc.problem}", exc.fix) from exc
