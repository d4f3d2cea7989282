"""Shared fixtures: the checked-in tiny assets, the overrides that point a config at them, and a
private token cache per test (nothing is written into the repo or ~/.cache)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# tests never reach the network: a missing local path must fail, not fall back to the hub
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

ASSETS = Path(__file__).resolve().parent / "assets"
TINY_TEACHER = ASSETS / "tiny_teacher"
C4_TRAIN = str(ASSETS / "c4" / "c4-train.*.json.gz")
C4_VALIDATION = str(ASSETS / "c4" / "c4-validation.*.json.gz")


def tiny_overrides() -> list[str]:
    """Dotted overrides that turn any shipped config into a seconds-long CPU run on the fixtures
    (4 steps of 4 x 32 tokens). fp32 is pinned so results do not depend on the CPU's bf16 support."""
    return [f"teacher.model={TINY_TEACHER}", f"data.train={C4_TRAIN}", f"data.validation={C4_VALIDATION}",
            "student.preset=tiny-2l", "data.seq_len=32", "train.batch_size=4", "budget.tokens=512",
            "train.precision=float32", "teacher.dtype=float32"]


@pytest.fixture(scope="session")
def assets() -> Path:
    return ASSETS


@pytest.fixture(scope="session")
def overrides() -> list[str]:
    return tiny_overrides()


@pytest.fixture(autouse=True)
def hld_cache_dir(tmp_path_factory, monkeypatch) -> Path:
    """Every test gets its own HLD_CACHE_DIR (token streams, converted GGUFs)."""
    path = tmp_path_factory.mktemp("hld-cache")
    monkeypatch.setenv("HLD_CACHE_DIR", str(path))
    return path
