"""Build the offline teacher cache a config needs (`hld cache-teacher`, and `hld run` before its arms):
the windows its budget reads, the top-k logits and the teacher layers its objectives match."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch

from hld.cache.chunks import chunk_build, holds_stats, measure_stats, stats_wanted
from hld.cache.codec import Codec
from hld.cache.meta import build_dir_of, build_progress, cache_identity, is_cache, paired_identity, signal_identity
from hld.cache.reader import CachedTeacher, read_manifest
from hld.cache.store import Parts, check_records, open_windows
from hld.cache.writer import build_cache, check_out_dir
from hld.config import RunConfig, to_dict
from hld.data.loader import BatchOrder, PairedOrder
from hld.data.paired import PairedWindows
from hld.data.tokenize import require_stores
from hld.distill.signals.online import OnlineTeacher
from hld.errors import HldError, sigterm_as_error
from hld.flops import forward_flops_per_token
from hld.models.loading import meta_causal_lm, model_config, resolve_model_dir
from hld.train.budget import sized_plan
from hld.train.resources import Resources

if TYPE_CHECKING:
    from hld.data.store import WindowArray


def cache_share_key(cfg: RunConfig) -> str:
    """Configs with equal keys read the same training windows in the same order with the same teacher
    signals: one cache serves them (a study's cache groups, `ensure_cache`'s check)."""
    t = cfg.teacher
    key = [
        t.model,
        t.dtype,
        t.cache_top_k,
        t.cache_codec,
        t.cache_hidden_dtype,
        t.cache_value_bits,
        to_dict(cfg.data),
        cfg.train.seed,
        cfg.train.batch_size,
    ]
    signal = signal_identity(t)  # appended only when sampled: a top-k group keeps the id (and cache) it had
    # a student with its own tokenizer: a per-chunk cache, of its tokenizer and the loss it reads
    paired = [cfg.student.tokenizer, to_dict(cfg.objective.cross_tokenizer)] if cfg.student.tokenizer else []
    return json.dumps(key + ([signal] if signal else []) + paired, sort_keys=True)


def teacher_layers(cfg: RunConfig, teacher: torch.nn.Module, tokenizer) -> list[int]:
    """Teacher layers the config's objectives read (none for CE and KD), from its meta-device assembly."""
    return sorted(sized_plan(cfg, teacher, tokenizer)[0].needs.layers)


def codec_of(cfg: RunConfig) -> Codec:
    """The codec a cache built for `cfg` uses (index_bits is set from the teacher's vocabulary)."""
    t = cfg.teacher
    logits = "sampled" if t.cache_signal == "sampled" else t.cache_codec
    return Codec(logits=logits, hidden=t.cache_hidden_dtype, value_bits=t.cache_value_bits)


def cache_slots(cfg: RunConfig, vocab: int) -> int:
    """Logit entries per token a cache built for `cfg` stores: k, or a sampled signal's slots (at most
    cache_samples distinct ids can be drawn, and at most V)."""
    t = cfg.teacher
    return min(t.cache_samples, vocab) if t.cache_signal == "sampled" else t.cache_top_k


