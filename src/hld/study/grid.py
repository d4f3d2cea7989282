"""A study's cells: arms x students x budgets x a grid of shared hyperparameters x seeds, each cell an
ordinary run. This module expands a study (hld.study.spec: the YAML, read and checked) into cells.

Two accountings from one study (`equal_flops`): the budgets give every arm the same student tokens
(the teacher amortised: one shared cache per seed), and each teacher-free arm (ce) gets a second
cell per configuration and seed whose budget is the FLOPs the `equal_flops` arm's cell spent with
the teacher's forward counted (read from that cell's summary once it has trained, so the match is
exact). The second cell's configuration is the first's plus `__eqflops`; cell.json names the
configuration it matches (`match`) and its accounting.

A cell's id reads `<student>__<budget>__<grid point>__s<seed>__<arm>`; its *configuration* is the
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
from dataclasses import dataclass
from typing import Any, Optional

import yaml

from hld.config import BudgetConfig, RunConfig, load_config
from hld.errors import HldError
from hld.study.naming import cell_id, configuration_id
from hld.study.signals import OVERRIDES, with_signal
from hld.study.spec import Study

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
    has no teacher term), kd no hidden-loss key, and an HLD arm whose grid point sets a loss that reads
    the raw teacher state (`HiddenLoss.normalized_target` false: `lens`, the teacher's logit lens) no
    `normalize_teacher`. A grid over such keys runs that arm's cell once per seed, shared by the grid
    points that differ only in them (KD against 24 HLD variants: 1 KD cell per seed, not 24)."""
    if arm == "ce":
        return key.startswith("objective.")
    if arm == "kd":
        return key.startswith("objective.hidden.")
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
                student, budget, _read_point(study, "ce", full), seed, of=cell_id(of, seed, study.equal_flops), match=of
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


def _flops_cell(student: str, budget: dict, point: dict, seed: int, *, of: str, match: str) -> Cell:
    """The ce cell at the FLOPs the cell `of` spends (its budget is set when `of` has run), paired with
    the configuration `match` (of's)."""
    conf = f"{configuration_id(student, budget, point)}__eqflops"
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
