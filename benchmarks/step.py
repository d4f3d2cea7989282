"""Tokens/s of whole training steps (teacher + student + loss + optimiser): our pipeline
(`hld.train.loop.build` + `train_step`) against a naive Hugging Face step over the same models, the
same batches and the same projectors, in one process.

Runs (ratios against the naive step of the same arm):
- ours ce / kd / hld-joint, the teacher online;
- naive kd / hld-joint: `output_hidden_states=True`, full (B, T, V) logits of both models,
  F.cross_entropy + F.kl_div on them, the hidden loss on HF's hidden states, backward, clip, AdamW;
- ours kd / hld-joint reading a teacher cache (built first with `ensure_cache`, not timed).
Runs are timed in groups, a step of each in turn (ours and naive kd; ours and naive hld-joint; ours
ce and the cached arms), so that a shared machine's noise falls on them alike.

    python benchmarks/step.py --threads 1           # gemma-3-270m teacher, tiny-2l student, 8 x 128, fp32
    python benchmarks/step.py --tiny --json         # seconds-long smoke on the test fixtures
    python benchmarks/step.py --teacher-shape gemma3-4b --student paper-123m --batch-size 4 --seq-len 2048 \
        --chunk-tokens 2048 --n-pairs 4             # the GPU check (gpu_check.sh)

Per-step model FLOPs come from `hld.flops` (teacher forward when it runs online + 3x student
forward + projectors); MFU divides them by a matmul rate measured first (bf16 on CUDA, fp32 on CPU).
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import tempfile
from pathlib import Path

import _measure as M
import torch
import torch.nn.functional as F

from hld.cache.build import ensure_cache
from hld.config import load_config
from hld.data.packing import IGNORE
from hld.distill.chunked import WORKSPACE
from hld.distill.signals.online import OnlineTeacher
from hld.flops import step_cost
from hld.models.loading import LoadedModel, freeze, resolve_model_dir
from hld.precision import autocast, resolve_dtype
from hld.train.loop import build, param_groups, release_hooks, train_step
from hld.train.resources import Resources
from hld.train.setup import Setup

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "tests" / "assets"


# --------------------------------------------------------------------------- configs and models


def overrides(args, method: str, cache: str | None = None) -> list[str]:
    """Dotted overrides on demo.yaml for one arm; `--tiny` uses the test fixtures (tests/conftest.py)."""
    steps = args.steps + 1  # + warmup; the cache must hold every batch that is timed
    out = [
        f"objective.method={method}",
        f"student.preset={args.student}",
        f"data.seq_len={args.seq_len}",
        f"train.batch_size={args.batch_size}",
        f"budget.tokens={steps * args.batch_size * args.seq_len}",
        f"teacher.model={args.teacher}",
        "train.micro_batch_size=null",
    ]
    if args.chunk_tokens:
        out.append(f"train.loss_chunk_tokens={args.chunk_tokens}")
    if args.n_pairs:
        out.append(f"objective.hidden.n_pairs={args.n_pairs}")
    if args.tiny or args.teacher_shape:
        out += [f"data.train={ASSETS}/c4/c4-train.*.json.gz", f"data.validation={ASSETS}/c4/c4-validation.*.json.gz"]
    if args.teacher_shape:
        out.append(f"teacher.dtype={'bfloat16' if torch.cuda.is_available() else 'float32'}")
    if cache:
        out.append(f"teacher.cache={cache}")
    return out


def teacher_shape_config(shape: str, tiny: bool):
    """A Gemma 3 4B-shaped text config (random weights are built from it); tiny: the same family, small."""
    from transformers import Gemma3TextConfig

    if shape != "gemma3-4b":
        raise SystemExit(f"unknown --teacher-shape {shape!r} (known: gemma3-4b)")
    dims = (
        dict(
            hidden_size=64,
            num_hidden_layers=4,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=32,
            intermediate_size=128,
            vocab_size=1024,
        )
        if tiny
        else dict(
            hidden_size=2560,
            num_hidden_layers=34,
            num_attention_heads=8,
            num_key_value_heads=4,
            head_dim=256,
            intermediate_size=10240,
            vocab_size=262144,
        )
    )
    return Gemma3TextConfig(
        **dims,
        query_pre_attn_scalar=dims["head_dim"],
        sliding_window=1024,
        max_position_embeddings=8192,
        bos_token_id=2,
        eos_token_id=1,
        pad_token_id=0,
        attn_implementation="sdpa",
        use_cache=False,
    )


class RandomTeacherResources(Resources):
    """Resources whose teacher is a randomly initialised model built in memory. Its config and the
    fixture tokenizer are written to `model_dir` (what `teacher.model` names), so the CE arm, which
    loads no teacher weights, still sizes its student's vocabulary from that config."""

    def __init__(self, cfg, model_dir: Path, dev: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        from transformers import AutoTokenizer, Gemma3ForCausalLM

        cfg.save_pretrained(model_dir)
        AutoTokenizer.from_pretrained(ASSETS / "tiny_teacher").save_pretrained(model_dir)
        tok = AutoTokenizer.from_pretrained(model_dir)  # its name_or_path is model_dir (read by the CE arm)
        torch.manual_seed(0)
        with torch.device(dev):
            model = Gemma3ForCausalLM(cfg).to(dtype)
        # the identity hld derives from `model_dir`'s files (config and tokenizer, no weights): ensure_cache
        # compares it with the loaded teacher's and refuses a cache build when they differ ("changed while
        # the cache was planned"); any other string made TINY=1 gpu_check.sh stop in part 4
        self.loaded = LoadedModel(
            model=freeze(model), tokenizer=tok, source=str(model_dir), identity=resolve_model_dir(str(model_dir))[1]
        )
        self._tokenizers[str(model_dir)] = tok

    def teacher(self, spec: str, dtype: str) -> LoadedModel:
        return self.loaded


# --------------------------------------------------------------------------- the naive step


class NaiveStep:
    """The step most distillation code writes with Hugging Face models (cf. shared/anchors/
    naive_hf_step.py), over the Setup's own student, teacher and projectors, with its own AdamW.
    Same loss as ours: sums over valid targets divided by their count; the hidden loss on HF's
    `hidden_states[i]` (HF's last entry is after the final norm, our layer L is before it)."""

    def __init__(self, s: Setup) -> None:
        self.s = s
        modules = [s.student] + ([s.projectors] if s.projectors is not None else [])
        t = s.cfg.train
        self.opt = torch.optim.AdamW(
            param_groups(modules, t.weight_decay), lr=t.lr, betas=tuple(t.betas), fused=s.device.type == "cuda"
        )
        self.params = [p for g in self.opt.param_groups for p in g["params"]]

    def loss(self, step: int) -> torch.Tensor:
        s, o = self.s, self.s.cfg.objective
        batch = s.order.batch(step).to(s.device)
        x, labels, mask = batch.input_ids, batch.labels, batch.mask  # (B, T)
        hld = s.projectors is not None
        with torch.no_grad():
            t_out = s.teacher_lm(input_ids=x, output_hidden_states=hld)
        with autocast(s.compute_dtype, s.device):
            s_out = s.student(input_ids=x, output_hidden_states=hld)
        sl, tl = s_out.logits.float(), t_out.logits.float()  # (B, T, V) each
        V, T = sl.shape[-1], o.temperature
        ce = F.cross_entropy(sl.reshape(-1, V), labels.reshape(-1), ignore_index=IGNORE, reduction="sum")
        kd_tok = F.kl_div(F.log_softmax(sl / T, -1), F.log_softmax(tl / T, -1), log_target=True, reduction="none").sum(
            -1
        )  # (B, T)
        kd = (kd_tok * mask).sum() * T * T
        loss = (1 - o.alpha) * ce + o.alpha * kd
        if hld:
            hidden = 0.0
            for pair in s.projectors.pairs:
                pred = s.projectors(pair, s_out.hidden_states[pair[0]]).float()  # (B, T, d_t)
                target = t_out.hidden_states[pair[1]].float()
                target = target * torch.rsqrt(target.pow(2).mean(-1, keepdim=True) + 1e-6)
                hidden = hidden + ((pred - target).pow(2).mean(-1) * mask).sum()
            loss = loss + o.hidden.beta * hidden / len(s.projectors.pairs)
        return loss / batch.n_targets

    def __call__(self, step: int) -> float:
        loss = self.loss(step)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.s.cfg.train.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())


