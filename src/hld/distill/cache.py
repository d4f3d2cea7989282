"""Offline teacher cache: the teacher runs once over the training windows; every KD/HLD run then
reads its signals from disk instead of running it. Layout, records and checksums:
hld.distill.cache_store (format 4, docs/cache-format.md); the arrays' codecs: hld.distill.cache_codec
(`exact` top-k logits / `compact` ones, bfloat16 / fp8 hidden states); windows follow
`hld.data.packing.PROTOCOL` (BOS-led).

A build writes into `.<name>.build` beside the cache, shard by shard, each shard committed on its own
(cache_store): a build killed at any point (SIGTERM, SIGKILL, a preempted job) keeps its committed
shards, and the same command finishes the rest. Several processes share one build (`--shard I/N`,
torchrun ranks), each its own shards; the last one to finish assembles the manifest and renames the
directory into place, so a directory named like the cache is complete (and an existing cache is
kept until the new one is). A cache of an older format or protocol is refused with a message to
rebuild it.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch

from hld.atomic import read_json_object, replace_dir, write_fix, write_json
from hld.data.packing import PROTOCOL, Batch
from hld.distill import cache_store as cs
from hld.distill.cache_codec import Codec, ShardWriter, read_hidden, read_logits
from hld.distill.encode_thread import Deferred, OrderedEncoder
from hld.distill.losses import TeacherLogits
from hld.distill.sampled import sampled_rows
from hld.distill.signals import Needs, OnlineTeacher, TeacherSignals
from hld.errors import HldError
from hld.fingerprint import tokenizer_fingerprint, windows_fingerprint
from hld.locks import file_lock
from hld.models.hooks import CausalLM, text_config
from hld.progress import Progress

if TYPE_CHECKING:
    from hld.data.store import WindowArray

FORMAT_VERSION = cs.FORMAT_VERSION
READABLE_VERSIONS = (cs.FORMAT_VERSION,)


@dataclass
class CacheIdentity:
    """What must match between a cache and the run that reads it."""

    teacher: str  # weights identity (hash)
    tokenizer: str  # tokenizer fingerprint
    seq_len: int
    layers: list  # hidden layers stored
    top_k: int  # a sampled signal: its slots per token, min(cache_samples, V)
    data: str  # fingerprint of the windows (their token content)
    cache_signal: str = "topk"  # topk | sampled (a topk cache is never read as sampled, nor the reverse)
    cache_samples: Optional[int] = None  # sampled: draws per token
    cache_proposal_temperature: Optional[float] = None  # sampled: tau of the proposal softmax(z / tau)


SIGNAL_KEYS = {"cache_signal": "topk", "cache_samples": None, "cache_proposal_temperature": None}  # (defaults)


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


def _identity_json(identity: CacheIdentity) -> dict:
    """The manifest's identity: a top-k cache's without the signal keys (as before the sampled signal, so
    its plan, manifest and a resumed build are unchanged; a reader takes their absence for topk)."""
    d = asdict(identity)
    return d if d["cache_signal"] == "sampled" else {k: v for k, v in d.items() if k not in SIGNAL_KEYS}


def build_dir_of(out: Path) -> Path:
    """Where the cache at `out` is built (and a killed build's committed shards wait to be resumed)."""
    return Path(out).parent / f".{Path(out).name}.build"


def build_cache(
    teacher_lm: CausalLM,
    windows: WindowArray,
    window_ids: np.ndarray,
    out: Path,
    *,
    identity: CacheIdentity,
    codec: Optional[Codec] = None,
    batch_size: int = 8,
    shard_windows: int = 256,
    part: tuple[int, int] = (0, 1),
    quiet: bool = False,
    overlap: bool = True,
) -> Optional[dict]:
    """Run the teacher over the shards of `windows[window_ids]` that are part `part` = (I, N) of the
    build's (shard s is part s % N's) and not yet committed, committing each; then, if every shard of
    every part is committed and no other builder runs, assemble the cache at `out` and return its
    manifest (None: other parts are still to come). `overlap`: encode on a background thread while the
    teacher runs the next batch (distill/encode_thread.py; the bytes are the same either way)."""
    out = Path(out)
    check_out_dir(out)
    vocab = teacher_lm.get_output_embeddings().weight.shape[0]
    # an escaped index gap is stored in ceil(log2 V) bits
    codec = replace(codec or Codec(), index_bits=max(1, (vocab - 1).bit_length()))
    window_ids = np.asarray(window_ids, dtype=np.int64)
    tc = text_config(teacher_lm.config)
    plan = {
        "format": cs.FORMAT,
        "format_version": FORMAT_VERSION,
        "protocol": PROTOCOL,
        "identity": _identity_json(identity),
        "codec": codec.to_json(),
        "seq_len": int(windows.shape[1]),
        "d_model": int(tc.hidden_size),
        "vocab_size": int(vocab),
        "n_windows": int(len(window_ids)),
        "tokens": int(len(window_ids) * windows.shape[1]),
        "shard_windows": int(shard_windows),
        "windows": cs.windows_entry(window_ids),
        # what a run reading the cache needs of the teacher besides its identity: its shapes
        "teacher_config": tc.to_dict(),
    }
    plan = json.loads(json.dumps(plan))  # as read back (tuples -> lists), so plans compare equal
    try:
        with _Builders(out, plan, window_ids) as b:
            _build_part(
                b.dir,
                plan,
                teacher_lm,
                windows,
                window_ids,
                part=part,
                batch_size=batch_size,
                quiet=quiet,
                overlap=overlap,
            )
            manifest = b.finish(wait=part[1] == 1)
    except OSError as exc:
        raise HldError(f"cannot write the cache {out}: {exc.strerror or exc}", write_fix(exc)) from exc
    if manifest is not None:
        manifest["bytes"] = sum(manifest["files"].values())
    return manifest


def _build_part(
    d: Path,
    plan: dict,
    teacher_lm: CausalLM,
    windows: WindowArray,
    window_ids: np.ndarray,
    *,
    part: tuple[int, int],
    batch_size: int,
    quiet: bool,
    overlap: bool = True,
) -> None:
    """Part `part`'s uncommitted shards, each committed when complete (under the part's lock: a second
    process on the same part waits, then finds them committed)."""
    name = cs.part_name(*part)
    with file_lock(d / "locks" / f"{name}.lock"):
        done = cs.committed(d)
        todo = [s for s in range(cs.n_shards(plan)) if s % part[1] == part[0] and s not in done]
        if not todo:
            return
        layers, k, T = plan["identity"]["layers"], plan["identity"]["top_k"], plan["seq_len"]
        sampled = _sampling_of(plan["identity"])
        online = OnlineTeacher(teacher_lm, tuple(layers))
        device = next(teacher_lm.parameters()).device
        codec = Codec(**plan["codec"])
        writer = cs.PartWriter(d, name)
        total = sum(np.subtract(*cs.shard_rows(plan, s)[::-1]) for s in todo)
        prog = Progress(int(total), desc=f"cache {name}" if part[1] > 1 else "cache", quiet=quiet)
        t0, seen = time.time(), 0
        encoder = OrderedEncoder(overlap=overlap)  # encodes and commits while the next forward runs
        try:
            for s in todo:
                lo, hi = cs.shard_rows(plan, s)
                t_shard = time.time()
                shard = ShardWriter(writer.sink, n=hi - lo, T=T, k=k, layers=layers, codec=codec)
                for n in _fill_shard(
                    encoder.writer(shard),
                    online,
                    windows,
                    window_ids[lo:hi],
                    k=k,
                    batch_size=batch_size,
                    device=device,
                    sampled=sampled,
                ):
                    prog.update(seen + n, tokens_per_s=(seen + n) * T / max(time.time() - t0, 1e-9))
                encoder.submit(_commit_shard, writer, shard, {"shard": s, "rows": [lo, hi]}, t_shard)
                seen += hi - lo
            encoder.drain()
        except BaseException:
            encoder.close()
            writer.abandon()
            raise
        finally:
            encoder.close()
            writer.close()
            prog.close()
            if online.capture is not None:
                online.capture.remove()


def _commit_shard(writer: cs.PartWriter, shard: ShardWriter, rec: dict, t_shard: float) -> None:
    """A shard's final encode (compact top-k) and its commit record, after every row of it is put."""
    slot_bits = shard.finish()
    rec["seconds"] = time.time() - t_shard
    writer.commit(rec | ({"slot_bits": slot_bits} if slot_bits is not None else {}))


def _fill_shard(
    writer: ShardWriter | Deferred,
    online: OnlineTeacher,
    windows: WindowArray,
    ids: np.ndarray,
    *,
    k: int,
    batch_size: int,
    device: torch.device,
    sampled: Optional[tuple[int, float]] = None,
) -> Iterator[int]:
    """Run the teacher over the shard's windows, batch by batch, into `writer`; yields the windows done.
    `sampled` = (draws per token, tau): the sampled signal in k slots (distill/sampled.py), else the top-k."""
    needs = Needs(logits=True, layers=tuple(writer.layers))
    T = windows.shape[1]
    for b in range(0, len(ids), batch_size):
        tokens = windows[ids[b : b + batch_size]]
        x = torch.from_numpy(np.asarray(tokens)).long().to(device)
        sig = online.signals(x, needs)
        n = x.shape[0]
        if sampled is None:
            vals, idx, rest = _topk_rows(sig, k)
            rest = rest.view(n, T).float().cpu()
        else:

            def dense_rows(rows: slice, sig=sig) -> torch.Tensor:
                got = sig.logits(rows)
                assert got is not None and got.dense is not None  # the online teacher's full logits
                return got.dense

            idx, vals = sampled_rows(
                dense_rows,
                ids[b : b + n],
                T,
                samples=sampled[0],
                tau=sampled[1],
                slots=k,
            )
            rest = None
        writer.put(
            b,
            tokens=np.asarray(tokens),
            vals=vals.view(n, T, k).float().cpu(),
            idx=idx.view(n, T, k).cpu(),
            rest=rest,
            hidden={layer: sig.hidden[layer].cpu() for layer in writer.layers},
        )
        yield b + n


def _sampling_of(identity: dict) -> Optional[tuple[int, float]]:
    """(draws per token, tau) of a sampled cache's identity; None for a top-k cache."""
    if identity.get("cache_signal", "topk") != "sampled":
        return None
    return int(identity["cache_samples"]), float(identity["cache_proposal_temperature"])


class _Builders:
    """The processes building one cache: each holds a shared flock on the build directory while it
    builds; one that finds the directory holding another plan wipes it only when it can take the lock
    exclusively (no builder alive), and the last to finish (exclusive again) assembles. Every change of
    who holds what happens under the short `.<name>.lock` beside the cache."""

    def __init__(self, out: Path, plan: dict, window_ids: np.ndarray) -> None:
        self.out, self.plan, self.ids = out, plan, window_ids
        self.dir = build_dir_of(out)
        self.setup = out.parent / f".{out.name}.lock"
        self.fd = -1

    def __enter__(self) -> _Builders:
        with file_lock(self.setup):
            self.dir.mkdir(exist_ok=True)
            self.fd = os.open(self.dir, os.O_RDONLY)
            alone = _try_lock(self.fd, fcntl.LOCK_EX)
            if _read_plan(self.dir) != self.plan:
                if not alone:
                    os.close(self.fd)
                    raise HldError(
                        f"another hld is building a different cache in {self.dir} (it holds the directory's lock)",
                        "wait for it to finish, or give this build another --out",
                    )
                for p in self.dir.iterdir():  # another plan's shards, or a build's debris
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
                if "file" in self.plan["windows"]:
                    cs.write_windows(self.dir, self.ids)
                write_json(self.dir / "plan.json", self.plan)  # last: a plan names a ready directory
            if alone:
                for stale in self.out.parent.glob(f".{self.out.name}.tmp-*"):  # format 3's killed builds
                    shutil.rmtree(stale, ignore_errors=True)
            fcntl.flock(self.fd, fcntl.LOCK_SH)  # (from exclusive: safe, every exclusive taker holds setup)
        return self

    def finish(self, *, wait: bool) -> Optional[dict]:
        """Assemble and rename into place when every shard is committed and no other builder is left.
        With another builder still running: None at once, or (`wait`) once it has ended, the manifest
        it assembled."""
        with file_lock(self.setup):
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            alone = _try_lock(self.fd, fcntl.LOCK_EX)
            if alone:
                return self._assemble()
        if not wait:
            return None
        fcntl.flock(self.fd, fcntl.LOCK_EX)  # blocks until the others have ended
        with file_lock(self.setup):
            if not _same_dir(self.fd, self.dir):  # one of them assembled it
                return json.loads((self.out / "manifest.json").read_text()) if is_cache(self.out) else None
            return self._assemble()

    def _assemble(self) -> Optional[dict]:
        if len(cs.committed(self.dir)) < cs.n_shards(self.plan):
            return None  # a part is missing (its builder was stopped): its rerun assembles
        manifest = cs.assemble(self.dir, self.plan)
        replace_dir(self.dir, self.out)  # killed before this: the next builder assembles again
        (self.out / "plan.json").unlink()  # (the manifest holds it)
        shutil.rmtree(self.out / "locks", ignore_errors=True)  # a waiter on them re-checks where it is
        return manifest

    def __exit__(self, *exc) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # releases its flock


def _same_dir(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except OSError:
        return False


def _try_lock(fd: int, how: int) -> bool:
    try:
        fcntl.flock(fd, how | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _read_plan(d: Path) -> Optional[dict]:
    try:
        return json.loads((d / "plan.json").read_text())
    except (OSError, ValueError):
        return None


def build_progress(out: Path) -> Optional[tuple[int, int]]:
    """(shards committed, shards planned) of an unfinished build of the cache at `out`, if any."""
    d = build_dir_of(out)
    plan = _read_plan(d)
    if plan is None:
        return None
    return len(cs.committed(d)), cs.n_shards(plan)


def is_cache(path: Path) -> bool:
    """A directory `hld cache-teacher` wrote: its manifest.json holds hld's own fields (a format
    version, the identity, the shards), not just any tool's `format_version`."""
    try:
        manifest = json.loads((Path(path) / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return (
        isinstance(manifest, dict)
        and "format_version" in manifest
        and isinstance(manifest.get("identity"), dict)
        and "teacher" in manifest["identity"]
        and "shards" in manifest
    )


def check_out_dir(out: Path) -> None:
    """Refuse to build a cache where one would destroy anything that is not a cache; create the parent."""
    out = Path(out)
    here, where = Path.cwd().resolve(), out.resolve()
    if where == here or where in here.parents:
        raise HldError(
            f"cache directory {out} is the current directory (or holds it)",
            "give a new subdirectory, e.g. --out teacher-cache",
        )
    if out.exists() and not out.is_dir():
        raise HldError(f"cache directory {out} is an existing file", "give a new directory (or an hld cache) for --out")
    if out.is_dir() and any(out.iterdir()) and not is_cache(out):
        raise HldError(
            f"{out} is not empty and is not an hld teacher cache (no manifest.json with a "
            "format_version): building there would replace what it holds",
            "give a new or empty directory, or an existing cache to rebuild",
        )
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise HldError(f"cannot create the cache directory {out}: {exc.strerror or exc}", write_fix(exc)) from exc


def _topk_rows(sig: TeacherSignals, k: int, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k of the teacher's logits and the log of its mass off them, chunk by chunk (never (B*T, V)
    at once): values (N, k), indices (N, k), rest (N,)."""
    h = sig.final_hidden.reshape(-1, sig.final_hidden.shape[-1])
    vals, idx, rest = [], [], []
    for s in range(0, h.shape[0], chunk):
        z = sig.logits(slice(s, min(s + chunk, h.shape[0])))
        top = z.top_k(k)
        if top.dense is not None:  # k covers the vocabulary: every logit, sorted, nothing off it
            v, i = top.dense.float().sort(dim=-1, descending=True)
            top = TeacherLogits(values=v, indices=i, rest=torch.full_like(v[:, 0], float("-inf")))
        vals.append(top.values)
        idx.append(top.indices)
        rest.append(top.rest)
    return torch.cat(vals), torch.cat(idx), torch.cat(rest)


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
            if have.get(key) != getattr(expect, key):
                raise HldError(
                    f"cache {self.dir} was built with another {key} ({have.get(key)!r}, this run "
                    f"needs {getattr(expect, key)!r})",
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
        if not np.array_equal(sig.pop_tokens(), batch.input_ids.cpu().numpy()):
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

    def read(self, window_ids: np.ndarray, T: int, needs: Needs) -> CachedSignals:
        """The first T positions of windows `window_ids`, decoded on the CPU (any thread)."""
        rows = self.rows_of(window_ids)
        shard = rows // self.shard_windows
        out = CachedSignals(tokens=np.empty((len(rows), T), np.int32))
        groups = [(s, np.flatnonzero(shard == s)) for s in np.unique(shard)]  # batch rows by shard
        for s, at in groups:
            local = rows[at] - s * self.shard_windows
            out.tokens[at] = self._field(s, "tokens")[local, :T]
        for layer in needs.layers:
            h = torch.empty((len(rows), T, self.manifest["d_model"]), dtype=torch.bfloat16)  # (B, T, d)
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
        if self.codec.logits == "sampled":
            w = np.stack(vals)[back]
            _check_weights(w, self.dir)
            out.sampled_ids, out.sampled_weights = torch.from_numpy(idx_a), torch.from_numpy(w)
            return
        out.topk_values = torch.from_numpy(np.stack(vals)[back])
        out.topk_indices = torch.from_numpy(idx_a)
        out.topk_rest = torch.from_numpy(np.stack(rest)[back])

    def _field(self, s: int, key: str) -> np.ndarray:
        return self.parts.field(s, key)

    def _logits(self, s: int, arrays: dict, r: int, T: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        slot_bits = self.manifest["shards"][s].get("slot_bits", 0)
        try:
            return read_logits(arrays, r, T, codec=self.codec, k=self.top_k, slot_bits=slot_bits)
        except (ValueError, IndexError, KeyError) as exc:  # shapes disagreeing with the manifest
            raise HldError(f"cache shard {s} in {self.dir} is truncated or unreadable ({exc})", cs.REBUILD) from exc


def _check_weights(w: np.ndarray, where: Path) -> None:
    """Sampled weights must be a distribution per token (a damaged field whose checksum was rewritten)."""
    if w.size and not (np.isfinite(w).all() and (w >= 0).all() and np.abs(w.sum(-1) - 1).max() < 1e-4):
        raise HldError(f"cache {where} holds sampled weights that are not a distribution per token", cs.REBUILD)


def _key(window_ids: np.ndarray, T: int, needs: Needs) -> tuple:
    return (tuple(int(w) for w in window_ids), int(T), bool(needs.logits), tuple(needs.layers))


@dataclass
class CachedSignals(TeacherSignals):
    """TeacherSignals on the CPU plus the tokens the teacher saw (checked against the batch)."""

    tokens: Optional[np.ndarray] = None  # (B, T) int32

    def pop_tokens(self) -> np.ndarray:
        t, self.tokens = self.tokens, None
        return t

    def to(self, device: torch.device) -> TeacherSignals:
        sig = TeacherSignals()
        sig.hidden = {layer: h.to(device) for layer, h in self.hidden.items()}
        for key in ("topk_values", "topk_indices", "topk_rest", "sampled_ids", "sampled_weights"):
            if getattr(self, key) is not None:
                setattr(sig, key, getattr(self, key).to(device))
        return sig


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
        or codec.logits not in ("exact", "compact", "sampled")
        or (codec.logits == "sampled") != (have.get("cache_signal") == "sampled")
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


def cache_identity(
    *, teacher: str, tokenizer, seq_len: int, train_windows: WindowArray, layers, top_k: int, **signal
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
