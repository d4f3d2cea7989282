"""Build the offline teacher cache a config needs (`hld cache-teacher`, and `hld run` before its arms):
the windows its budget reads, the top-k logits and the teacher layers its objectives match."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from hld.config import RunConfig
from hld.data.loader import BatchOrder
from hld.distill.cache import CachedTeacher, build_cache, check_out_dir
from hld.distill.cache_codec import Codec, codec_from_manifest
from hld.distill.mapping import layer_pairs
from hld.errors import HldError
from hld.flops import forward_flops_per_token
from hld.models.hooks import n_blocks
from hld.models.student import resolve_shape
from hld.train.budget import planned_steps
from hld.train.loop import cache_identity
from hld.train.resources import Resources


def teacher_layers(cfg: RunConfig, n_teacher: int) -> list[int]:
    """Teacher layers the config's hidden loss would match (for any HLD method)."""
    n_student = resolve_shape(cfg.student).n_layers
    return sorted({t for _, t in layer_pairs(cfg.objective.hidden, n_student=n_student, n_teacher=n_teacher)})


def codec_of(cfg: RunConfig) -> Codec:
    """The codec a cache built for `cfg` uses (index_bits is set from the teacher's vocabulary)."""
    t = cfg.teacher
    return Codec(logits=t.cache_codec, hidden=t.cache_hidden_dtype, value_bits=t.cache_value_bits)


def ensure_cache(cfgs: Iterable[RunConfig], out: Path, resources: Resources, *, quiet: bool = False) -> dict:
    """One cache serving every config in `cfgs` (same teacher, data, packing, seed and batch order).
    Reuses `out` if it already matches; returns its manifest (with the build's cost)."""
    cfgs = list(cfgs)
    cfg = cfgs[0]
    for other in cfgs[1:]:
        same = (other.teacher.model, other.data, other.train.seed, other.train.batch_size) == \
               (cfg.teacher.model, cfg.data, cfg.train.seed, cfg.train.batch_size)
        if not same:
            raise HldError("configs sharing one teacher cache differ in teacher, data, seed or batch size",
                           "give each group of runs its own cache")
    out = Path(out)
    check_out_dir(out)  # before anything loads: a directory that is not a cache is never replaced
    loaded = resources.teacher(cfg.teacher.model, cfg.teacher.dtype)
    tok = loaded.tokenizer
    vocab = loaded.model.get_input_embeddings().weight.shape[0]
    if cfg.teacher.cache_top_k > vocab:
        raise HldError(f"teacher.cache_top_k={cfg.teacher.cache_top_k} exceeds the teacher's vocabulary ({vocab})",
                       f"set teacher.cache_top_k to at most {vocab}")
    d = cfg.data
    windows = resources.windows(d.train, tok, seq_len=d.seq_len, text_field=d.text_field, max_docs=d.max_train_docs)
    order = BatchOrder(windows, batch_size=cfg.train.batch_size, seed=cfg.train.seed)
    steps = max(planned_steps(c, loaded.model) for c in cfgs)
    n_t = n_blocks(loaded.model)
    layers = sorted({layer for c in cfgs if c.objective.method.startswith("hld") for layer in teacher_layers(c, n_t)})
    identity = cache_identity(cfg, loaded.identity, tok, windows, layers=layers, top_k=cfg.teacher.cache_top_k)
    codec = codec_of(cfg)
    if (out / "manifest.json").exists():
        try:
            CachedTeacher(out, expect=identity, verify=False)
            manifest = json.loads((out / "manifest.json").read_text())
            have = codec_from_manifest(manifest)
            same_codec = (have.logits, have.hidden, have.value_bits) == (codec.logits, codec.hidden, codec.value_bits)
            if same_codec and set(order.window_ids(steps).tolist()) <= {w for s in manifest["shards"] for w in s["window_ids"]}:
                manifest["bytes"] = sum((out / f).stat().st_size for f in manifest["files"])
                manifest["reused"] = True
                return manifest
        except HldError:
            pass  # stale: rebuild
    manifest = build_cache(loaded.model, windows, order.window_ids(steps), out, identity=identity, codec=codec,
                           quiet=quiet)
    manifest["build_flops"] = forward_flops_per_token(loaded.model, d.seq_len) * manifest["tokens"]
    return manifest
