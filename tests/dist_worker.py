"""One process of a 2-process gloo job, started by `torchrun` (`launch`) from the distributed tests
(not a test module itself). Two jobs:

  grads OUT.pt SPEC.json   for each scenario (name, overrides, step): build the run under torchrun,
                           validate, run one train_step and capture the full gradients at the moment
                           the optimiser would step; rank 0 saves {name: {...}} to OUT.pt
  train SIGTERM_STEP SIGTERM_RANK -- HLD_ARGV...
                           `hld.cli.main(HLD_ARGV)`, where rank SIGTERM_RANK sends itself SIGTERM during
                           step SIGTERM_STEP (0-based); exits with main's code
  proxy OUT -- HLD_ARGV    `hld.cli.main(HLD_ARGV)` under the implicit-device mode (tests/proxies.py):
                           each rank writes OUT.RANK.json, {"code": ..., "sites": {site: count}}
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

from helpers import named_params

WORKER = Path(__file__).resolve()


def launch(
    args: list[str], *, cache_dir: Path, nproc: int = 2, module: bool = False, timeout_s: float = 300
) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node N` of this worker (or of `-m hld` when `module`), CPU
    only, one thread per process (the test machine has 2 cores)."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HLD_CACHE_DIR": str(cache_dir),
        "HF_HUB_OFFLINE": "1",
        "CUDA_VISIBLE_DEVICES": "",
    }
    target = ["-m", "hld"] if module else [str(WORKER)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *target, *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def grads(out_path: str, spec_path: str) -> None:
    from hld import distributed
    from hld.config import load_config
    from hld.train.callbacks import validate_now
    from hld.train.loop import build, release_hooks, train_step
    from hld.train.resources import Resources

    resources, results = Resources(), {}
    for name, overrides, step in json.loads(open(spec_path).read()):
        cfg = load_config("smoke", overrides)
        d = distributed.setup(cfg.train)
        s = build(cfg, resources, dist=d)
        val = validate_now(s)
        params = named_params(s)
        captured: dict[str, torch.Tensor] = {}

        def capture(*args, params=params, captured=captured, **kwargs):  # every rank gathers, rank 0 keeps
            for k, p in params.items():
                captured[k] = _full(p.grad) if p.grad is not None else torch.zeros(p.shape)

        s.optimizer.step = capture  # the update itself is not needed
        metrics = train_step(s, step)
        assert captured, "optimizer.step was not reached"
        results[name] = {"grads": captured, "metrics": metrics, "val": val, "mode": d.mode, "world_size": d.world_size}
        release_hooks(s)
        distributed.close(d)
    if int(os.environ["RANK"]) == 0:
        torch.save(results, out_path)


def train(sigterm_step: int, sigterm_rank: int, argv: list[str]) -> int:
    from hld.cli import main
    from hld.train import loop

    real_step = loop.launch_step

    def step_with_sigterm(s, step):
        out = real_step(s, step)
        if step == sigterm_step and s.dist.rank == sigterm_rank:
            os.kill(os.getpid(), signal.SIGTERM)  # a preemption notice that reached one rank only
        return out

    loop.launch_step = step_with_sigterm
    return main(argv)


def proxy(out: str, argv: list[str]) -> int:
    from hld.cli import main
    from proxies import ImplicitDevices

    with ImplicitDevices() as mode:
        code = main(argv)
    Path(f"{out}.{os.environ['RANK']}.json").write_text(json.dumps({"code": code, "sites": dict(mode.sites)}))
    return code


if __name__ == "__main__":
    torch.set_num_threads(1)
    job = sys.argv[1]
    if job == "grads":
        torch.distributed.init_process_group("gloo")  # one group for every scenario (setup() joins it)
        grads(sys.argv[2], sys.argv[3])
    elif job == "train":
        sep = sys.argv.index("--")
        sys.exit(train(int(sys.argv[2]), int(sys.argv[3]), sys.argv[sep + 1 :]))
    elif job == "proxy":
        sep = sys.argv.index("--")
        sys.exit(proxy(sys.argv[2], sys.argv[sep + 1 :]))
    else:
        raise SystemExit(f"unknown job {job}")