# --------------------------------------------------------------------------- timing


def matmul_rate(dev: torch.device, dtype: torch.dtype, tiny: bool) -> float:
    """FLOP/s of a square matmul in `dtype`: the denominator of MFU."""
    n = 512 if tiny else (8192 if dev.type == "cuda" else 2048)
    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    for _ in range(2):
        a @ b
    k = 20 if dev.type == "cuda" else 3
    seconds, _ = M.timed(lambda: [a @ b for _ in range(k)], dev)
    return 2 * n**3 * k / seconds


def model_flops_per_token(s: Setup) -> float:
    """FLOPs per token of the work a step does (hld.flops): 3x student forward, projectors, and the
    teacher's forward only when it runs online (a cache's forward was spent when it was built)."""
    obj = s.plan.phases[0].objective
    online = isinstance(s.teacher, OnlineTeacher) and obj.needs.any
    dims = ()
    if obj.student_layers and s.projectors is not None:
        dims = ((s.student.config.hidden_size, s.teacher_lm.config.hidden_size),) * len(s.projectors.pairs)
    upto = None if obj.needs.logits or not obj.needs.layers else max(obj.needs.layers)
    return step_cost(
        s.student,
        s.cfg.data.seq_len,
        teacher=s.teacher_lm if online else None,
        teacher_logits=obj.needs.logits,
        teacher_upto=upto,
        projector_dims=dims,
        student_logits=obj.uses_head,
    ).total


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "can't allocate memory" in str(exc)


