"""Building the offline teacher cache (hld.cache.reader): the teacher runs once over the training
windows, its signals encoded (hld.cache.codec) and written shard by shard (hld.cache.store).

A build writes into `.<name>.build` beside the cache, shard by shard, each shard committed on its own
(hld.cache.store): a build killed at any point (SIGTERM, SIGKILL, a preempted job) keeps its committed
shards, and the same command finishes the rest. Several processes share one build (`--shard I/N`,
torchrun ranks), each its own shards; the last one to finish assembles the manifest and renames the
directory into place, so a directory named like the cache is complete (and an existing cache is
kept until the new one is).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch

from hld.atomic import read_json_object, replace_dir, write_fix, write_json
from hld.cache import store as cs
from hld.cache.chunks import ChunkBuild, ChunkShardWriter, fill_chunk_shard
from hld.cache.codec import Codec, ShardWriter
from hld.cache.encode import Deferred, OrderedEncoder
from hld.cache.meta import SIGNAL_KEYS, CacheIdentity, build_dir_of, is_cache, read_plan
from hld.data.packing import PROTOCOL
from hld.data.paired import PairedWindows
from hld.distill.signals import Needs
from hld.distill.signals.online import OnlineLogits, OnlineTeacher
from hld.distill.signals.registry import CACHE_SIGNALS
from hld.errors import HldError
from hld.locks import file_lock
from hld.models.hooks import CausalLM, text_config
from hld.progress import Progress

if TYPE_CHECKING:
    from hld.data.store import WindowArray


def _identity_json(identity: CacheIdentity) -> dict:
    """The manifest's identity: a top-k cache's without the signal keys (as before the sampled signal, so
    its plan, manifest and a resumed build are unchanged; a reader takes their absence for topk), another
    kind's without those it leaves unset."""
    d = asdict(identity)
    topk = d["cache_signal"] == "topk"
    return {k: v for k, v in d.items() if k not in SIGNAL_KEYS or not (topk or v is None)}


def build_cache(
    teacher_lm: CausalLM,
    windows: WindowArray | PairedWindows,
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
    chunk_spec: Optional[ChunkBuild] = None,
    extra: Optional[dict] = None,
) -> Optional[dict]:
    """Run the teacher over the shards of `windows[window_ids]` that are part `part` = (I, N) of the
    build's (shard s is part s % N's) and not yet committed, committing each; then, if every shard of
    every part is committed and no other builder runs, assemble the cache at `out` and return its
    manifest (None: other parts are still to come). `overlap`: encode on a background thread while the
    teacher runs the next batch (hld.cache.encode; the bytes are the same either way). `chunk_spec`: a
    per-chunk cache of paired windows (`windows` a `PairedWindows`, `codec.logits` chunks; hld.cache.chunks).
    `extra`: more keys of the plan (and manifest), e.g. a per-chunk cache's `layer_stats`."""
    out = Path(out)
    check_out_dir(out)
    vocab = teacher_lm.get_output_embeddings().weight.shape[0]
    # an escaped index gap is stored in ceil(log2 V) bits
    codec = replace(codec or Codec(), index_bits=max(1, (vocab - 1).bit_length()))
    window_ids = np.asarray(window_ids, dtype=np.int64)
    if (chunk_spec is not None) != (codec.logits == "chunks"):
        raise ValueError("a per-chunk cache (codec chunks) is built from paired windows with a chunk_spec")
    seq_len = int(windows.seq_len if isinstance(windows, PairedWindows) else windows.shape[1])  # (the student's)
    tc = text_config(teacher_lm.config)
    plan = {
        "format": cs.FORMAT,
        "format_version": cs.FORMAT_VERSION,
        "protocol": PROTOCOL,
        "identity": _identity_json(identity),
        "codec": codec.to_json(),
        "seq_len": seq_len,
        "d_model": int(tc.hidden_size),
        "vocab_size": int(vocab),
        "n_windows": int(len(window_ids)),
        "tokens": int(len(window_ids) * seq_len),
        "shard_windows": int(shard_windows),
        "windows": cs.windows_entry(window_ids),
        # what a run reading the cache needs of the teacher besides its identity: its shapes
        "teacher_config": tc.to_dict(),
    }
    plan |= extra or {}
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
                chunk_spec=chunk_spec,
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
    windows: WindowArray | PairedWindows,
    window_ids: np.ndarray,
    *,
    part: tuple[int, int],
    batch_size: int,
    quiet: bool,
    overlap: bool = True,
    chunk_spec: Optional[ChunkBuild] = None,
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
                shard: ShardWriter | ChunkShardWriter
                if chunk_spec is not None:
                    assert isinstance(windows, PairedWindows)
                    shard = ChunkShardWriter(writer.sink, identity=plan["identity"], layers=layers)
                    filled = fill_chunk_shard(
                        encoder.writer(shard),
                        online,
                        windows,
                        window_ids[lo:hi],
                        spec=chunk_spec.spec,
                        pooling=chunk_spec.pooling,
                        batch_size=batch_size,
                        device=device,
                    )
                else:
                    assert not isinstance(windows, PairedWindows)
                    shard = ShardWriter(writer.sink, n=hi - lo, T=T, k=k, layers=layers, codec=codec)
                    filled = _fill_shard(
                        encoder.writer(shard),
                        online,
                        windows,
                        window_ids[lo:hi],
                        k=k,
                        batch_size=batch_size,
                        device=device,
                        identity=plan["identity"],
                    )
                for n in filled:
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


def _commit_shard(writer: cs.PartWriter, shard: ShardWriter | ChunkShardWriter, rec: dict, t_shard: float) -> None:
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
    identity: dict,
) -> Iterator[int]:
    """Run the teacher over the shard's windows, batch by batch, into `writer`; yields the windows done.
    The logits are stored as the identity's signal kind (`cache_signal`, hld.distill.signals.registry)."""
    needs = Needs(logits=True, layers=tuple(writer.layers))
    T = windows.shape[1]
    for b in range(0, len(ids), batch_size):
        tokens = windows[ids[b : b + batch_size]]
        x = torch.from_numpy(np.asarray(tokens)).long().to(device)
        sig = online.signals(x, needs)
        assert sig is not None and isinstance(sig.source, OnlineLogits)
        n = x.shape[0]
        vals, idx, rest = _signal_rows(sig.source, k=k, window_ids=ids[b : b + n], T=T, identity=identity)
        writer.put(
            b,
            tokens=np.asarray(tokens),
            vals=vals.view(n, T, k).float().cpu(),
            idx=idx.view(n, T, k).cpu(),
            rest=None if rest is None else rest.view(n, T).float().cpu(),
            hidden={layer: sig.hidden[layer].cpu() for layer in writer.layers},
        )
        yield b + n


def _signal_rows(source: OnlineLogits, *, k: int, window_ids: np.ndarray, T: int, identity: dict):
    """The identity's signal kind drawn from the teacher's rows: (values or weights, ids, rest or None)."""
    kind = CACHE_SIGNALS[identity.get("cache_signal", "topk")]
    return kind.from_teacher(source, k=k, window_ids=window_ids, T=T, identity=identity)


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
            if read_plan(self.dir) != self.plan:
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
                return (
                    read_json_object(self.out / "manifest.json", "cache manifest", cs.REBUILD)
                    if is_cache(self.out)
                    else None
                )
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
