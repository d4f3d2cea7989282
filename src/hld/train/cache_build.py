"""Build the offline teacher cache a config needs (`hld cache-teacher`, and `hld run` before its arms):
the windows its budget reads, the top-k logits and the teacher layers its objectives match."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch

from hld.config import RunConfig, to_dict
from hld.data.loader import BatchOrder
from hld.data.tokenize import require_stores
from hld.distill.cache import CachedTeacher, build_cache, cache_identity, check_out_dir
from hld.distill.cache_codec import Codec, codec_from_manifest
from hld.errors import HldError, sigterm_as_error
from hld.flops import forward_flops_per_token
from hld.train.budget import sized_plan
from hld.train.resources import Resources


def cache_share_key(cfg: RunConfig) -> str:
    """Configs with equal keys read the same training windows in the same order with the same teacher
    signals: one cache serves them (a study's cache groups, `ensure_cache`'s check)."""
    t = cfg.teacher
    return json.dumps(
        [
            t.model,
            t.dtype,
            t.cache_top_k,
            t.cache_codec,
            t.cache_hidden_dtype,
            t.cache_value_bits,
            to_dict(cfg.data),
            cfg.train.seed,
            cfg.train.batch_size,
        ],
        sort_keys=True,
    )


def teacher_layers(cfg: RunConfig, teacher: torch.nn.Module, tokenizer) -> list[int]:
    """Teacher layers the config's objectives read (none for CE and KD), from its meta-device assembly."""
    return sorted(sized_plan(cfg, teacher, tokenizer)[0].needs.layers)


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
        if cache_share_key(other) != cache_share_key(cfg):
            raise HldError(
                "configs sharing one teacher cache differ in teacher, teacher dtype, cache_top_k, data, "
                "seed or batch size",
                "give each group of runs its own cache",
            )
    out = Path(out)
    check_out_dir(out)  # before anything loads: a directory that is not a cache is never replaced
    require_stores(cfg.data, cfg.name)  # a hub corpus without a token store: refused before the teacher loads
    loaded = resources.teacher(cfg.teacher.model, cfg.teacher.dtype)
    tok = loaded.tokenizer
    vocab = loaded.model.get_input_embeddings().weight.shape[0]
    if cfg.teacher.cache_top_k > vocab:
        raise HldError(
            f"teacher.cache_top_k={cfg.teacher.cache_top_k} exceeds the teacher's vocabulary ({vocab})",
            f"set teacher.cache_top_k to at most {vocab}",
        )
    d = cfg.data
    windows = resources.train_windows(d, tok)
    order = BatchOrder(windows, batch_size=cfg.train.batch_size, seed=cfg.train.seed)
    sized = [sized_plan(c, loaded.model, tok) for c in cfgs]
    steps = max(n for _, n in sized)
    layers = sorted({layer for plan, _ in sized for layer in plan.needs.layers})
    identity = cache_identity(
        teacher=loaded.identity,
        tokenizer=tok,
        seq_len=d.seq_len,
        train_windows=windows,
        layers=layers,
        top_k=cfg.teacher.cache_top_k,
    )
    codec = codec_of(cfg)
    if (out / "manifest.json").exists():
        try:
            CachedTeacher(out, expect=identity, verify=False)
            manifest = json.loads((out / "manifest.json").read_text())
            have = codec_from_manifest(manifest)
            same_codec = (have.logits, have.hidden, have.value_bits) == (codec.logits, codec.hidden, codec.value_bits)
            held = {w for s in manifest["shards"] for w in s["window_ids"]}
            if same_codec and set(order.window_ids(steps).tolist()) <= held:
                manifest["bytes"] = sum((out / f).stat().st_size for f in manifest["files"])
                manifest["reused"] = True
                return manifest
        except HldError:
            pass  # stale: rebuild
    with sigterm_as_error(
        f"stopped by SIGTERM while building the teacher cache {out}; what it held before is kept",
        "rerun the same command to build it (hld run and hld study resume there)",
    ):
        manifest = build_cache(
            loaded.model, windows, order.window_ids(steps), out, identity=identity, codec=codec, quiet=quiet
        )
    manifest["build_flops"] = forward_flops_per_token(loaded.model, d.seq_len) * manifest["tokens"]
    return manifest
