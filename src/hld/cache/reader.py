"""Offline teacher cache: the teacher runs once over the training windows; every KD/HLD run then
reads its signals from disk instead of running it. Layout, records and checksums:
hld.cache.store (format 4, docs/cache-format.md); the arrays' codecs: hld.cache.codec
(`exact` top-k logits / `compact` ones, bfloat16 / fp8 hidden states); windows follow
`hld.data.packing.PROTOCOL` (BOS-led).

The build: hld.cache.writer (resumable, shared between processes); a cache's identity and
its build directory: hld.cache.meta. This module reads a finished cache; a cache of an older
format or protocol is refused with a message to rebuild it.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from hld.atomic import read_json_object
from hld.cache import store as cs
from hld.cache.chunks import CachedChunkSignals, batch_digests, read_chunks, stored_stats
from hld.cache.codec import Codec, read_hidden, read_logits
from hld.cache.meta import SIGNAL_KEYS, CacheIdentity, build_dir_of, build_progress
from hld.data.packing import PROTOCOL, Batch
from hld.distill.signals import Needs, TeacherSignals
from hld.distill.signals.registry import CACHE_CODECS
from hld.errors import HldError

FORMAT_VERSION = cs.FORMAT_VERSION


class CachedTeacher:
    """Teacher signals read from a cache; same call as `OnlineTeacher`, same `TeacherSignals` out.
    Opening checks identity, records and file sizes (no data read); each shard's fields are checked
    against their sha256 the first time they are read (`verify`), before anything uses them."""

    def __init__(self, cache_dir: Path, *, expect: CacheIdentity, verify: bool = True, workers: int = 2) -> None:
        self.dir = Path(cache_dir)
        self.manifest = read_manifest(self.dir)
        self._check_identity(expect)
        cs.check_records(self.dir, self.manifest)
        self.first, self.ids = cs.open_windows(self.dir, self.manifest)
        self.parts = cs.Parts(self.dir, self.manifest, verify=verify)
        self.codec = Codec(**self.manifest["codec"])
        self.vocab = int(self.manifest["vocab_size"])
        self.shard_windows = int(self.manifest["shard_windows"])
        self.workers = workers
        self._pool: Optional[ThreadPoolExecutor] = None
        self._ahead: dict[tuple, Future] = {}  # (window ids, T, needs) -> the read under way

    def _check_identity(self, expect: CacheIdentity) -> None:
        have = SIGNAL_KEYS | self.manifest["identity"]  # (caches from before the sampled signal: topk)
        for key in ("teacher", "tokenizer", "seq_len", "data", *SIGNAL_KEYS):
            got, want = have.get(key), getattr(expect, key)
            if isinstance(got, dict) and isinstance(want, dict):  # chunks: every key the run names (a cache
                apart = [
                    k for k in sorted(want, key=lambda k: k != "loss") if got.get(k) != want[k]
                ]  # with pooled layers serves kd too)
                if not apart:
                    continue
                key, got, want = f"{key}.{apart[0]}", got.get(apart[0]), want[apart[0]]
            if got != want:
                raise HldError(
                    f"cache {self.dir} was built with another {key} ({got!r}, this run needs {want!r})",
                    "rebuild the cache for this run's config",
                )
        missing = sorted(set(expect.layers) - set(have.get("layers", [])))
        if missing:
            raise HldError(f"cache {self.dir} lacks teacher layers {missing}", "rebuild it with those layers")
        if expect.top_k > have["top_k"]:
            raise HldError(
                f"cache {self.dir} holds top-{have.get('top_k')} logits, the run asks for top-{expect.top_k}",
                "lower objective.top_k or rebuild the cache with a larger k",
            )

    def layer_stats(self, layers, *, n_windows: int, skip_first: bool):
        """The standardisation statistics a per-chunk cache holds (hld.cache.chunks.stored_stats); None here."""
        return stored_stats(self.manifest, self.dir, layers, n_windows=n_windows, skip_first=skip_first)

    @property
    def top_k(self) -> int:
        return self.manifest["identity"]["top_k"]

    def rows_of(self, window_ids: np.ndarray) -> np.ndarray:
        """Cache rows of windows `window_ids` (an HldError naming the first one it does not hold)."""
        wids = np.asarray(window_ids, dtype=np.int64)
        n = self.manifest["n_windows"]
        if self.ids is None:
            rows = wids - self.first
            held = (rows >= 0) & (rows < n)
        else:
            rows = np.minimum(np.searchsorted(self.ids, wids), n - 1)
            held = self.ids[rows] == wids
        if not held.all():
            raise HldError(
                f"window {int(wids[~held][0])} is not in cache {self.dir}",
                "the run reads past what the cache holds: rebuild it for this budget",
            )
        return rows

    def holds(self, window_ids: np.ndarray) -> bool:
        try:
            self.rows_of(window_ids)
        except HldError:
            return False
        return True

    def __call__(self, batch: Batch, needs: Needs) -> Optional[TeacherSignals]:
        if not needs.any:
            return None
        if batch.window_ids is None:
            raise HldError("a cached teacher needs batches that know their window ids", "internal error")
        T = batch.input_ids.shape[1]  # a run's last step may read a prefix of its windows
        wids = batch.window_ids.numpy()
        ahead = self._ahead.pop(_key(wids, T, needs), None)
        sig = ahead.result() if ahead is not None else self.read(wids, T, needs)
        chunked = self.codec.logits == "chunks"  # a per-chunk cache holds each window's digest (hld.cache.chunks)
        want = batch_digests(batch) if chunked else batch.input_ids_on_host().numpy()
        if not np.array_equal(sig.pop_tokens(), want):
            raise HldError(
                f"cache {self.dir} holds other tokens than this run's batch",
                "rebuild the cache for this run's data and packing",
            )
        return sig.to(batch.input_ids.device)

    def prefetch(self, batches: list[np.ndarray], T: int, needs: Needs) -> None:
        """Start decoding the signals of the micro-batches `batches` (window ids each) on background
        threads (`workers` of them), so that the calls that ask for them find them ready. Reads asked
        for earlier and never used are dropped."""
        if not needs.any or self.workers < 1:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="hld-cache")
        keep = {}
        for wids in batches:
            key = _key(wids, T, needs)
            keep[key] = self._ahead.pop(key, None) or self._pool.submit(self.read, np.asarray(wids), T, needs)
        for stale in self._ahead.values():
            stale.cancel()
        self._ahead = keep

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool, self._ahead = None, {}

    def read(self, window_ids: np.ndarray, T: int, needs: Needs) -> CachedSignals | CachedChunkSignals:
        """The first T positions of windows `window_ids`, decoded on the CPU (any thread); a per-chunk
        cache's values at every chunk of those windows."""
        rows = self.rows_of(window_ids)
        if self.codec.logits == "chunks":
            return read_chunks(self, rows, needs)
        shard = rows // self.shard_windows
        out = CachedSignals(tokens=np.empty((len(rows), T), np.int32))
        groups = [(s, np.flatnonzero(shard == s)) for s in np.unique(shard)]  # batch rows by shard
        for s, at in groups:
            local = rows[at] - s * self.shard_windows
            out.tokens[at] = self._field(s, "tokens")[local, :T]
        for layer in needs.layers:
            h = torch.empty((len(rows), T, self.manifest["d_model"]), dtype=torch.bfloat16, device="cpu")  # (B, T, d)
            for s, at in groups:
                keys = [f"hidden_L{layer}"] + ([f"hidden_L{layer}_scale"] if self.codec.hidden == "fp8" else [])
                arrays = self.parts.arrays(s, keys)
                for j, r in zip(at, rows[at] - s * self.shard_windows):  # a window at a time: its float32
                    h[j] = read_hidden(arrays, layer, int(r), T, codec=self.codec)  # stays in the CPU's cache
            out.hidden[layer] = h
        if needs.logits:
            self._read_logits(out, rows, groups, T)
        return out

    def _read_logits(self, out: CachedSignals, rows: np.ndarray, groups: list, T: int) -> None:
        vals, idx, rest = [], [], []
        order = np.concatenate([at for _, at in groups])
        for s, at in groups:
            keys = [k for k in self.manifest["shards"][s]["fields"] if k.startswith(("topk_", "sampled_"))]
            arrays = self.parts.arrays(s, keys)
            for r in rows[at] - s * self.shard_windows:
                v, i, z = self._logits(s, arrays, int(r), T)
                vals.append(np.asarray(v))
                idx.append(np.asarray(i))
                rest.append(z)
        back = np.argsort(order)  # shard order -> batch order
        idx_a = np.stack(idx)[back]
        if idx_a.size and (int(idx_a.max()) >= self.vocab or int(idx_a.min()) < 0):
            bad = int(idx_a.max()) if int(idx_a.max()) >= self.vocab else int(idx_a.min())
            raise HldError(
                f"cache {self.dir} holds token id {bad}, outside the teacher's vocabulary ({self.vocab})",
                cs.REBUILD,
            )
        kind = CACHE_CODECS[self.codec.logits]
        try:
            out.source = kind.from_cache(
                np.stack(vals)[back], idx_a, np.stack(rest)[back] if rest[0] is not None else None
            )
        except ValueError as exc:  # what the kind refuses of its arrays
            raise HldError(f"cache {self.dir} {exc}", cs.REBUILD) from exc

    def _field(self, s: int, key: str) -> np.ndarray:
        return self.parts.field(s, key)

    def _logits(self, s: int, arrays: dict, r: int, T: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        slot_bits = self.manifest["shards"][s].get("slot_bits", 0)
        try:
            return read_logits(arrays, r, T, codec=self.codec, k=self.top_k, slot_bits=slot_bits)
        except (ValueError, IndexError, KeyError) as exc:  # shapes disagreeing with the manifest
            raise HldError(f"cache shard {s} in {self.dir} is truncated or unreadable ({exc})", cs.REBUILD) from exc


def _key(window_ids: np.ndarray, T: int, needs: Needs) -> tuple:
    return (tuple(int(w) for w in window_ids), int(T), bool(needs.logits), tuple(needs.layers))


@dataclass
class CachedSignals(TeacherSignals):
    """TeacherSignals on the CPU plus the tokens the teacher saw (checked against the batch)."""

    tokens: Optional[np.ndarray] = None  # (B, T) int32

    def pop_tokens(self) -> np.ndarray:
        t, self.tokens = self.tokens, None
        return t


def read_manifest(path: Path) -> dict:
    """A cache's manifest, its format and the types of its fields checked (one line if not)."""
    path = Path(path)
    f = path / "manifest.json"
    if not f.exists():
        progress = build_progress(path)
        if progress is not None:
            raise HldError(
                f"the teacher cache {path} is not finished: {progress[0]} of {progress[1]} shards are built "
                f"(in {build_dir_of(path)})",
                "rerun its `hld cache-teacher` (or the --shard parts that are missing); it resumes",
            )
        raise HldError(
            f"{path} is not a teacher cache (no manifest.json)",
            "build one with `hld cache-teacher`, or fix teacher.cache",
        )
    m = read_json_object(f, "cache manifest", cs.REBUILD)
    version = m.get("format_version")
    if version != FORMAT_VERSION or m.get("protocol") != PROTOCOL:
        why = (
            "windows without a leading BOS, top-k without its remaining mass"
            if version == 1
            else f"format {version}, protocol {m.get('protocol')!r}"
        )
        raise HldError(
            f"cache {path} was built by another hld ({why}; this hld reads format {FORMAT_VERSION}, {PROTOCOL})",
            "rebuild it with `hld cache-teacher`",
        )
    ints = ("seq_len", "d_model", "vocab_size", "n_windows", "tokens", "shard_windows")
    bad = [k for k in ints if not isinstance(m.get(k), int) or isinstance(m.get(k), bool) or m[k] < 1]
    if bad:
        raise HldError(f"cache manifest {f} lacks or mangles {', '.join(bad)}", cs.REBUILD)
    have = m.get("identity")
    if not isinstance(have, dict) or not isinstance(have.get("layers"), list):
        raise HldError(f"cache manifest {f} lacks its identity", cs.REBUILD)
    if not all(isinstance(x, int) and 0 <= x for x in have["layers"]):
        raise HldError(f"cache manifest {f} names layers {have['layers']!r}", cs.REBUILD)
    if not isinstance(have.get("top_k"), int) or have["top_k"] < 1:  # k=0 caches (built before k was checked)
        raise HldError(
            f"cache {path} holds top-{have.get('top_k')} logits, so KD has no teacher distribution",
            "rebuild it with teacher.cache_top_k of 1 or more (default 64)",
        )
    if (
        have["top_k"] > m["vocab_size"]
        or have.get("seq_len") != m["seq_len"]
        or m["tokens"] != m["n_windows"] * m["seq_len"]
    ):
        raise HldError(f"cache manifest {f} disagrees with itself (top_k, seq_len or tokens edited?)", cs.REBUILD)
    try:
        codec = Codec(**m["codec"])
    except (TypeError, KeyError):
        codec = None
    if (
        codec is None
        or codec.logits not in ("exact", "compact", "sampled", "chunks")
        or (codec.logits == "sampled") != (have.get("cache_signal") == "sampled")
        or (codec.logits == "chunks") != (have.get("cache_signal") == "chunks")
        or (codec.logits == "chunks") != isinstance(have.get("chunks"), dict)
        or codec.hidden not in ("bfloat16", "fp8")
        or not (isinstance(codec.value_bits, int) and 1 <= codec.value_bits <= 16)
        or codec.index_bits != max(1, (m["vocab_size"] - 1).bit_length())
        or not isinstance(codec.compand_per_nat, (int, float))
        or not codec.compand_per_nat > 0
    ):
        raise HldError(
            f"cache {path} names a codec this hld does not know ({m.get('codec')!r})",
            "rebuild it with `hld cache-teacher`",
        )
    return m
