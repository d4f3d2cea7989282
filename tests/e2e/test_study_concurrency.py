"""Several processes on one study directory (hld.study.runner's locks): three whole `hld study`
processes started at once train every cell exactly once and write the results.csv of one sequential
run (bitwise, but for the wall-time column); a process SIGKILLed while building a cache leaves nothing
taken for a complete cache, its lock dies with it, and of two builders started together one builds
and the other waits and reuses."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import tiny_overrides
from hld.cli import main
from hld.locks import file_lock

RUN_OVERRIDES = [o for o in tiny_overrides() if not o.startswith(("student.preset=", "budget."))] + [
    "data.val_tokens=256"
]
# 8 cells (3 arms + ce at kd's FLOPs, 2 seeds), 2 cache groups
STUDY = [
    "study",
    "--config",
    "scratch",  # the from-scratch study (the demo derives its students from a real teacher)
    "budgets=[{tokens: 256}]",
    "tasks=[]",
    "arms=[ce,kd,hld-joint]",
    "seeds=[0,1]",
    *RUN_OVERRIDES,
]
WALL_TIME = ("train_seconds",)


def _hld(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "hld", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def _env(hld_cache_dir: Path) -> dict:
    return {**os.environ, "HLD_CACHE_DIR": str(hld_cache_dir), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return [{k: v for k, v in r.items() if k not in WALL_TIME} for r in csv.DictReader(fh)]


@pytest.mark.slow
def test_three_concurrent_studies_equal_one_sequential_run(tmp_path, hld_cache_dir, capsys):
    seq, par = tmp_path / "sequential", tmp_path / "concurrent"
    assert main([*STUDY, "--out", str(seq), "--quiet"]) == 0
    capsys.readouterr()
    procs = [_hld([*STUDY, "--out", str(par), "--json"], _env(hld_cache_dir)) for _ in range(3)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=900)
        assert p.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    trained = [c for r in results for c in r["trained"]]
    cells = json.loads((seq / "study.json").read_text())["cells"]
    assert sorted(trained) == sorted(cells)  # each cell trained by exactly one process
    for r in results:  # every process ends with the whole study: what it did not train, it found done
        assert sorted(r["trained"] + r["skipped"]) == sorted(cells)
    assert _rows(par / "results.csv") == _rows(seq / "results.csv")
    caches = json.loads((par / "study.json").read_text())["caches"]
    assert len(caches) == 2 and not any(c["reused"] for c in caches.values())  # each recorded as built


def _group(out: Path, env: dict) -> str:
    p = _hld([*STUDY, "--out", str(out), "--list", "--json"], env)
    stdout, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    return json.loads(stdout.strip().splitlines()[-1])["caches"][0]["group"]


# the cache builder, stopped after it has written everything into its temporary directory and before the
# rename that makes the cache complete: the most complete-looking moment to be killed at
_STALL = """
import sys, time
from hld.cache import writer as cache_writer
def stall(tmp, final):
    print("STALLED", flush=True)
    time.sleep(600)
cache_writer.replace_dir = stall
from hld.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_killed_cache_build_leaves_no_cache_and_no_lock(tmp_path, hld_cache_dir):
    env, out = _env(hld_cache_dir), tmp_path / "study"
    group = _group(out, env)
    cache_dir, lock = out / "caches" / group, out / "locks" / "caches" / f"{group}.lock"
    p = subprocess.Popen(
        [sys.executable, "-c", _STALL, *STUDY, "--out", str(out), "--cache", group, "--quiet"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert p.stdout is not None
    assert p.stdout.readline().strip() == "STALLED", p.stderr.read() if p.stderr else ""
    tmp = list((out / "caches").glob(f".{group}.build"))
    assert len(tmp) == 1 and (tmp[0] / "manifest.json").is_file()  # fully written, not yet renamed
    with file_lock(lock, wait=False) as got:
        assert not got  # the builder holds the group's lock
    os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=60)
    assert not cache_dir.exists()  # nothing named like the cache: no reader takes the debris for one
    with file_lock(lock, wait=False) as got:
        assert got  # the kernel released the dead builder's lock
    # two builders at once: one builds (removing the debris under the lock), the other waits and reuses
    procs = [_hld([*STUDY, "--out", str(out), "--cache", group, "--json"], env) for _ in range(2)]
    rows = []
    for q in procs:
        stdout, err = q.communicate(timeout=600)
        assert q.returncode == 0, err
        rows.append(json.loads(stdout.strip().splitlines()[-1]))
    assert sorted(r["reused"] for r in rows) == [False, True]
    assert (cache_dir / "manifest.json").is_file()
    assert not list((out / "caches").glob(f".{group}.build"))  # assembled by the first, reused by the other


@pytest.mark.slow
def test_a_held_cell_waits_and_a_matched_cell_names_its_match(tmp_path, hld_cache_dir, capsys):
    out = tmp_path / "study"
    listing = json.loads(
        _hld([*STUDY, "--out", str(out), "--list", "--json"], _env(hld_cache_dir))
        .communicate(timeout=300)[0]
        .strip()
        .splitlines()[-1]
    )
    matched = next(c for c in listing["cells"] if c["after"])
    assert main([*STUDY, "--out", str(out), "--cell", matched["id"]]) == 2
    err = capsys.readouterr().err
    assert "that cell must finish first" in err and matched["after"] in err and len(err.strip().splitlines()) == 1
    kd = matched["after"]
    with file_lock(out / "locks" / "cells" / f"{kd}.lock"):  # another process holds the kd cell for 2 s
        p = _hld([*STUDY, "--out", str(out), "--cell", kd, "--json"], _env(hld_cache_dir))
        time.sleep(2)
        assert p.poll() is None  # waiting for the claim
    stdout, err = p.communicate(timeout=600)
    assert p.returncode == 0, err
    assert json.loads(stdout.strip().splitlines()[-1])["status"] == "trained"
    assert main([*STUDY, "--out", str(out), "--cell", kd, "--json"]) == 0  # finished: skipped
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["status"] == "done"


def test_a_cache_group_built_in_parts_equals_one_build(tmp_path, capsys):
    """`hld study --cache GROUP --shard I/N` (the sbatch's CACHE_PARTS array): the parts build at once
    without the group lock, the last one assembles, and the cells then read a cache equal to one build."""
    one, parts = tmp_path / "one", tmp_path / "parts"
    assert main([*STUDY, "--out", str(one), "--list", "--json"]) == 0
    group = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["caches"][0]["group"]
    assert main([*STUDY, "--out", str(one), "--cache", group, "--json"]) == 0
    rows = []
    for i in range(2):
        assert main([*STUDY, "--out", str(parts), "--cache", group, "--shard", f"{i}/2", "--json"]) == 0
        rows.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    assert rows[-1]["tokens"] == json.loads((one / "caches" / group / "manifest.json").read_text())["tokens"]
    a, b = (json.loads((d / "caches" / group / "manifest.json").read_text()) for d in (one, parts))
    assert [r["rows"] for r in a["shards"]] == [r["rows"] for r in b["shards"]] and a["identity"] == b["identity"]
    assert "caches" in json.loads((parts / "study.json").read_text())  # recorded by the assembling part
