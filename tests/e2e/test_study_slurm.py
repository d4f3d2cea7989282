"""scripts/slurm/study.sbatch with stub `sbatch`, `srun`, `torchrun` and `scontrol` on PATH: the job
graph it submits (caches first, each cell an array task depending on its cache, the equal-FLOPs ce
cells on the kd tasks they match, the report on every array), then each recorded job run in submission
order (srun and torchrun run their command as one process), then a resubmission, which submits only
the report. Not run: a real SLURM cluster, multi-node torchrun, GPUs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import tiny_overrides

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "slurm" / "study.sbatch"
RUN_OVERRIDES = [o for o in tiny_overrides() if not o.startswith(("student.preset=", "budget."))] + [
    "data.val_tokens=256"
]
STUDY = ["scratch", "budgets=[{tokens: 256}]", "tasks=[]", "arms=[ce,kd,hld-joint]", "seeds=[0,1]", *RUN_OVERRIDES]

STUBS = {
    # records its arguments, answers a job id as `sbatch --parsable` does
    "sbatch": """import json, os, sys
log = os.environ["STUB_LOG"]
n = 100 + (sum(1 for _ in open(log)) if os.path.exists(log) else 0)
open(log, "a").write(json.dumps({"id": str(n), "argv": sys.argv[1:]}) + "\\n")
print(n)""",
    "srun": """import os, sys
args = sys.argv[1:]
while args and args[0].startswith("--"):
    args.pop(0)
os.execvp(args[0], args)""",
    "torchrun": """import os, sys
args = sys.argv[1:]
m = args.index("-m")
os.execv(sys.executable, [sys.executable, *args[m:]])""",
    "scontrol": """print("localhost")""",
}


def _stubs(d: Path) -> Path:
    d.mkdir()
    for name, body in STUBS.items():
        (d / name).write_text(f"#!{sys.executable}\n{body}\n")
        (d / name).chmod(0o755)
    return d


def _submit(out: Path, env: dict) -> list[dict]:
    log = Path(env["STUB_LOG"])
    log.unlink(missing_ok=True)
    proc = subprocess.run(
        ["bash", str(SCRIPT), STUDY[0], str(out), *STUDY[1:]], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in log.read_text().splitlines()]


def _opts(job: dict) -> dict:
    opts = {}
    for a in job["argv"]:
        if not a.startswith("--"):
            break
        k, _, v = a[2:].partition("=")
        opts[k] = v
    return opts


def _body(job: dict) -> list[str]:
    i = next(i for i, a in enumerate(job["argv"]) if not a.startswith("--"))
    return job["argv"][i:]


@pytest.mark.slow
def test_the_study_sbatch_job_graph_runs_and_resumes(tmp_path, hld_cache_dir):
    env = {
        **os.environ,
        "PATH": f"{_stubs(tmp_path / 'bin')}:{os.environ['PATH']}",
        "PYTHON": sys.executable,
        "STUB_LOG": str(tmp_path / "jobs.jsonl"),
        "HLD_CACHE_DIR": str(hld_cache_dir),
        "HF_HUB_OFFLINE": "1",
        "GPUS_PER_NODE": "1",
        "OMP_NUM_THREADS": "1",
    }
    out = tmp_path / "study"
    jobs = _submit(out, env)
    graph = [(_body(j)[1], _opts(j).get("dependency"), _opts(j).get("array")) for j in jobs]
    print("\n".join(f"job {j['id']}: {kind} array={arr} dependency={dep}" for j, (kind, dep, arr) in zip(jobs, graph)))
    ids = [j["id"] for j in jobs]
    # 2 cache jobs; arrays: plain ce (2 cells), group 0 (kd, hld-joint), its eqflops ce, group 1, its eqflops ce
    assert [g[0] for g in graph] == ["cache", "cache", "cell", "cell", "cell", "cell", "cell", "report"]
    assert graph[2] == ("cell", None, "0-1")  # ce: no teacher, no cache
    assert graph[3] == ("cell", f"afterok:{ids[0]}", "0-1") and graph[5] == ("cell", f"afterok:{ids[1]}", "0-1")
    assert graph[4] == ("cell", f"afterok:{ids[3]}_0", "0-0")  # kd is task 0 of its group's array
    assert graph[6] == ("cell", f"afterok:{ids[5]}_0", "0-0")
    assert graph[7][1] == "afterok:" + ":".join(ids[2:7])
    lists = {j["id"]: Path(_body(j)[2]).read_text().split() for j in jobs if _body(j)[1] == "cell"}
    assert [c.rsplit("__", 1)[1] for c in lists[ids[3]]] == ["kd", "hld-joint"]
    assert "eqflops" in lists[ids[4]][0] and lists[ids[4]][0].endswith("__s0__ce")

    for job in jobs:  # submission order is a topological order of the graph
        tasks = range(int(_opts(job)["array"].split("-")[1]) + 1) if "array" in _opts(job) else [None]
        for t in tasks:
            task_env = {
                **env,
                "SLURM_JOB_ID": job["id"],
                "SLURM_NNODES": "1",
                "SLURM_JOB_NODELIST": "localhost",
                **({"SLURM_ARRAY_TASK_ID": str(t)} if t is not None else {}),
            }
            proc = subprocess.run(["bash", *_body(job)], capture_output=True, text=True, env=task_env, timeout=600)
            assert proc.returncode == 0, (job, t, proc.stderr)
    assert (out / "results.csv").is_file() and (out / "report.md").is_file()
    assert len(list((out / "runs").glob("*/summary.json"))) == 8

    again = _submit(out, env)  # resubmitting: every cell finished, only the report is submitted
    assert [(_body(j)[1], _opts(j).get("dependency")) for j in again] == [("report", None)]
