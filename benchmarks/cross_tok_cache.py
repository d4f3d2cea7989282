"""A teacher cache for a student with another tokenizer: the per-chunk cache (hld.cache.chunks) against a cache in
teacher tokens (hld.cache.writer's top-64, the format a same-tokenizer run reads), on the shipped sample corpus
with the shipped student tokenizer `sample-bpe-8k` and the teacher Gemma 3 270M (the demo config's windows,
data.seq_len 128, in the run's batch order).

- Size, in bytes per student token (the windows' real tokens, BOS included): each loss's per-chunk cache as
  written by `build_cache` (every field, offsets and digests included), and the hld-joint cache's pooled
  layers; against the teacher-token cache: its top-64 at every teacher position (exact: float16 + int32 +
  the rest; compact: encoded by the cache's own codec on these windows' teacher logits), and its hidden
  states (fp8 or bfloat16) at every teacher position, times the teacher positions per student token.
- Time of the teacher's part of a training step, per batch: online (the teacher's forward on the batch's
  teacher rows and the loss's teacher side at the chunks, `chunk_values`: what the online objective runs)
  against cached (`CachedTeacher` reading the batch's values from disk, checksums checked once, no
  prefetch). The student's part of the step is the same either way (not timed).
- Gold's truncation: the teacher's mass off its top-64 shared outcomes at the one-token chunks (what the
  per-chunk cache keeps of gold's exact part; docs/cache-format.md).

    OMP_NUM_THREADS=1 python benchmarks/cross_tok_cache.py --windows 16 --batch 4
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _measure import machine  # noqa: E402

from hld.cache.chunks import chunk_build, chunk_values  # noqa: E402
from hld.cache.codec import Codec, ShardWriter  # noqa: E402
from hld.cache.meta import paired_identity  # noqa: E402
from hld.cache.reader import CachedTeacher  # noqa: E402
from hld.cache.writer import build_cache  # noqa: E402
from hld.config import load_config  # noqa: E402
from hld.data.loader import PairedOrder  # noqa: E402
from hld.data.packing import make_paired_batch  # noqa: E402
from hld.distill.cross_tok.objectives import batch_chunks  # noqa: E402
from hld.distill.signals import Needs  # noqa: E402
from hld.distill.signals.online import OnlineTeacher  # noqa: E402
from hld.train.budget import sized_plan  # noqa: E402
from hld.train.resources import Resources  # noqa: E402

K = 64


def setup(args):
    res = Resources()
    base = ["student.tokenizer=sample-bpe-8k", f"train.batch_size={args.batch}"]
    cfg = load_config("demo", base)
    tok = res.tokenizer(cfg.teacher.model)
    stok = res.tokenizer("sample-bpe-8k", "student.tokenizer")
    pw = res.paired_windows(cfg.data, tok, stok)
    order = PairedOrder(pw, batch_size=args.batch, seed=cfg.train.seed)
    steps = -(-args.windows // args.batch)
    batches = [order.indices(s) for s in range(steps)]
    lm = res.teacher(cfg.teacher.model, cfg.teacher.dtype).model
    return res, base, tok, stok, pw, batches, lm


def plan_of(base, arm, loss, tok, stok, lm, pw):
    cfg = load_config("demo", [*base, f"objective.method={arm}", f"objective.cross_tokenizer.loss={loss}"])
    return sized_plan(cfg, lm, tok, student_tokenizer=stok, teacher_seq_len=pw.teacher_seq_len)[0]


def field_bytes(manifest: dict) -> dict[str, int]:
    out: dict[str, int] = {}
    for name, size in manifest["files"].items():
        key = name.split(".")[1]
        out[key] = out.get(key, 0) + size
    return out


def teacher_token_sizes(lm, pw, ids, layers) -> dict:
    """Bytes per teacher position of the top-64 cache of these windows' teacher rows (exact, compact by the
    codec), and of one layer's hidden states (fp8, bfloat16)."""
    online = OnlineTeacher(lm)
    vocab = lm.get_output_embeddings().weight.shape[0]
    codec = Codec(logits="compact", index_bits=max(1, (vocab - 1).bit_length()))
    compact, positions = 0, 0
    for w in ids:
        rows = pw.rows([int(w)])
        n = int(rows.teacher_lengths[0])
        x = torch.from_numpy(rows.teacher_ids[:, :n]).long()
        sig = online.signals(x, Needs(logits=True))
        top = sig.source.rows(slice(0, n)).as_top_k(K)
        nbytes = [0]

        def sink(key, a, nbytes=nbytes) -> None:
            nbytes[0] += a.nbytes

        shard = ShardWriter(sink, n=1, T=n, k=K, layers=[], codec=codec)
        shard.put(
            0,
            tokens=x.numpy(),
            vals=top.values.float()[None],
            idx=top.indices.int()[None],
            rest=top.rest.float()[None],
            hidden={},
        )
        shard.finish()
        compact += nbytes[0]
        positions += n
    d = lm.config.get_text_config().hidden_size
    return {
        "topk_exact": K * (2 + 4) + 4 + 4,  # float16 values, int32 ids, float32 rest, int32 token
        "topk_compact": compact / positions,
        "hidden_fp8_per_layer": d + 4,
        "hidden_bf16_per_layer": 2 * d,
        "d_model": d,
    }


