"""Offline teacher cache: the teacher runs once over the training windows; every KD/HLD run then
reads its signals from disk instead of running it. Format (docs/cache-format.md):

<cache>/manifest.json          identity of what was cached + per-file sha256 checksums
<cache>/shard-NNNNN.tokens.npy       (n, T) int32   the exact input tokens the teacher saw
<cache>/shard-NNNNN.topk_values.npy  (n, T, k) float16  the teacher's k largest logits, descending
<cache>/shard-NNNNN.topk_indices.npy (n, T, k) int32    their token ids
<cache>/shard-NNNNN.topk_rest.npy    (n, T) float32     log of the teacher's mass off the top k (its
                                                        logsumexp over the other V - k logits)
<cache>/shard-NNNNN.hidden_L{l}.npy  (n, T, d) uint16   bf16 bit patterns of layer l's output
That is the `exact` codec; format 3 adds `compact` logits and fp8 hidden states (hld.distill.cache_codec),
named in the manifest's `codec`. A cache is written into a temporary directory and renamed when
complete, so a directory named like a cache is either complete or absent. Windows follow
`hld.data.packing.PROTOCOL` (BOS-led); a cache of an older format or protocol is refused with a
message to rebuild it.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch

from hld.atomic import replace_dir, write_fix
from hld.data.packing import PROTOCOL, Batch
from hld.distill.cache_codec import Codec, ShardWriter, codec_from_manifest, read_hidden, read_logits
from hld.distill.losses import TeacherLogits
from hld.distill.signals import Needs, OnlineTeacher, TeacherSignals
from hld.errors import HldError
from hld.fingerprint import file_sha256, tokenizer_fingerprint, windows_fingerprint
from hld.models.hooks import CausalLM, text_config
from hld.progress import Progress

if TYPE_CHECKING:
    from hld.data.store import WindowArray

FORMAT_VERSION = 3  # 3: the manifest names its codec (compact logits, fp8 hidden states)
READABLE_VERSIONS = (2, 3)  # 2: BOS-led windows (packing.PROTOCOL) and the top-k's remaining mass, exact arrays


@dataclass
class CacheIdentity:
    """What must match between a cache and the run that reads it."""

    teacher: str  # weights identity (hash)
    tokenizer: str  # tokenizer fingerprint
    seq_len: int
    layers: list  # hidden layers stored
    top_k: int
    data: str  # fingerprint of the windows (their token content)


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
    quiet: bool = False,
) -> dict:
    """Run the teacher over `windows[window_ids]` and write the cache to `out` (atomically): built in
    a temporary sibling, swapped in only when complete, so a failed or stopped rebuild keeps the old cache."""
    out = Path(out)
    check_out_dir(out)
    for stale in out.parent.glob(f".{out.name}.tmp-*"):  # left by a build that was killed (SIGKILL)
        shutil.rmtree(stale, ignore_errors=True)
    try:
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    except OSError as exc:
        raise HldError(f"cannot write the cache beside {out}: {exc.strerror or exc}", write_fix(exc)) from exc
    online = OnlineTeacher(teacher_lm, tuple(identity.layers))
    device = next(teacher_lm.parameters()).device
    k, T = identity.top_k, windows.shape[1]
    vocab = teacher_lm.get_output_embeddings().weight.shape[0]
    # an escaped index gap is stored in ceil(log2 V) bits
    codec = replace(codec or Codec(), index_bits=max(1, (vocab - 1).bit_length()))
    files: dict[str, str] = {}
    shards: list[dict] = []
    t0 = time.time()
    prog = Progress(len(window_ids), desc="cache", quiet=quiet)
    try:
        for s_start in range(0, len(window_ids), shard_windows):
            ids = window_ids[s_start : s_start + shard_windows]
            name = f"shard-{len(shards):05d}"
            writer = ShardWriter(
                tmp,
                name,
                n=len(ids),
                T=T,
                k=k,
                layers=identity.layers,
                d_model=text_config(teacher_lm.config).hidden_size,
                codec=codec,
            )
            for done in _fill_shard(
                writer, online, windows, ids, layers=identity.layers, k=k, batch_size=batch_size, device=device
            ):
                prog.update(s_start + done, tokens_per_s=(s_start + done) * T / max(time.time() - t0, 1e-9))
            for key in writer.finish():
                fname = f"{name}.{key}.npy"
                files[fname] = file_sha256(tmp / fname)
            shards.append(
                {"name": name, "window_ids": [int(i) for i in ids]}
                | ({"slot_bits": writer.slot_bits} if writer.slot_bits is not None else {})
            )
        manifest = {
            "format_version": FORMAT_VERSION,
            "protocol": PROTOCOL,
            "identity": asdict(identity),
            "shards": shards,
            "files": files,
            "n_windows": int(len(window_ids)),
            "tokens": int(len(window_ids) * T),
            "codec": codec.to_json(),
            # what a run reading the cache needs of the teacher besides its identity: its shapes
            "teacher_config": text_config(teacher_lm.config).to_dict(),
            "build_seconds": time.time() - t0,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        replace_dir(tmp, out)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise HldError(f"could not write the cache {out}: {exc.strerror or exc}", write_fix(exc)) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        prog.close()
        if online.capture is not None:
            online.capture.remove()
    manifest["bytes"] = sum((out / f).stat().st_size for f in files)
    return manifest


def _fill_shard(
    writer: ShardWriter,
    online: OnlineTeacher,
    windows: WindowArray,
    ids: np.ndarray,
    *,
    layers: list,
    k: int,
    batch_size: int,
    device: torch.device,
) -> Iterator[int]:
    """Run the teacher over the shard's windows, batch by batch, into `writer`; yields the windows done."""
    needs = Needs(logits=True, layers=tuple(layers))
    T = windows.shape[1]
    writer.arrays["tokens"][:] = windows[ids]
    for b in range(0, len(ids), batch_size):
        x = torch.from_numpy(windows[ids[b : b + batch_size]]).long().to(device)
        sig = online.signals(x, needs)
        vals, idx, rest = _topk_rows(sig, k)
        n = x.shape[0]
        writer.put(
            b,
            vals=vals.view(n, T, k).float().cpu(),
            idx=idx.view(n, T, k).cpu(),
            rest=rest.view(n, T).float().cpu(),
            hidden={layer: sig.hidden[layer].cpu() for layer in layers},
        )
        yield b + n