def ensure_cache(
    cfgs: Iterable[RunConfig],
    out: Path,
    resources: Resources,
    *,
    part: tuple[int, int] = (0, 1),
    quiet: bool = False,
) -> dict:
    """One cache serving every config in `cfgs` (same teacher, data, packing, seed and batch order).
    Reuses `out` if it already matches (verified); else builds part `part` = (I, N) of it (resuming:
    committed shards are kept). Returns its manifest (with the build's cost), or, when other parts
    are still to come, a row with `assembled: False` and the shards done."""
    cfgs = list(cfgs)
    cfg = cfgs[0]
    for other in cfgs[1:]:
        if cache_share_key(other) != cache_share_key(cfg):
            raise HldError(
                "configs sharing one teacher cache differ in teacher, teacher dtype, cache_top_k, cache signal, data, "
                "seed or batch size",
                "give each group of runs its own cache",
            )
    out = Path(out)
    check_out_dir(out)  # before anything loads: a directory that is not a cache is never replaced
    require_stores(cfg.data, cfg.name)  # a hub corpus without a token store: refused before the teacher loads
    # the teacher's shapes on the meta device and its weights' identity from their files: a cache that
    # is already complete is checked and reused without loading the weights (every study cell does this)
    source, teacher_id = resolve_model_dir(cfg.teacher.model)
    shapes = meta_causal_lm(model_config(source))
    tok = resources.tokenizer(cfg.teacher.model)
    vocab = shapes.get_input_embeddings().weight.shape[0]
    if cfg.teacher.cache_signal == "topk" and cfg.teacher.cache_top_k > vocab:
        raise HldError(
            f"teacher.cache_top_k={cfg.teacher.cache_top_k} exceeds the teacher's vocabulary ({vocab})",
            f"set teacher.cache_top_k to at most {vocab}",
        )
    d = cfg.data
    student_tok = resources.tokenizer(cfg.student.tokenizer, "student.tokenizer") if cfg.student.tokenizer else None
    windows: WindowArray | PairedWindows
    if student_tok is not None:  # paired windows: a per-chunk cache (hld.cache.chunks)
        windows = resources.paired_windows(d, tok, student_tok)
        order: BatchOrder = PairedOrder(windows, batch_size=cfg.train.batch_size, seed=cfg.train.seed)
        t_len = windows.teacher_seq_len
        sized = [sized_plan(c, shapes, tok, student_tokenizer=student_tok, teacher_seq_len=t_len) for c in cfgs]
    else:
        windows = resources.train_windows(d, tok)
        order = BatchOrder(windows, batch_size=cfg.train.batch_size, seed=cfg.train.seed)
        sized = [sized_plan(c, shapes, tok) for c in cfgs]
    steps = max(n for _, n in sized)
    layers = sorted({layer for plan, _ in sized for layer in plan.needs.layers})
    chunk_spec, stats = None, None
    if student_tok is not None:
        assert isinstance(windows, PairedWindows)
        plans = [plan for plan, _ in sized]
        stats = stats_wanted(plans, cfgs, n_windows=order.n_windows, max_windows=steps * cfg.train.batch_size)
        identity = paired_identity(
            plans, teacher=teacher_id, tokenizer=tok, student_tokenizer=student_tok, windows=windows
        )
        chunk_spec = chunk_build(plans)
        codec = Codec(logits="chunks", index_bits=max(1, (vocab - 1).bit_length()))
    else:
        assert not isinstance(windows, PairedWindows)
        identity = cache_identity(
            teacher=teacher_id,
            tokenizer=tok,
            seq_len=d.seq_len,
            train_windows=windows,
            layers=layers,
            top_k=cache_slots(cfg, vocab),
            **signal_identity(cfg.teacher),
        )
        codec = replace(codec_of(cfg), index_bits=max(1, (vocab - 1).bit_length()))
    ids = order.window_ids(steps)
    reused = reusable(out, identity, codec, ids, stats=stats)
    if reused is not None:
        return reused
    loaded = resources.teacher(cfg.teacher.model, cfg.teacher.dtype)
    if loaded.identity != teacher_id:  # the weights changed on disk since their identity was taken
        raise HldError(f"the teacher {cfg.teacher.model} changed while the cache was planned", "rerun the command")
    extra = None
    if stats is not None:  # a per-chunk cache's standardisation statistics, measured on the token states
        online = OnlineTeacher(loaded.model, tuple(stats["layers"]))
        try:
            extra = {"layer_stats": measure_stats(online, order, stats)}
        finally:
            assert online.capture is not None
            online.capture.remove()
    with sigterm_as_error(
        f"stopped by SIGTERM while building the teacher cache {out}; its committed shards are kept "
        f"(in {build_dir_of(out)})",
        "rerun the same command: it builds only the shards still missing (hld run and hld study resume there)",
    ):
        home = next(loaded.model.parameters()).device
        try:
            manifest = build_cache(
                loaded.model.to(_build_device()),
                windows,
                ids,
                out,
                identity=identity,
                codec=codec,
                part=part,
                quiet=quiet,
                chunk_spec=chunk_spec,
                extra=extra,
            )
        finally:
            loaded.model.to(home)
    if manifest is None:  # other parts of the build are still to come
        done, total = build_progress(out) or (0, 0)
        return {"assembled": False, "shards_done": done, "shards": total, "tokens": None, "identity": asdict(identity)}
    manifest["build_flops"] = forward_flops_per_token(loaded.model, d.seq_len) * manifest["tokens"]
    return manifest


def reusable(out: Path, identity, codec: Codec, ids, *, stats: Optional[dict] = None) -> Optional[dict]:
    """The manifest of the cache at `out` if it serves `identity` with `codec` for windows `ids` (and, a
    per-chunk cache, holds the standardisation statistics `stats` names), every checksum verified (stamped
    ones trusted); None when it must be (re)built."""
    if not is_cache(out):
        return None
    try:
        reader = CachedTeacher(out, expect=identity)
    except HldError:
        return None  # another identity, format or damaged manifest: rebuild
    m = reader.manifest
    if Codec(**m["codec"]) != codec:  # (more layers or a larger k than asked for serve too)
        return None
    if not reader.holds(ids):
        return None
    if stats is not None and not holds_stats(m.get("layer_stats"), stats):
        return None
    try:
        reader.parts.verify_all()
    except HldError:
        return None  # a damaged shard: rebuild (what training would advise)
    return m | {"bytes": sum(m["files"].values()), "reused": True}


def verify_cache(out: Path, *, quiet: bool = False) -> dict:
    """`hld cache-teacher --verify`: every shard of the cache at `out` against its checksums now (the
    stamps ignored and rewritten); an HldError naming the first damaged one."""
    import time

    t0 = time.time()
    manifest = read_manifest(out)
    check_records(out, manifest)
    open_windows(out, manifest)
    n = Parts(out, manifest, verify=True).verify_all(force=True)
    row = {"cache_dir": str(out), "verified": n, "shards": len(manifest["shards"]), "seconds": time.time() - t0}
    if not quiet:
        print(f"teacher cache {out}: {row['shards']} shards ({n} arrays) match their checksums")
    return row


def _build_device() -> torch.device:
    """Where a build runs the teacher: this process's GPU (torchrun's LOCAL_RANK) when there is one."""
    from hld.distributed import launch_env

    return torch.device("cuda", launch_env()[2]) if torch.cuda.is_available() else torch.device("cpu")
