"""Names of study cells: a configuration id (student, budget, grid point) and a cell id (plus seed and
arm), short, filesystem-safe and distinct for distinct values; the run directory of a cell is its id."""

from __future__ import annotations

import re
from typing import Any

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
