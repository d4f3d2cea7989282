"""The KD divergences by name (`objective.divergence`), and the reading of a config's spec of one:
`name` or `name(param=value, ...)`. A new divergence is a module beside this one, a line in CLASSES and
its test."""

from __future__ import annotations

import dataclasses
import re

from hld.distill.divergences.base import Divergence
from hld.distill.divergences.forward_kl import ForwardKL
from hld.distill.divergences.jsd import Jsd
from hld.distill.divergences.reverse_kl import ReverseKL
from hld.distill.divergences.skew_kl import SkewKL

CLASSES: tuple[type[Divergence], ...] = (ForwardKL, ReverseKL, Jsd, SkewKL)
REGISTRY: dict[str, type[Divergence]] = {c.name: c for c in CLASSES}
_SPEC = re.compile(r"^\s*([a-z_][a-z0-9_]*)\s*(?:\((.*)\))?\s*$")


def choices() -> str:
    """Every divergence with its parameters' defaults, for help texts and error lines."""
    return ", ".join(c().spec() for c in CLASSES)


def help_text() -> str:
    lines = [f"{c().spec()}: {c.help}" for c in CLASSES]
    return "KD divergence D(teacher_T, student_T), `name` or `name(param=value)`: " + "; ".join(lines)


def parse(spec: str) -> Divergence:
    """The divergence `spec` names, with its parameters (defaults for those not given). A ValueError
    names what is wrong: an unknown name, an unknown parameter, a value that is not a number or is out of
    its range."""
    m = _SPEC.match(spec) if isinstance(spec, str) else None
    if m is None or m.group(1) not in REGISTRY:
        raise ValueError(f"{spec!r} is not one of {choices()}")
    cls = REGISTRY[m.group(1)]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, float] = {}
    for item in filter(None, (x.strip() for x in (m.group(2) or "").split(","))):
        key, _, raw = item.partition("=")
        key = key.strip()
        if key not in fields:
            raise ValueError(f"{spec!r}: {cls.name} has no parameter {key!r} (it takes: {cls().spec()})")
        try:
            values[key] = float(raw)
        except ValueError:
            raise ValueError(f"{spec!r}: {cls.name}'s {key}={raw.strip()!r} is not a number") from None
        lo, hi, lo_in, hi_in = fields[key].metadata["range"]
        v = values[key]
        if not ((lo <= v if lo_in else lo < v) and (v <= hi if hi_in else v < hi)):
            ends = f"{'[' if lo_in else '('}{lo:g}, {hi:g}{']' if hi_in else ')'}"
            raise ValueError(f"{spec!r}: {cls.name}'s {key}={v:g} is outside {ends}")
    return cls(**values)