def time_group(fns: dict, n_steps: int, dev: torch.device) -> dict:
    """Time several step functions **interleaved** (a step of each in turn), so that a shared,
    noisy machine slows them alike. Step 0 of each is warmup (optimiser state, buffers); steps
    1..n are timed; the median is reported. Peak memory per function: the maximum over its steps
    (warmup included) of CUDA's max allocated (weights included) / CPU's peak RSS above the RSS at
    the step's start. The fused loss's buffers, shared by the runs, are freed before each warmup so
    that every run's peak includes them."""
    out = {name: {"seconds": [], "peak_bytes": 0} for name in fns}
    for i in range(n_steps + 1):
        for name, fn in fns.items():
            r = out[name]
            if "error" in r:
                continue
            if i == 0:  # each run's warmup allocates (and counts) the fused loss's reusable buffers
                WORKSPACE.clear()
                gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            try:
                with M.PeakMemory(dev) as pm:
                    seconds, loss = M.timed(lambda: fn(i), dev)  # noqa: B023 (called at once)
            except RuntimeError as exc:
                if not is_oom(exc):
                    raise
                r["error"] = "out of memory"
                continue
            peak = torch.cuda.max_memory_allocated() if dev.type == "cuda" else pm.bytes
            r["peak_bytes"] = max(r["peak_bytes"], peak)
            if i == 0:
                r["warmup_loss"] = loss
            else:
                r["seconds"].append(seconds)
    for r in out.values():
        if r["seconds"]:
            r["step_s"] = sorted(r["seconds"])[len(r["seconds"]) // 2]
    return out


def run_group(named: dict, args, rate: float) -> list[dict]:
    """`named`: run name -> (Setup, 'ours' | 'naive'). Returns one result per run."""
    fns = {
        name: (lambda i, s=s: train_step(s, i)["train/loss"]) if kind == "ours" else NaiveStep(s)
        for name, (s, kind) in named.items()
    }
    dev = next(iter(named.values()))[0].device
    timed = time_group(fns, args.steps, dev)
    tokens = args.batch_size * args.seq_len
    out = []
    for name, (s, _) in named.items():
        r = {"run": name, **timed[name]}
        if "step_s" in r:
            flops_tok = model_flops_per_token(s)
            r.update(
                tokens_per_s=tokens / r["step_s"],
                flops_per_token=flops_tok,
                mfu=flops_tok * tokens / r["step_s"] / rate,
            )
            print(
                f"  {name}: {r['tokens_per_s']:,.0f} tokens/s, {r['step_s']:.3f} s/step, "
                f"{M.gib(r['peak_bytes']):.2f} GiB",
                file=sys.stderr,
                flush=True,
            )
        out.append(r)
    return out


def loss_check(s: Setup) -> dict:
    """Ours and naive on batch 0 with the same weights, before either steps (no update)."""
    try:
        with torch.no_grad():
            naive = float(NaiveStep(s).loss(0))
    except RuntimeError as exc:
        if not is_oom(exc):
            raise
        return {"error": "naive: out of memory"}
    batch = s.order.batch(0).to(s.device)
    teacher = s.teacher(batch, s.plan.phases[0].objective.needs) if s.teacher is not None else None
    with torch.no_grad(), autocast(s.compute_dtype, s.device):
        out = s.runner(batch.input_ids)
        loss_sum, _, _ = s.plan.phases[0].objective(batch, out, teacher)
    ours = float(loss_sum) / batch.n_targets
    return {"ours": ours, "naive": naive, "rel_diff": abs(ours - naive) / abs(naive)}


# --------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", default="gemma-3-270m", help="teacher.model (ignored with --teacher-shape)")
    p.add_argument("--teacher-shape", choices=["gemma3-4b"], help="a randomly initialised teacher of this shape")
    p.add_argument("--student", default="tiny-2l", help="student preset")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=3, help="timed steps per run after 1 warmup (the median is reported)")
    p.add_argument("--chunk-tokens", type=int, default=None, help="train.loss_chunk_tokens (default: the config's)")
    p.add_argument(
        "--n-pairs",
        type=int,
        default=None,
        help="objective.hidden.n_pairs (default: the config's, one per student block)",
    )
    p.add_argument("--no-cache", action="store_true", help="skip the teacher-cache runs")
    p.add_argument("--tiny", action="store_true", help="test fixtures, tiny shapes: a seconds-long smoke")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = p.parse_args(argv)
    if args.tiny:
        args.teacher = str(ASSETS / "tiny_teacher")
        args.seq_len, args.batch_size, args.steps = min(args.seq_len, 32), min(args.batch_size, 4), min(args.steps, 2)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = M.device()
    work = Path(tempfile.mkdtemp(prefix="hld-bench-step-"))
    try:
        resources = Resources()
        if args.teacher_shape:
            args.teacher = str(work / "teacher")
            tdtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
            resources = RandomTeacherResources(
                teacher_shape_config(args.teacher_shape, args.tiny), work / "teacher", dev, tdtype
            )
        res = run_all(args, resources, work, dev)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(args, res)