def gold_tail(lm, pw, batches, spec) -> dict:
    """The teacher's mass off its top-64 shared outcomes at the one-token chunks."""
    from hld.distill.cross_tok.signal import OnlineChunks

    online = OnlineTeacher(lm)
    tails = []
    for ids in batches:
        batch = make_paired_batch(pw.rows(ids))
        sig = online(batch, Needs(logits=True))
        pred = batch_chunks(batch).predicted()
        for i in range(0, len(pred), 64):
            sl = slice(i, min(i + 64, len(pred)))
            keep = torch.zeros(len(pred), dtype=torch.bool)
            keep[sl] = True
            part = pred.select(keep)
            exact, _ = OnlineChunks(sig.source, batch.teacher_ids).gold(part, sl, spec)
            p = exact.float().exp()
            tails.append(1 - torch.topk(p, K, -1).values.sum(-1))
    t = torch.cat(tails)
    return {"one_token_chunks": len(t), "tail_mass_mean": float(t.mean()), "tail_mass_p90": float(t.quantile(0.9))}


def time_online(lm, pw, batches, plan, reps) -> float:
    build = chunk_build([plan])
    layers = sorted(plan.needs.layers)
    online = OnlineTeacher(lm, tuple(layers))
    needs = Needs(logits=True, layers=tuple(layers))
    best = []
    for ids in batches:
        batch = make_paired_batch(pw.rows(ids), window_ids=ids)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            sig = online(batch, needs)
            chunk_values(sig, batch, build.spec, layers, pooling=build.pooling)
            times.append(time.perf_counter() - t0)
        best.append(min(times))
    if online.capture is not None:
        online.capture.remove()
    return float(np.mean(best))


