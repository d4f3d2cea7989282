"""A teacher cache of synthetic signals at a real teacher's shapes (no teacher runs): written through
the same ShardWriter / PartWriter / assemble as `build_cache`, so the reader sees a real format-4 cache.
Top-k: k distinct ids drawn from V (a few small gaps, as a real teacher's), logits descending with
the spread of a trained LM's top-k; hidden states: normal, scaled per row like a residual stream."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from hld.cache import store as cs
from hld.cache.codec import Codec, ShardWriter
from hld.cache.meta import CacheIdentity
from hld.data.packing import PROTOCOL


def write(
    out: Path,
    *,
    n_windows: int,
    T: int,
    k: int,
    V: int,
    d: int,
    layers: list[int],
    codec: Codec,
    shard_windows: int,
    seed: int = 0,
) -> dict:
    """Write the cache at `out` (a new directory); returns its manifest."""
    codec = Codec(**(asdict(codec) | {"index_bits": max(1, (V - 1).bit_length())}))
    ident = CacheIdentity(teacher="synthetic", tokenizer="synthetic", seq_len=T, layers=layers, top_k=k, data="synth")
    plan = {
        "format": cs.FORMAT,
        "format_version": cs.FORMAT_VERSION,
        "protocol": PROTOCOL,
        "identity": asdict(ident),
        "codec": codec.to_json(),
        "seq_len": T,
        "d_model": d,
        "vocab_size": V,
        "n_windows": n_windows,
        "tokens": n_windows * T,
        "shard_windows": shard_windows,
        "windows": {"first": 0, "count": n_windows},
        "teacher_config": {"hidden_size": d, "vocab_size": V},
    }
    plan = json.loads(json.dumps(plan))
    out = Path(out)
    out.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    writer = cs.PartWriter(out, cs.part_name(0, 1))
    for s in range(cs.n_shards(plan)):
        lo, hi = cs.shard_rows(plan, s)
        n = hi - lo
        shard = ShardWriter(writer.sink, n=n, T=T, k=k, layers=layers, codec=codec)
        for b in range(0, n, 8):
            m = min(8, n - b)
            shard.put(b, **_signals(rng, m, T, k, V, d, layers))
        slot_bits = shard.finish()
        writer.commit({"shard": s, "rows": [lo, hi]} | ({"slot_bits": slot_bits} if slot_bits is not None else {}))
    writer.close()
    return cs.assemble(out, plan)


def _signals(rng, n: int, T: int, k: int, V: int, d: int, layers: list[int]) -> dict:
    rows = n * T
    # k distinct ids per row: a cluster of small gaps plus a few far ones
    ids = np.sort(rng.choice(V, size=(rows, 4 * k), replace=True), axis=1)[:, ::4][:, :k]
    ids = ids + np.arange(k)  # distinct (ascending, gaps >= 0)
    ids = np.minimum(ids, V - 1 - np.arange(k)[::-1])
    perm = rng.permuted(np.tile(np.arange(k), (rows, 1)), axis=1)
    idx = np.take_along_axis(ids, perm, 1)
    vals = np.sort(rng.normal(0, 2.0, (rows, k)), axis=1)[:, ::-1] + 20.0  # descending
    rest = vals[:, 0] - rng.uniform(0.5, 4.0, rows)
    hidden = {layer: torch.from_numpy(rng.normal(0, 1.0, (n, T, d)).astype(np.float32)) for layer in layers}
    return {
        "tokens": rng.integers(0, V, (n, T)).astype(np.int32),
        "vals": torch.from_numpy(vals.astype(np.float32).reshape(n, T, k)),
        "idx": torch.from_numpy(idx.astype(np.int64).reshape(n, T, k)),
        "rest": torch.from_numpy(rest.astype(np.float32).reshape(n, T)),
        "hidden": hidden,
    }
