"""Shared fixtures: the checked-in tiny assets, the overrides that point a config at them, and a
private token cache per test (nothing is written into the repo or ~/.cache)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import ASSETS, tiny_overrides

# tests never reach the network: a missing local path must fail, not fall back to the hub
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


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


@pytest.fixture(scope="module")
def resources(tmp_path_factory):
    """One `Resources` (loaded teachers, token stores) per test module, on a private HLD_CACHE_DIR."""
    from hld.train.resources import Resources

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HLD_CACHE_DIR", str(tmp_path_factory.mktemp("hld-cache")))
        yield Resources()


@pytest.fixture(scope="module")
def tiny_teacher(resources):
    """The smoke config on the fixtures, the tiny teacher loaded in float32, and its training windows."""
    from hld.config import load_config

    cfg = load_config("smoke", tiny_overrides())
    loaded = resources.teacher(cfg.teacher.model, "float32")
    return cfg, loaded, resources.train_windows(cfg.data, loaded.tokenizer)