def time_cached(cache: Path, identity, pw, batches, plan, reps) -> float:
    reader = CachedTeacher(cache, expect=identity, workers=0)
    needs = Needs(logits=True, layers=tuple(sorted(plan.needs.layers)))
    best = []
    for ids in batches:
        batch = make_paired_batch(pw.rows(ids), window_ids=ids)
        reader(batch, needs)  # the checksums, checked once
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            reader(batch, needs)
            times.append(time.perf_counter() - t0)
        best.append(min(times))
    return float(np.mean(best))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--json", default=None, help="write the figures here too")
    args = ap.parse_args()
    torch.manual_seed(0)
    res, base, tok, stok, pw, batches, lm = setup(args)
    ids = np.unique(np.concatenate(batches))
    rows = pw.rows(ids)
    s_tokens, t_tokens = int(rows.student_lengths.sum()), int(rows.teacher_lengths.sum())
    chunks = sum(len(al.teacher_bounds) - 1 for al in rows.alignments)
    out: dict = {
        "machine": machine(),
        "windows": len(ids),
        "student_tokens": s_tokens,
        "teacher_per_student_token": t_tokens / s_tokens,
        "chunks_per_student_token": chunks / s_tokens,
        "teacher_dtype": str(next(lm.parameters()).dtype),
    }
    tt = teacher_token_sizes(lm, pw, ids, [])
    out["teacher_token_cache"] = tt
    ratio = t_tokens / s_tokens
    rows_out = []
    with tempfile.TemporaryDirectory() as tmp:
        for arm, loss in (("kd", "alm"), ("kd", "uld"), ("kd", "gold"), ("hld-joint", "uld")):
            plan = plan_of(base, arm, loss, tok, stok, lm, pw)
            identity = paired_identity([plan], teacher="bench", tokenizer=tok, student_tokenizer=stok, windows=pw)
            vocab = lm.get_output_embeddings().weight.shape[0]
            codec = Codec(logits="chunks", index_bits=max(1, (vocab - 1).bit_length()))
            cache = Path(tmp) / f"{arm}-{loss}"
            t0 = time.perf_counter()
            m = build_cache(
                lm,
                pw,
                ids,
                cache,
                identity=identity,
                codec=codec,
                batch_size=args.batch,
                quiet=True,
                chunk_spec=chunk_build([plan]),
            )
            build_s = time.perf_counter() - t0
            fb = field_bytes(m)
            pooled = sum(v for k, v in fb.items() if k.startswith("pooled_"))
            n_layers = len(plan.needs.layers)
            row = {
                "arm": arm,
                "loss": loss,
                "layers": sorted(plan.needs.layers),
                "bytes_per_student_token": sum(fb.values()) / s_tokens,
                "logit_part_per_student_token": (sum(fb.values()) - pooled) / s_tokens,
                "hidden_part_per_student_token": pooled / s_tokens,
                "fields": fb,
                "build_seconds": build_s,
                "teacher_part_online_s": time_online(lm, pw, batches, plan, args.reps),
                "teacher_part_cached_s": time_cached(cache, identity, pw, batches, plan, args.reps),
            }
            row["teacher_token_logits_compact_per_student_token"] = tt["topk_compact"] * ratio
            row["teacher_token_hidden_fp8_per_student_token"] = tt["hidden_fp8_per_layer"] * n_layers * ratio
            row["teacher_token_hidden_bf16_per_student_token"] = tt["hidden_bf16_per_layer"] * n_layers * ratio
            row["time_ratio_online_over_cached"] = row["teacher_part_online_s"] / row["teacher_part_cached_s"]
            rows_out.append(row)
            print(
                f"{arm:9s} {loss:4s}: per-chunk {row['logit_part_per_student_token']:7.1f} B/student token (logits) "
                f"+ {row['hidden_part_per_student_token']:6.1f} (pooled, {n_layers} layers) | teacher tokens: top-64 "
                f"compact {row['teacher_token_logits_compact_per_student_token']:6.1f}, exact "
                f"{tt['topk_exact'] * ratio:6.1f}, hidden fp8 {row['teacher_token_hidden_fp8_per_student_token']:7.1f} "
                f"| teacher part online {row['teacher_part_online_s'] * 1e3:7.1f} ms, cached "
                f"{row['teacher_part_cached_s'] * 1e3:6.2f} ms ({row['time_ratio_online_over_cached']:.0f}x)",
                flush=True,
            )
    out["rows"] = rows_out
    gold_plan = plan_of(base, "kd", "gold", tok, stok, lm, pw)
    out["gold_tail"] = gold_tail(lm, pw, batches, chunk_build([gold_plan]).spec)
    print(
        f"windows {len(ids)}, {s_tokens} student tokens, {ratio:.3f} teacher positions and "
        f"{out['chunks_per_student_token']:.3f} chunks per student token; gold: teacher mass off its top-64 shared "
        f"outcomes mean {out['gold_tail']['tail_mass_mean']:.4f} (p90 {out['gold_tail']['tail_mass_p90']:.4f}) "
        f"over {out['gold_tail']['one_token_chunks']} one-token chunks"
    )
    print(json.dumps(out["machine"]))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