def run_all(args, resources: Resources, work: Path, dev: torch.device) -> dict:
    cfgs = {m: load_config("demo", overrides(args, m)) for m in ("ce", "kd", "hld-joint")}
    runs, checks = [], {}
    rate = matmul_rate(dev, resolve_dtype(cfgs["kd"].train.precision, dev), args.tiny)
    print(f"matmul rate: {rate / 1e12:.2f} TFLOP/s", file=sys.stderr)
    for method in ("kd", "hld-joint"):  # ours and naive interleaved, on one Setup (same models, same batches)
        s = build(cfgs[method], resources, dev)
        checks[method] = loss_check(s)
        runs += run_group({f"ours {method}": (s, "ours"), f"naive {method}": (s, "naive")}, args, rate)
        release_hooks(s)
        del s
        gc.collect()
    group = {"ours ce": (build(cfgs["ce"], resources, dev), "ours")}
    cache_info = None
    if not args.no_cache:  # ce and the cached arms interleaved
        cache_dir = work / "cache"
        manifest = ensure_cache([cfgs["kd"], cfgs["hld-joint"]], cache_dir, resources, quiet=True)
        cache_info = {
            "tokens": manifest["tokens"],
            "bytes": manifest["bytes"],
            "top_k": manifest["identity"]["top_k"],
            "layers": manifest["identity"]["layers"],
        }
        for method in ("kd", "hld-joint"):
            cfg = load_config("demo", overrides(args, method, cache=str(cache_dir)))
            group[f"ours {method} cache"] = (build(cfg, resources, dev), "ours")
    runs += run_group(group, args, rate)
    for s, _ in group.values():
        release_hooks(s)
    return summarise(args, runs, checks, rate, cache_info)