def is_cache(path: Path) -> bool:
    """A directory `hld cache-teacher` wrote: its manifest.json is a JSON object with a format_version."""
    try:
        manifest = json.loads((Path(path) / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and "format_version" in manifest


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
    """Teacher signals read from a cache; same call as `OnlineTeacher`, same `TeacherSignals` out."""

    def __init__(self, cache_dir: Path, *, expect: CacheIdentity, verify: bool = True) -> None:
        self.dir = Path(cache_dir)
        path = self.dir / "manifest.json"
        if not path.exists():
            raise HldError(
                f"{self.dir} is not a teacher cache (no manifest.json)",
                "build one with `hld cache-teacher`, or fix teacher.cache",
            )
        try:
            self.manifest = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise HldError(f"cache manifest {path} is corrupt", "rebuild the cache") from exc
        self._check_identity(expect)
        self.row_of: dict[int, tuple[int, int]] = {}
        self.shards = []
        for si, shard in enumerate(self.manifest["shards"]):
            for r, wid in enumerate(shard["window_ids"]):
                self.row_of[wid] = (si, r)
            self.shards.append(self._open(shard["name"], verify))

    def _check_identity(self, expect: CacheIdentity) -> None:
        have = self.manifest.get("identity", {})
        version = self.manifest.get("format_version")
        if version not in READABLE_VERSIONS or self.manifest.get("protocol") != PROTOCOL:
            why = (
                "windows without a leading BOS, top-k without its remaining mass"
                if version == 1
                else f"format {version}, protocol {self.manifest.get('protocol')!r}"
            )
            raise HldError(
                f"cache {self.dir} was built by another hld ({why}; this hld reads formats "
                f"{', '.join(map(str, READABLE_VERSIONS))}, {PROTOCOL})",
                "rebuild it with `hld cache-teacher`",
            )
        try:
            self.codec = codec_from_manifest(self.manifest)
        except TypeError:
            self.codec = None
        if (
            self.codec is None
            or self.codec.logits not in ("exact", "compact")
            or self.codec.hidden not in ("bfloat16", "fp8")
        ):
            raise HldError(
                f"cache {self.dir} names a codec this hld does not know ({self.manifest.get('codec')!r})",
                "rebuild it with `hld cache-teacher`",
            )
        for key in ("teacher", "tokenizer", "seq_len", "data"):
            if have.get(key) != getattr(expect, key):
                raise HldError(
                    f"cache {self.dir} was built with another {key} ({have.get(key)!r}, this run "
                    f"needs {getattr(expect, key)!r})",
                    "rebuild the cache for this run's config",
                )
        missing = sorted(set(expect.layers) - set(have.get("layers", [])))
        if missing:
            raise HldError(f"cache {self.dir} lacks teacher layers {missing}", "rebuild it with those layers")
        if not isinstance(have.get("top_k"), int) or have["top_k"] < 1:  # k=0 caches (built before k was checked)
            raise HldError(
                f"cache {self.dir} holds top-{have.get('top_k')} logits, so KD has no teacher distribution",
                "rebuild it with teacher.cache_top_k of 1 or more (default 64)",
            )
        if expect.top_k > have.get("top_k", 0):
            raise HldError(
                f"cache {self.dir} holds top-{have.get('top_k')} logits, the run asks for top-{expect.top_k}",
                "lower objective.top_k or rebuild the cache with a larger k",
            )

    def _open(self, name: str, verify: bool) -> dict:
        arrays = {}
        for fname, digest in self.manifest["files"].items():
            if not fname.startswith(name + "."):
                continue
            path = self.dir / fname
            if not path.exists():
                raise HldError(f"cache file {path} is missing", "rebuild the cache")
            if verify and file_sha256(path) != digest:
                raise HldError(f"cache shard {path} is corrupt (checksum mismatch)", "rebuild the cache")
            try:
                arrays[fname[len(name) + 1 : -4]] = np.load(path, mmap_mode="r")
            except ValueError as exc:
                raise HldError(f"cache shard {path} is truncated or unreadable", "rebuild the cache") from exc
        return arrays

    @property
    def top_k(self) -> int:
        return self.manifest["identity"]["top_k"]

    def __call__(self, batch: Batch, needs: Needs) -> Optional[TeacherSignals]:
        if not needs.any:
            return None
        if batch.window_ids is None:
            raise HldError("a cached teacher needs batches that know their window ids", "internal error")
        rows = []
        for wid in batch.window_ids.tolist():
            if wid not in self.row_of:
                raise HldError(
                    f"window {wid} is not in cache {self.dir}",
                    "the run reads past what the cache holds: rebuild it for this budget",
                )
            rows.append(self.row_of[wid])
        T = batch.input_ids.shape[1]  # a run's last step may read a prefix of its windows
        tokens = np.stack([self.shards[s]["tokens"][r, :T] for s, r in rows])
        if not np.array_equal(tokens, batch.input_ids.cpu().numpy()):
            raise HldError(
                f"cache {self.dir} holds other tokens than this run's batch",
                "rebuild the cache for this run's data and packing",
            )
        device = batch.input_ids.device
        sig = TeacherSignals()
        for layer in needs.layers:
            sig.hidden[layer] = torch.stack(
                [read_hidden(self.shards[s], layer, r, T, codec=self.codec) for s, r in rows]
            ).to(device)
        if needs.logits:
            parts = [self._logits(s, r, T) for s, r in rows]
            sig.topk_values, sig.topk_indices, sig.topk_rest = (
                torch.from_numpy(np.stack([np.asarray(p[i]) for p in parts])).to(device) for i in range(3)
            )
        return sig

    def _logits(self, s: int, r: int, T: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        try:
            return read_logits(
                self.shards[s],
                r,
                T,
                codec=self.codec,
                k=self.top_k,
                slot_bits=self.manifest["shards"][s].get("slot_bits", 0),
            )
        except (ValueError, IndexError, KeyError) as exc:  # shapes disagreeing with the manifest
            raise HldError(
                f"cache shard {self.manifest['shards'][s]['name']} in {self.dir} is truncated or unreadable ({exc})",
                "rebuild the cache",
            ) from exc


def cache_identity(
    *, teacher: str, tokenizer, seq_len: int, train_windows: WindowArray, layers, top_k: int
) -> CacheIdentity:
    """The identity a run expects of its cache (and a build writes): `teacher` is the weights' identity."""
    return CacheIdentity(
        teacher=teacher,
        tokenizer=tokenizer_fingerprint(tokenizer),
        seq_len=seq_len,
        layers=sorted(layers),
        top_k=top_k,
        data=windows_fingerprint(train_windows),
    )
