"""What a teacher cache is built for and where it stands on disk: the identity a run checks against a
cache's manifest (`CacheIdentity`, `cache_identity`, the sampled signal's keys), the build directory of a
cache (`build_dir_of`) and how far an unfinished build has come, and whether a directory is a cache.
The build: hld.cache.writer; the read side: hld.cache.reader."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from hld import files
from hld.cache import store as cs
from hld.cache.chunks import chunk_identity, chunk_top_k
from hld.errors import HldError
from hld.fingerprint import tokenizer_fingerprint, windows_fingerprint

if TYPE_CHECKING:
    from hld.data.paired import PairedWindows
    from hld.data.store import WindowArray
    from hld.distill.objectives import Plan


@dataclass
class CacheIdentity:
    """What must match between a cache and the run that reads it."""

    teacher: str  # weights identity (hash)
    tokenizer: str  # tokenizer fingerprint
    seq_len: int
    layers: list  # hidden layers stored
    top_k: int  # a sampled signal: its slots per token, min(cache_samples, V)
    data: str  # fingerprint of the windows (their token content)
    cache_signal: str = "topk"  # topk | sampled | chunks (no kind is ever read as another)
    cache_samples: Optional[int] = None  # sampled: draws per token
    cache_proposal_temperature: Optional[float] = None  # sampled: tau of the proposal softmax(z / tau)
    chunks: Optional[dict] = None  # chunks: what the stored values depend on (hld.cache.chunks.chunk_identity)


SIGNAL_KEYS = {"cache_signal": "topk", "cache_samples": None, "cache_proposal_temperature": None, "chunks": None}


def signal_identity(teacher) -> dict:
    """The identity keys of the logit signal a `TeacherConfig` asks of a cache (none beyond the
    defaults for topk)."""
    if teacher.cache_signal != "sampled":
        return {}
    return {
        "cache_signal": "sampled",
        "cache_samples": int(teacher.cache_samples),
        "cache_proposal_temperature": float(teacher.cache_proposal_temperature),
    }


def cache_identity(
    *, teacher: str, tokenizer, seq_len: int, train_windows: WindowArray | PairedWindows, layers, top_k: int, **signal
) -> CacheIdentity:
    """The identity a run expects of its cache (and a build writes): `teacher` is the weights' identity;
    `signal`: `signal_identity(cfg.teacher)` (the sampled signal's keys)."""
    return CacheIdentity(
        **signal,
        teacher=teacher,
        tokenizer=tokenizer_fingerprint(tokenizer),
        seq_len=seq_len,
        layers=sorted(layers),
        top_k=top_k,
        data=windows_fingerprint(train_windows),
    )


def paired_identity(plans: list[Plan], *, teacher: str, tokenizer, student_tokenizer, windows: PairedWindows):
    """The identity of the per-chunk cache serving `plans` (a run's one, or a cache group's): a
    `CacheIdentity` of kind `chunks`, its `chunks` the union of the plans' `chunk_identity`."""
    chunks: dict = {}
    for plan in plans:
        chunks |= {k: v for k, v in chunk_identity(plan, student_tokenizer=student_tokenizer).items() if v is not None}
    chunks.setdefault("loss", None)
    return cache_identity(
        teacher=teacher,
        tokenizer=tokenizer,
        seq_len=windows.seq_len,
        train_windows=windows,
        layers=sorted({layer for plan in plans for layer in plan.needs.layers}),
        top_k=max(chunk_top_k(plan, len(tokenizer)) for plan in plans),
        cache_signal="chunks",
        chunks=chunks,
    )


def build_dir_of(out: Path) -> Path:
    """Where the cache at `out` is built (and a killed build's committed shards wait to be resumed)."""
    return Path(out).parent / f".{Path(out).name}.build"


def read_plan(d: Path) -> Optional[dict]:
    """The plan of the build directory `d` (None: none yet, or unreadable)."""
    try:
        return json.loads(files.read_text(d / "plan.json", "cache plan", "", max_bytes=files.MAX_MANIFEST_BYTES))
    except (HldError, OSError, ValueError):
        return None


def build_progress(out: Path) -> Optional[tuple[int, int]]:
    """(shards committed, shards planned) of an unfinished build of the cache at `out`, if any."""
    d = build_dir_of(out)
    plan = read_plan(d)
    if plan is None:
        return None
    return len(cs.committed(d)), cs.n_shards(plan)


def is_cache(path: Path) -> bool:
    """A directory `hld cache-teacher` wrote: its manifest.json holds hld's own fields (a format
    version, the identity, the shards), not just any tool's `format_version`."""
    try:
        f = Path(path) / "manifest.json"
        manifest = json.loads(files.read_text(f, "cache manifest", "", max_bytes=files.MAX_MANIFEST_BYTES))
    except (HldError, OSError, ValueError):
        return False
    return (
        isinstance(manifest, dict)
        and "format_version" in manifest
        and isinstance(manifest.get("identity"), dict)
        and "teacher" in manifest["identity"]
        and "shards" in manifest
    )