def summarise(args, runs, checks, rate, cache_info) -> dict:
    tps = {r["run"]: r.get("tokens_per_s") for r in runs}
    ratio = lambda a, b: tps[a] / tps[b] if tps.get(a) and tps.get(b) else None
    res = {
        "benchmark": "step",
        "machine": M.machine(),
        "teacher": args.teacher_shape or args.teacher,
        "student": args.student,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "steps": args.steps,
        "matmul_flops_per_s": rate,
        "loss_check": checks,
        "cache": cache_info,
        "runs": runs,
        "speedup_kd": ratio("ours kd", "naive kd"),
        "speedup_hld": ratio("ours hld-joint", "naive hld-joint"),
        "cache_vs_ce": ratio("ours kd cache", "ours ce"),
        "hld_cache_vs_ce": ratio("ours hld-joint cache", "ours ce"),
    }
    res["targets_met"] = {
        "speedup_kd_ge_2": (res["speedup_kd"] or 0) >= 2,
        "speedup_hld_ge_2": (res["speedup_hld"] or 0) >= 2,
        "cache_vs_ce_ge_0_9": (res["cache_vs_ce"] or 0) >= 0.9,
    }
    return res


def report(args, res: dict) -> None:
    naive_of = lambda name: "naive " + name.split()[1] if name.startswith("ours ") and "cache" not in name else None
    by = {r["run"]: r for r in res["runs"]}
    rows = []
    for r in res["runs"]:
        if "error" in r:
            rows.append([r["run"], "-", "-", "-", "-", r["error"]])
            continue
        ref = by.get(naive_of(r["run"]) or "")
        x = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x" if ref and "tokens_per_s" in ref else "-"
        rows.append(
            [
                r["run"],
                f"{r['tokens_per_s']:,.0f}",
                f"{r['step_s']:.3f}",
                f"{M.gib(r['peak_bytes']):.2f}",
                f"{r['mfu']:.3f}",
                x,
            ]
        )
    print(
        f"training step: teacher {res['teacher']}, student {res['student']}, {res['batch_size']} x {res['seq_len']}"
        f" tokens, on {res['machine']['device']}; median of {res['steps']} timed steps after 1 warmup, the runs "
        f"of a group interleaved step by step"
    )
    peak = "peak GiB" if torch.cuda.is_available() else "peak GiB*"
    print(M.table(rows, ["run", "tokens/s", "s/step", peak, "MFU", "vs naive"]))
    if not torch.cuda.is_available():
        print("* CPU: peak resident memory above the process's before the run (weights loaded before excluded)")
    for m, c in res["loss_check"].items():
        if "error" in c:
            print(f"loss on batch 0, {m}: {c['error']}")
            continue
        why = " (differs by design: HF's last hidden_states entry is after the final norm)" if m != "kd" else ""
        print(f"loss on batch 0, {m}: ours {c['ours']:.6f}, naive {c['naive']:.6f} (rel diff {c['rel_diff']:.1e}){why}")
    fmt = lambda v: f"{v:.2f}" if v is not None else "n/a"
    print(
        f"speedup_kd {fmt(res['speedup_kd'])}  speedup_hld {fmt(res['speedup_hld'])}  "
        f"cache_vs_ce {fmt(res['cache_vs_ce'])}  (hld-joint from cache vs ce {fmt(res['hld_cache_vs_ce'])})"
    )
    if args.json:
        print(json.dumps(res))


if __name__ == "__main__":
    main()
