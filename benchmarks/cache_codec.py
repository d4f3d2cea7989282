"""What the compact cache costs in loss: KD and hidden losses from two caches of the same windows
(one `exact` + bfloat16, one `compact` + fp8), with the same student, at its initialisation and
after training it on the exact cache; plus each cache's bytes per token by array kind.

    hld cache-teacher --config demo --out /tmp/exact budget.tokens=8192 objective.method=hld-joint \\
        teacher.cache_codec=exact teacher.cache_hidden_dtype=bfloat16
    hld cache-teacher --config demo --out /tmp/compact budget.tokens=8192 objective.method=hld-joint
    python benchmarks/cache_codec.py --exact /tmp/exact --compact /tmp/compact --json

|dKD| is reported two ways: the difference of the KD loss (nats/token, the number training sees)
and the mean over tokens of each token's |dKD| (how far single tokens move; quantisation noise of
either sign, which mostly cancels in the loss).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch

from hld.config import load_config
from hld.distill.signals.topk import student_bucket_logprobs
from hld.train.loop import build, train_step
from hld.train.resources import Resources


def per_token_kd(out, sig, chunk: int = 128) -> torch.Tensor:
    """Forward KL on the k ids + the rest, per position (T = 1), float32: (B*T,)."""
    h = out.final_hidden.reshape(-1, out.final_hidden.shape[-1]).float()
    res = []
    for s in range(0, h.shape[0], chunk):
        rows = slice(s, min(s + chunk, h.shape[0]))
        z = h[rows] @ out.head_weight.float().T  # (chunk, V)
        if out.softcap:
            z = torch.tanh(z / out.softcap) * out.softcap
        t = sig.logits(rows)
        logp = t.logprobs(1.0, "bucket")
        logq = student_bucket_logprobs(torch.log_softmax(z, -1), z, t.indices)
        res.append((logp.exp() * (logp - logq)).sum(-1))
    return torch.cat(res)


@torch.no_grad()
def losses(s, steps: range) -> dict:
    """KD, hidden, CE sums over `steps`' batches (objective metrics) and per-token KD."""
    sums: dict[str, float] = {}
    per, n = [], 0
    obj = s.plan.at_step(0, s.total_steps, tokens_before=0, tokens_in_step=1, tokens_total=2)[0].objective
    for step in steps:
        batch = s.order.batch(step)
        sig = s.teacher(batch, obj.needs)
        out = s.runner(batch.input_ids)
        _, _, metrics = obj(batch, out, sig)
        for key, val in metrics.items():
            sums[key] = sums.get(key, 0.0) + float(val)
        per.append(per_token_kd(out, sig)[batch.mask.reshape(-1)])
        n += batch.n_targets
    return {"per_token_kd": torch.cat(per), "n_targets": n, **{k: v / n for k, v in sums.items()}}


def bytes_by_kind(cache: Path) -> dict:
    m = json.loads((cache / "manifest.json").read_text())
    out: dict[str, float] = {}
    for f in m["files"]:
        kind = re.sub(r"^parts/p\d+of\d+\.|\.bin$", "", f)  # parts/<part>.<field>.bin
        out[kind] = out.get(kind, 0) + (cache / f).stat().st_size / m["tokens"]
    return out


def compare(a, b, steps: range) -> dict:
    la, lb = losses(a, steps), losses(b, steps)
    d = lb["per_token_kd"] - la["per_token_kd"]
    return {
        "ce_exact": la["ce"],
        "ce_compact": lb["ce"],
        "kd_exact": la["kd"],
        "kd_compact": lb["kd"],
        "dkd_loss": lb["kd"] - la["kd"],
        "mean_abs_dkd_per_token": float(d.abs().mean()),
        "max_abs_dkd_per_token": float(d.abs().max()),
        "hidden_exact": la.get("hidden"),
        "hidden_compact": lb.get("hidden"),
        "hidden_rel_diff": (lb["hidden"] - la["hidden"]) / la["hidden"] if "hidden" in la else None,
        "tokens": la["n_targets"],
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--exact", type=Path, required=True)
    p.add_argument("--compact", type=Path, required=True)
    p.add_argument("--config", default="demo")
    p.add_argument("--tokens", type=int, default=8192, help="budget.tokens (the caches must hold them)")
    p.add_argument("--method", default="hld-joint")
    p.add_argument("--eval-steps", type=int, default=8, help="batches compared (the first ones of the run)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    res = Resources()
    over = [f"objective.method={args.method}", f"budget.tokens={args.tokens}"]
    a = build(load_config(args.config, over + [f"teacher.cache={args.exact}"]), res)
    b = build(load_config(args.config, over + [f"teacher.cache={args.compact}"]), res)
    steps = range(min(args.eval_steps, a.total_steps))
    out = {
        "bytes_per_token": {"exact": bytes_by_kind(args.exact), "compact": bytes_by_kind(args.compact)},
        "init": compare(a, b, steps),
    }
    for step in range(a.total_steps):  # train the student on the exact cache, then compare again
        train_step(a, step)
    b.student.load_state_dict(a.student.state_dict())
    if a.projectors is not None:
        b.projectors.load_state_dict(a.projectors.state_dict())
    out["trained"] = compare(a, b, steps)
    out["trained_steps"] = a.total_steps
    for key in ("init", "trained"):
        r = out[key]
        print(
            f"{key:8s} KD exact {r['kd_exact']:.5f} compact {r['kd_compact']:.5f}  dKD(loss) {r['dkd_loss']:+.2e}  "
            f"mean |dKD| per token {r['mean_abs_dkd_per_token']:.2e}  hidden {r['hidden_exact']:.5f} vs "
            f"{r['hidden_compact']:.5f} ({100 * r['hidden_rel_diff']:+.3f}%)  CE {r['ce_exact']:.4f} = "
            f"{r['ce_compact']:.4f}"
        )
    for name, kinds in out["bytes_per_token"].items():
        print(name, {k: round(v, 2) for k, v in kinds.items()}, "total", round(sum(kinds.values()), 2))
    if args.json:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
