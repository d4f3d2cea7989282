"""The report's lines that pair a distilled arm with itself on two teacher signals (hld.study.signals):
kd[topk] vs kd[online] — the cached-KD vs full-KD cell difference — kd[sampled] vs kd[online] and
kd[topk] vs kd[sampled], and the same for each HLD arm of the study.

Two cells pair when they share the arm, the seed and the configuration but for its signal (the id
without its `__<signal>`), on the study's budgets: equal student tokens, and equal FLOPs too, since
every signal charges the teacher's forward to each token alike (hld.train.budget). Δ =
metric(arm[signal]) − metric(arm[baseline signal]) per configuration over its seeds, with the same
statistics as every other line of the report (`hld.study.pairs.make_comparison`); the report's
verdicts Holm-adjust them together with the arm-vs-arm lines and give each its power.
"""

from __future__ import annotations

import math

from hld.study.pairs import Comparison, make_comparison
from hld.study.signals import PAIRS, label
from hld.study.spec import ARMS


def base_configuration(row: dict) -> str:
    """A row's configuration without its signal: what a cell on another signal shares with it."""
    conf = row.get("match") or row["configuration"]
    tail = f"__{row['signal']}"
    return conf[: -len(tail)] if conf.endswith(tail) else conf


def signal_comparisons(rows: list[dict], metrics: tuple[str, ...] = ("val_loss",)) -> list[Comparison]:
    """One Comparison per metric, distilled arm and pair of signals (`PAIRS`) that both ran in at least
    one (configuration, seed)."""
    distilled = [r for r in rows if r.get("signal") and r.get("accounting", "budget") == "budget"]
    order = {a: i for i, a in enumerate(ARMS)}
    arms = sorted({r["arm"] for r in distilled}, key=lambda a: (order.get(a, 99), a))
    out = []
    for metric in metrics:
        value = {}  # (arm, configuration without signal, seed, signal) -> (value, flops)
        for r in distilled:
            v = r.get(metric)
            if v is not None and math.isfinite(float(v)):
                value[(r["arm"], base_configuration(r), r["seed"], r["signal"])] = (float(v), r.get("flops"))
        for arm in arms:
            for signal, baseline in PAIRS:
                diffs: dict[str, list[float]] = {}
                ratios: dict[str, list[float]] = {}
                for (a, conf, seed, s), (v, fl) in sorted(value.items()):
                    if a != arm or s != signal or (arm, conf, seed, baseline) not in value:
                        continue
                    bv, bfl = value[(arm, conf, seed, baseline)]
                    diffs.setdefault(conf, []).append(v - bv)
                    if fl and bfl:
                        ratios.setdefault(conf, []).append(fl / bfl)
                if not diffs:
                    continue
                used = [r for r in distilled if r["arm"] == arm and r["signal"] in (signal, baseline)]
                out.append(
                    make_comparison(
                        label(arm, signal),
                        label(arm, baseline),
                        diffs,
                        ratios,
                        metric=metric,
                        view="budget",
                        used=used,
                    )
                )
    return out


def is_signal_pair(c: Comparison) -> bool:
    return c.arm.endswith("]") and c.baseline.endswith("]")


def signal_note(comparisons: list[Comparison]) -> list[str]:
    """The report's paragraph on the cross-signal lines (none when the study has none)."""
    if not any(is_signal_pair(c) for c in comparisons):
        return []
    return [
        "Lines `arm[signal] vs arm[signal]` pair one arm with itself on two teacher signals — `topk` the "
        "offline top-k cache, `sampled` a cache of tokens sampled from the teacher, `online` the teacher in "
        "the loop with its full distribution — same configuration otherwise and same seed: "
        "kd[topk] vs kd[online] is the cached-KD vs full-KD cell difference. Both sides charge the teacher's "
        "forward to every token, so they are at equal student tokens and equal FLOPs; a cache's build cost "
        "is its own line of the setup.",
        "",
    ]
