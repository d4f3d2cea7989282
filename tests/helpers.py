"""What several test modules share (not fixtures: those are in conftest.py): the checked-in tiny
assets, the overrides that point a config at them, the trainable parameters of a built run by name,
and the report's verdict line as a pattern. Imported as `helpers` (pytest puts tests/ on sys.path for
its rootdir conftest.py; tests/dist_worker.py runs from tests/)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

ASSETS = Path(__file__).resolve().parent / "assets"
TINY_TEACHER = ASSETS / "tiny_teacher"
C4_TRAIN = str(ASSETS / "c4" / "c4-train.*.json.gz")
C4_VALIDATION = str(ASSETS / "c4" / "c4-validation.*.json.gz")

# Student's t, 97.5% quantile, by degrees of freedom (scipy.stats.t.ppf(0.975, df))
T975 = {1: 12.706204736, 2: 4.302652730, 3: 3.182446305, 4: 2.776445105}

# one verdict line of report.md
VERDICT = re.compile(
    r"^- \*\*(?P<arm>[\w-]+) vs (?P<base>[\w-]+)\*\*: \S+ beat \S+ in (?P<wins>\d+) of (?P<n>\d+) configurations; "
    r"mean Δ val loss (?P<mean>[+-]\d+\.\d+) nats \(95% CI \[(?P<lo>[+-]\d+\.\d+), (?P<hi>[+-]\d+\.\d+)\] over "
    r"\d+ configurations\), val ppl ratio (?P<ratio>\d+\.\d+)")


def tiny_overrides() -> list[str]:
    """Dotted overrides that turn any shipped config into a seconds-long CPU run on the fixtures
    (4 steps of 4 x 32 tokens). fp32 is pinned so results do not depend on the CPU's bf16 support."""
    return [f"teacher.model={TINY_TEACHER}", f"data.train={C4_TRAIN}", f"data.validation={C4_VALIDATION}",
            "student.preset=tiny-2l", "data.seq_len=32", "train.batch_size=4", "budget.tokens=512",
            "train.precision=float32", "teacher.dtype=float32"]


def named_params(s) -> dict[str, torch.nn.Parameter]:
    """A built run's (`hld.train.loop.Setup`) trained parameters: `student.<name>`, `projectors.<name>`."""
    out = {f"student.{k}": p for k, p in s.student.named_parameters()}
    if s.projectors is not None:
        out.update({f"projectors.{k}": p for k, p in s.projectors.named_parameters()})
    return out
