"""Build throughput (tokens/s) and size (bytes per token) of the offline teacher cache for a config
(default: the demo config, method hld-joint, so the matched teacher layers are stored too), built
with `ensure_cache` into a temporary directory.

Beside it, in the same process: the teacher's forward alone over the same batches (logits and top-k
computed, nothing written), which is what building a cache cannot beat, and the size a cache of
dense fp16 logits would take.

    python benchmarks/cache.py --threads 1        # 8192 tokens of the demo config
    python benchmarks/cache.py --tiny --json      # test fixtures, seconds
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import tempfile
from pathlib import Path

import _measure as M
import torch

from hld.cache.build import ensure_cache, teacher_layers
from hld.config import load_config
from hld.data.loader import BatchOrder
from hld.distill.signals import Needs
from hld.distill.signals.online import OnlineTeacher
from hld.distill.signals.topk import TopK
from hld.train.resources import Resources

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "tests" / "assets"
BUILD_BATCH = 8  # build_cache's default batch size


def config(args):
    over = [f"objective.method={args.method}", f"budget.tokens={args.tokens}"]
    if args.tiny:
        over += [
            f"teacher.model={ASSETS / 'tiny_teacher'}",
            f"data.train={ASSETS}/c4/c4-train.*.json.gz",
            f"data.validation={ASSETS}/c4/c4-validation.*.json.gz",
            "data.seq_len=32",
            "train.batch_size=4",
        ]
    return load_config(args.config, over)


def forward_only(loaded, cfg, windows) -> float:
    """Seconds of the teacher's forward over the windows the cache holds, as `build_cache` batches
    them (top-k taken, nothing written)."""
    order = BatchOrder(windows, batch_size=cfg.train.batch_size, seed=cfg.train.seed)
    steps = cfg.budget.tokens // (cfg.train.batch_size * cfg.data.seq_len)
    ids = order.window_ids(steps)
    layers = teacher_layers(cfg, loaded.model, loaded.tokenizer)
    online = OnlineTeacher(loaded.model, tuple(layers))
    needs = Needs(logits=True, layers=tuple(layers))
    dev = next(loaded.model.parameters()).device

    def run():
        for b in range(0, len(ids), BUILD_BATCH):
            x = torch.from_numpy(windows[ids[b : b + BUILD_BATCH]]).long().to(dev)
            sig = online.signals(x, needs)
            vals, idx, _ = TopK.from_teacher(
                sig.source, k=cfg.teacher.cache_top_k, window_ids=ids[b : b + BUILD_BATCH], T=x.shape[1], identity={}
            )
            for layer in layers:
                sig.hidden[layer].cpu()
            vals.cpu(), idx.cpu()

    try:
        seconds, _ = M.timed(run, dev)
    finally:
        if online.capture is not None:
            online.capture.remove()
    return seconds


def bytes_by_kind(manifest: dict, cache_dir: Path) -> dict:
    """Bytes on disk per array kind (tokens, topk_*, hidden_L<l>[_scale]; the codec is the config's)."""
    out: dict[str, int] = {}
    for f in manifest["files"]:
        kind = re.sub(r"^parts/p\d+of\d+\.|\.bin$", "", f)  # parts/<part>.<field>.bin
        out[kind] = out.get(kind, 0) + (cache_dir / f).stat().st_size
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="demo", help="config name or YAML path")
    p.add_argument("--method", default="hld-joint", help="objective.method (hld-* store hidden layers)")
    p.add_argument("--tokens", type=int, default=8192, help="tokens to cache (budget.tokens)")
    p.add_argument("--tiny", action="store_true", help="tiny teacher and the test fixtures")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = p.parse_args(argv)
    if args.tiny:
        args.tokens = min(args.tokens, 1024)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = config(args)
    resources = Resources()
    loaded = resources.teacher(cfg.teacher.model, cfg.teacher.dtype)  # loaded and tokenised before timing
    dev = M.device()
    loaded.model.to(dev)
    d = cfg.data
    windows = resources.windows(
        d.train, loaded.tokenizer, seq_len=d.seq_len, text_field=d.text_field, max_docs=d.max_train_docs
    )
    work = Path(tempfile.mkdtemp(prefix="hld-bench-cache-"))
    try:
        seconds, manifest = M.timed(lambda: ensure_cache([cfg], work / "cache", resources, quiet=True), dev)
        kinds = bytes_by_kind(manifest, work / "cache")
        forward_s = forward_only(loaded, cfg, windows)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(args, cfg, loaded, manifest, seconds, forward_s, kinds)


def report(args, cfg, loaded, manifest: dict, seconds: float, forward_s: float, kinds: dict) -> None:
    n = manifest["tokens"]
    vocab = loaded.model.get_input_embeddings().weight.shape[0]
    res = {
        "benchmark": "cache",
        "machine": M.machine(),
        "config": args.config,
        "method": args.method,
        "teacher": cfg.teacher.model,
        "teacher_dtype": str(next(loaded.model.parameters()).dtype)[6:],
        "seq_len": cfg.data.seq_len,
        "top_k": manifest["identity"]["top_k"],
        "layers": manifest["identity"]["layers"],
        "tokens": n,
        "seconds": seconds,
        "tokens_per_s": n / seconds,
        "bytes": manifest["bytes"],
        "bytes_per_token": manifest["bytes"] / n,
        "bytes_per_token_by_kind": {k: v / n for k, v in kinds.items()},
        "teacher_forward_seconds": forward_s,
        "teacher_forward_tokens_per_s": n / forward_s,
        "build_vs_forward": forward_s / seconds,
        "dense_fp16_logits_bytes_per_token": 2 * vocab,
    }
    print(
        f"teacher cache: {res['teacher']} ({res['teacher_dtype']}), {args.config} config, method {args.method}, "
        f"top-{res['top_k']}, layers {res['layers']}, {n} tokens of {res['seq_len']}, on {res['machine']['device']}"
    )
    rows = [
        ["build (ensure_cache)", f"{seconds:.2f}", f"{res['tokens_per_s']:,.0f}"],
        ["teacher forward only", f"{forward_s:.2f}", f"{res['teacher_forward_tokens_per_s']:,.0f}"],
    ]
    print(M.table(rows, ["", "seconds", "tokens/s"]))
    print(f"build throughput / forward-only throughput: {res['build_vs_forward']:.2f}")
    rows = [[k, f"{v:,.0f}"] for k, v in sorted(res["bytes_per_token_by_kind"].items())]
    rows.append(["total", f"{res['bytes_per_token']:,.0f}"])
    rows.append(["(dense fp16 logits instead)", f"{res['dense_fp16_logits_bytes_per_token']:,.0f}"])
    print(M.table(rows, ["bytes per token", "bytes"]))
    if args.json:
        print(json.dumps(res))


if __name__ == "__main__":
    main()
