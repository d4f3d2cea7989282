"""Teacher signals: which teacher output a study's distilled cells learn from (the study key `signals`).

    signals: [topk, sampled, online]   # default [topk]: every study before this key, unchanged

topk     the group's offline cache of the teacher's top-k logits (`teacher.cache_top_k`, its codec):
         what every study did before `signals` existed
sampled  an offline cache of tokens sampled from the teacher (`teacher.cache_signal=sampled`, sized by
         `teacher.cache_samples`): its own cache group, since it holds other arrays than a top-k cache
online   no cache: the teacher runs in the training loop and KD reads its full distribution (unless the
         run config truncates it with `objective.top_k`); its forward is charged to every step's tokens
         as a cache's is (`budget.count_teacher`, hld.train.budget), so FLOPs stay equal across signals

A signal is one more axis of the study, outside the grid because its values are not run-config values
(online is the *absence* of `teacher.cache`, which the study controls). With the default `[topk]` ids
are as before; otherwise a distilled cell's configuration id ends in `__<signal>`
(`tiny-2l__tok4096__online__s0__kd`). ce has no teacher: it ignores the signal like a grid key it
ignores (`hld.study.spec.ignores`), runs once per configuration and seed and serves every signal's
configuration, so kd[online] vs ce pairs with the same ce cells as kd[topk] vs ce.

The report pairs each distilled arm with itself on two signals, same configuration otherwise and same
seed (`hld.study.signals`): kd[topk] vs kd[online] is the cached-KD vs full-KD cell difference.
"""

from __future__ import annotations

from typing import Any

from hld.distill.signals.registry import KINDS
from hld.errors import HldError

SIGNALS = tuple(KINDS)  # the registered teacher-signal kinds: topk, sampled, online
DEFAULT = ("topk",)
# what a cell on the signal adds to its overrides (online: nothing, and no cache group: `cached`)
OVERRIDES: dict[str, tuple[str, ...]] = {
    "topk": (),
    "sampled": ("teacher.cache_signal=sampled",),
    "online": (),
}
# the report's cross-signal lines, (signal, baseline signal): Δ = metric(arm[signal]) − metric(arm[baseline])
PAIRS = (("topk", "online"), ("sampled", "online"), ("topk", "sampled"))


def parse_signals(value: Any) -> tuple[str, ...]:
    """The study's `signals` (None: the default)."""
    if value is None:
        return DEFAULT
    if isinstance(value, str):
        value = [value]
    ok = isinstance(value, list) and value and all(isinstance(v, str) for v in value)
    if not ok:
        raise HldError(
            f"study signals: {value!r} should be a non-empty list of signals", f"write e.g. signals: {list(SIGNALS)}"
        )
    bad = [v for v in value if v not in SIGNALS]
    if bad:
        raise HldError(f"unknown teacher signal {bad[0]!r} in study signals", f"choose from {', '.join(SIGNALS)}")
    if len(set(value)) != len(value):
        raise HldError(f"study signals repeat a value ({value})", "list each signal once")
    return tuple(value)


def named(signals: tuple[str, ...]) -> bool:
    """Do the study's ids name the signal? Not for the default, so earlier studies keep their ids."""
    return tuple(signals) != DEFAULT


def with_signal(configuration: str, signals: tuple[str, ...], signal: str) -> str:
    """A configuration id on the signal: `<configuration>__<signal>`, or unchanged for the default."""
    return f"{configuration}__{signal}" if named(signals) else configuration


def cached(signal: str) -> bool:
    """Does a cell on this signal read an offline cache (and so belong to a cache group)?"""
    return signal != "online"


def signal_of(cfg: dict) -> str:
    """The signal a finished run trained on, from its resolved config (for rows without cell.json):
    online without a cache, else the cache's own signal (`teacher.cache_signal`, topk where the
    config has no such key). A ce run has none ("")."""
    if cfg["objective"]["method"] == "ce":
        return ""
    teacher = cfg["teacher"]
    return str(teacher.get("cache_signal") or "topk") if teacher.get("cache") else "online"


def label(arm: str, signal: str) -> str:
    """`kd[online]`: an arm on a signal, as the report's lines name it."""
    return f"{arm}[{signal}]"


def arm_label(row: dict, vary: bool) -> str:
    """A results row's arm as the report names it: `kd[online]` when the study varies the signal (ce,
    without one, stays `ce`), else `kd`."""
    return label(row["arm"], row["signal"]) if vary and row.get("signal") else row["arm"]
