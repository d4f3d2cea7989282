"""Mutation testing of hld's numerics with mutmut 3 (`pip install mutmut==3.8.1`): does a test fail when the
code is wrong?

    python scripts/mutation.py                    # every target module below, one after another
    python scripts/mutation.py schedule flops     # some of them (keys of TARGETS)
    python scripts/mutation.py schedule --show    # and print the diff of each surviving mutant
    python scripts/mutation.py schedule --expect 30/31   # exit 1 unless exactly 30 of 31 are killed
    python scripts/mutation.py schedule --expect all     # exit 1 unless every mutant is killed (the slow test)
    python scripts/mutation.py --list             # the keys, their source files and their tests

Each module runs in its own scratch copy of the tree, $HLD_MUTATION_DIR/<key> (default
/tmp/hld-mutation/<key>, wiped first): src/, tests/ and pyproject.toml with a [tool.mutmut] section
appended that mutates only that module's files and runs only the few unit-test files that test it (a run
takes minutes, not hours; the whole suite would take hours per module). mutmut copies src/ into
<scratch>/mutants/src and puts that first on sys.path; PYTHONPATH is cleared here so that the copy, not the
editable install (its .pth names /work/main/src or wherever it was installed from) nor a PYTHONPATH=.../src,
is what the tests import. Nothing is written into the checkout (mutants/ is in .gitignore all the same,
for a mutmut run by hand).

The score is killed / total, where "total" counts every mutant mutmut made in the module: a mutant no
selected test reaches ("no tests") or that times out counts as not killed. The survivors left alive on
purpose, and why, are in docs/testing.md ("Mutation testing"), with the scores this prints.

--jobs N runs N mutants at a time (default 1: the 2-core CI machines are shared).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Target:
    sources: list[str]  # files mutated (globs)
    tests: list[str]  # test files run against each mutant (those that exist)
    pytest_args: list[str] = field(default_factory=list)  # more pytest arguments (e.g. a -k deselection)
    only: str = ""  # a regex: score only the mutants whose name matches (a class of a module)


# a signal kind's rows, its fused-head gradient (test_chunked) and its fidelity
FUSED_HEAD_TESTS = [
    "tests/unit/test_losses.py",
    "tests/unit/test_signal_kinds.py",
    "tests/unit/test_chunked.py",
    "tests/unit/test_fidelity.py",
]

TARGETS: dict[str, Target] = {
    "losses": Target(["src/hld/distill/losses.py"], ["tests/unit/test_losses.py"]),
    "divergences": Target(
        ["src/hld/distill/divergences/*.py"],
        ["tests/unit/test_divergences.py", "tests/unit/test_divergence_skew_kl.py", "tests/unit/test_losses.py"],
    ),
    "topk": Target(
        ["src/hld/distill/signals/topk.py"],
        ["tests/unit/test_topk_signal.py", *FUSED_HEAD_TESTS],
    ),
    "sampled": Target(
        ["src/hld/distill/signals/sampled.py"],
        ["tests/unit/test_sampled_rows.py", "tests/unit/test_sampled_kd.py", *FUSED_HEAD_TESTS],
    ),
    # the Dense signal; the runners beside it (Backbone, OnlineTeacher) are the models' tests', not scored here
    "online": Target(
        ["src/hld/distill/signals/online.py"],
        FUSED_HEAD_TESTS,
        only=r"\.xǁDenseǁ",
    ),
    "chunked": Target(
        ["src/hld/distill/chunked.py"], ["tests/unit/test_chunked.py", "tests/unit/test_signal_kinds.py"]
    ),
    # the three whole training runs of test_lr_schedule (50 s per mutant) check the wiring, not the formula
    "schedule": Target(["src/hld/train/schedule.py"], ["tests/unit/test_lr_schedule.py"], ["-k", "not a_run_applies"]),
    "flops": Target(  # the calibration FLOPs are tested with the derivations they count
        ["src/hld/flops.py"],
        ["tests/unit/test_flops.py", "tests/unit/test_derive.py", "tests/unit/test_derive_residual.py"],
    ),
    "budget": Target(["src/hld/train/budget.py"], ["tests/unit/test_budget.py"]),
    "stats": Target(["src/hld/study/stats.py"], ["tests/unit/test_study_stats.py", "tests/unit/test_study.py"]),
}

# fast tier only (a whole training run per mutant would take hours); no cache, no plugin reordering
PYTEST_ARGS = ["-m", "not slow", "-p", "no:cacheprovider"]


def _toml_list(items: list[str]) -> str:
    return "[" + ", ".join(f'"{x}"' for x in items) + "]"


def prepare(key: str, base: Path) -> Path:
    t = TARGETS[key]
    work = base / key
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
    shutil.copytree(ROOT / "src", work / "src", ignore=ignore)
    shutil.copytree(ROOT / "tests", work / "tests", ignore=ignore)
    tests = [x for x in t.tests if (ROOT / x).exists()]
    if not tests:  # mutmut would run every test against every mutant (hours), and on a copy without docs/
        raise SystemExit(f"{key}: none of its test files exists ({', '.join(t.tests)}): fix TARGETS")
    config = (
        "\n[tool.mutmut]\n"
        'source_paths = ["src"]\n'
        f"only_mutate = {_toml_list(t.sources)}\n"
        f"pytest_add_cli_args_test_selection = {_toml_list(tests)}\n"
        f"pytest_add_cli_args = {_toml_list(PYTEST_ARGS + t.pytest_args)}\n"
        "use_git_change_detection = false\n"
    )
    (work / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text() + config)
    return work


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # the mutated copy (mutants/src, put first by mutmut) is what gets imported
    env["HF_HUB_OFFLINE"] = "1"
    # one intra-op thread: mutmut forks each mutant's test run from a process that has already run torch ops,
    # and a forked child of a process with a live OpenMP pool spins where it should compute (every surviving
    # mutant then reads "timeout" after its CPU limit); it also keeps a run to one core of a shared machine
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = "1"
    return env


def _mutmut(work: Path, *args: str, capture: bool = True) -> str:
    cmd = [sys.executable, "-m", "mutmut", *args]
    out = subprocess.run(cmd, cwd=work, env=_env(), capture_output=capture, text=True)
    if out.returncode != 0:
        sys.stderr.write((out.stdout or "") + (out.stderr or ""))
        raise SystemExit(f"mutmut {' '.join(args)} failed in {work} (exit {out.returncode})")
    return out.stdout or ""


def results(work: Path) -> dict[str, str]:
    """mutant name -> status (killed, survived, no tests, timeout, ...)."""
    got = {}
    for line in _mutmut(work, "results", "--all", "true").splitlines():
        m = re.match(r"\s+(\S+): (.+)$", line)
        if m:
            got[m.group(1)] = m.group(2).strip()
    return got


def run(key: str, base: Path, jobs: int, show: bool) -> tuple[int, int, dict[str, str]]:
    work = prepare(key, base)
    t0 = time.perf_counter()
    log = _mutmut(work, "run", "--max-children", str(jobs))
    (work / "mutmut-run.log").write_text(log)
    status = {k: v for k, v in results(work).items() if re.search(TARGETS[key].only, k)}
    killed = sum(1 for s in status.values() if s in ("killed", "caught by type check"))
    if status and not killed:
        # the symptom of tests importing the unmutated tree (an editable install, a PYTHONPATH): no test
        # reaches a mutated function, every mutant reads "no tests" or survives
        raise SystemExit(f"{key}: no mutant killed; do the tests import {work}/mutants/src? ({work}/mutmut-run.log)")
    alive = {k: s for k, s in sorted(status.items()) if s not in ("killed", "caught by type check")}
    print(f"\n== {key}: {killed}/{len(status)} killed ({time.perf_counter() - t0:.0f} s, in {work})")
    for name, s in alive.items():
        print(f"   {s:>10}  {name}")
        if show:
            print(_mutmut(work, "show", name))
    return killed, len(status), alive


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("modules", nargs="*", help=f"keys of the targets (default: all): {', '.join(TARGETS)}")
    ap.add_argument("--jobs", type=int, default=1, help="mutants tested at a time (default 1)")
    ap.add_argument("--show", action="store_true", help="print each surviving mutant's diff")
    ap.add_argument("--expect", help="KILLED/TOTAL or 'all': exit 1 unless the (single) module scores this")
    ap.add_argument("--list", action="store_true", help="print the targets and exit")
    ap.add_argument("--workdir", type=Path, default=Path(os.environ.get("HLD_MUTATION_DIR", "/tmp/hld-mutation")))
    a = ap.parse_args(argv)
    if a.list:
        for key, t in TARGETS.items():
            print(f"{key:12} {' '.join(t.sources)}  <-  {' '.join(t.tests + t.pytest_args)}")
        return 0
    keys = a.modules or list(TARGETS)
    unknown = [k for k in keys if k not in TARGETS]
    if unknown:
        ap.error(f"unknown module(s) {unknown}; known: {list(TARGETS)}")
    if a.expect and len(keys) != 1:
        ap.error("--expect takes one module")
    scores = {k: run(k, a.workdir, a.jobs, a.show)[:2] for k in keys}
    print("\nmodule        killed/total")
    for k, (killed, total) in scores.items():
        print(f"{k:12}  {killed}/{total}")
    if a.expect:
        killed, total = scores[keys[0]]
        got = f"{killed}/{total}"
        if got != (f"{total}/{total}" if a.expect == "all" else a.expect):
            print(f"expected {a.expect}, got {got}")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
