"""Per-chunk teacher caches: for a student with its own tokenizer (`student.tokenizer`), what the chosen
cross-tokenizer loss reads of the teacher at each predicted chunk of the run's paired windows
(hld.distill.cross_tok.signal), instead of the teacher's top-k at each of its own tokens.

Why per chunk: paired windows are cut in whole chunks with the student's side at most `data.seq_len` tokens
(hld.data.paired, `cut_windows`), and the chunks are the alignment of both tokenizers, so the teacher's rows
of a window depend on the student's tokenizer; a cache of the teacher's own windows (hld.cache.writer) could
serve another student tokenizer only after cutting its windows again. The stored values depend on the student
tokenizer anyway (they are read at the chunk bounds), and the identity says so.

The store, the records, the checksums, the resumable and shared build and the reader are the top-k cache's
(hld.cache.store, writer, reader); only the fields differ (docs/cache-format.md, "Per-chunk caches"). Per
shard of n windows, in window order, each window's chunks in order (M predicted chunks, M_all = M + n):

    tokens          (n, 32) uint8     sha256 of each window's teacher ids, student ids and chunk bounds
    chunk_offsets   (n + 1,) int64    every chunk's offset: window r holds chunks [o[r], o[r+1])
    chunk_loglik    (M,) float32      alm: the teacher's log-likelihood of each predicted chunk (T = 1)
    chunk_top       (M' * k,) float16 uld, and gold's chunks of several tokens (M' of them): the teacher's k
                                      largest probabilities of softmax(z / T), descending
    chunk_rest      (M',) float32     1 - their sum (in float32, before the rounding to float16)
    one_offsets     (n + 1,) int64    gold: window r's one-token chunks are [o1[r], o1[r+1])
    gold_values     (M1 * kg,) float16  gold at the M1 one-token chunks: the kg largest probabilities over the
    gold_ids        (M1 * kg,) uint16   shared outcomes (`shared_logprobs`), descending, and their outcome index
                                        (int32 past 65,536 outcomes), and the log of the mass off them (float32)
    gold_rest       (M1,) float32
    pooled_L<i>     (M_all * d,) uint16  layer i pooled per chunk (every chunk), bfloat16 bit patterns

The values are computed by `OnlineChunks`, the online objective's own teacher side, on the same windows.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import torch

from hld.cache.codec import bf16_bits, bf16_from_bits
from hld.distill.cross_tok.objectives import CrossTokHiddenObjective, CrossTokLogitObjective, batch_chunks
from hld.distill.cross_tok.pooling import pool_chunks
from hld.distill.cross_tok.signal import CachedChunks, ChunkLossSpec, ChunkSignals, OnlineChunks
from hld.distill.losses import logsumexp_outside
from hld.distill.signals import Needs, TeacherSignals
from hld.distill.signals.topk import TopK
from hld.fingerprint import tokenizer_fingerprint

if TYPE_CHECKING:
    from hld.data.paired import PairedWindows
    from hld.distill.objectives import Plan

DIGEST_BYTES = 32
BLOCK_CHUNKS = 64  # predicted chunks whose teacher rows (rows, V_t) fp32 are formed at a time in a build


# --------------------------------------------------------------------------- what a plan reads


def cross_objectives(plan: Plan) -> tuple[Optional[CrossTokLogitObjective], Optional[CrossTokHiddenObjective]]:
    """The plan's cross-tokenizer logit objective and hidden objective (either None when absent)."""
    found: dict[type, object] = {}

    def walk(obj) -> None:
        for kind in (CrossTokLogitObjective, CrossTokHiddenObjective):
            if isinstance(obj, kind):
                found.setdefault(kind, obj)
        for part in getattr(obj, "parts", ()):
            walk(part)

    for ph in plan.all_phases():
        walk(ph.objective)
    return found.get(CrossTokLogitObjective), found.get(CrossTokHiddenObjective)  # type: ignore[return-value]


def chunk_identity(plan: Plan, *, student_tokenizer) -> dict:
    """The `chunks` key of a per-chunk cache's identity: everything its stored values depend on beyond the
    teacher, its tokenizer, the paired windows (`data`) and the layers: the student tokenizer, the loss and
    its teacher-side parameters, the pooling, the stored dtypes."""
    kd, hidden = cross_objectives(plan)
    out: dict = {"student_tokenizer": tokenizer_fingerprint(student_tokenizer), "loss": None}
    if kd is not None:
        out["loss"] = kd.loss
        if kd.loss in ("uld", "gold"):
            out |= {"uld_top_k": kd.uld_top_k, "temperature": float(kd.temperature), "top_dtype": "float16"}
        if kd.loss == "gold":
            assert kd.vocab is not None
            ids = np.stack([kd.vocab.teacher_ids, kd.vocab.student_ids]).astype(np.int64)
            out |= {
                "gold_rest": kd.gold_rest,
                "gold_top_k": gold_top_k(kd.spec),
                "gold_width": gold_width(kd.spec),
                "shared_vocab": hashlib.sha256(ids.tobytes()).hexdigest()[:20],
            }
    if hidden is not None:
        out |= {"pooling": hidden.pooling, "hidden_dtype": "bfloat16"}
    return out


@dataclass(frozen=True)
class ChunkBuild:
    """What a per-chunk build computes: the loss's teacher side and the pooling of the layers."""

    spec: ChunkLossSpec
    pooling: Optional[str] = None


def chunk_build(plans: list[Plan]) -> ChunkBuild:
    """The build that serves every plan in `plans` (one cache group: the same loss, pooling where any pools)."""
    kd = next((k for k, _ in map(cross_objectives, plans) if k is not None), None)
    hidden = next((h for _, h in map(cross_objectives, plans) if h is not None), None)
    spec = kd.spec if kd is not None else ChunkLossSpec(loss="")
    return ChunkBuild(spec, hidden.pooling if hidden is not None else None)


def chunk_top_k(plan: Plan, teacher_vocab: int) -> int:
    """The identity's `top_k` of a per-chunk cache: ULD's k (at most the teacher's vocabulary), else 1."""
    kd, _ = cross_objectives(plan)
    if kd is None or kd.loss == "alm" or kd.uld_top_k is None:
        return 1
    return min(kd.uld_top_k, teacher_vocab)


def gold_width(spec: ChunkLossSpec) -> int:
    """Outcomes of gold's exact part: the shared ids, and the mass off them with `bucket`."""
    assert spec.vocab is not None
    return len(spec.vocab) + (spec.gold_rest == "bucket")


def gold_id_dtype(width: int) -> np.dtype:
    """The dtype of gold's stored outcome indices: uint16 while they fit."""
    return np.dtype(np.uint16 if width <= 1 << 16 else np.int32)


def gold_top_k(spec: ChunkLossSpec) -> int:
    assert spec.uld_top_k is not None
    return min(spec.uld_top_k, gold_width(spec))


# --------------------------------------------------------------------------- the fields


def field_specs(identity: dict, layers: list, *, d_model: int) -> dict:
    """key -> (dtype, shape after the row axis): () offsets (rows + 1), None a flat run (`store._check_record`)."""
    loss = identity["chunks"]["loss"]
    specs: dict[str, tuple[np.dtype, Optional[tuple]]] = {
        "tokens": (np.dtype(np.uint8), (DIGEST_BYTES,)),
        "chunk_offsets": (np.dtype(np.int64), ()),
    }
    if loss == "alm":
        specs["chunk_loglik"] = (np.dtype(np.float32), None)
    if loss in ("uld", "gold"):
        specs |= {"chunk_top": (np.dtype(np.float16), None), "chunk_rest": (np.dtype(np.float32), None)}
    if loss == "gold":
        specs |= {
            "one_offsets": (np.dtype(np.int64), ()),
            "gold_values": (np.dtype(np.float16), None),
            "gold_ids": (gold_id_dtype(identity["chunks"]["gold_width"]), None),
            "gold_rest": (np.dtype(np.float32), None),
        }
    for layer in layers:
        specs[f"pooled_L{layer}"] = (np.dtype(np.uint16), None)
    return specs


def window_digest(al) -> np.ndarray:
    """(32,) uint8: sha256 of a window's teacher ids, student ids and chunk bounds (what its values depend on
    of the data), so a cache read for another window, or the same window cut another way, is refused."""
    h = hashlib.sha256()
    for a in (al.teacher_ids, al.student_ids, al.teacher_bounds, al.student_bounds):
        arr = np.ascontiguousarray(a, dtype=np.int32)
        h.update(len(arr).to_bytes(8, "little") + arr.tobytes())
    return np.frombuffer(h.digest(), np.uint8)


# --------------------------------------------------------------------------- building


@torch.no_grad()
def chunk_values(
    sig: TeacherSignals, batch, spec: ChunkLossSpec, layers: list, *, pooling: Optional[str], block: int = BLOCK_CHUNKS
) -> dict[str, torch.Tensor]:
    """What a per-chunk cache stores for a batch of paired windows, from its online teacher signals: the loss's
    fields over the batch's predicted chunks (in order) and each layer pooled over every chunk."""
    assert batch.teacher_ids is not None
    chunks = batch_chunks(batch)
    pred = chunks.predicted()
    src = OnlineChunks(sig.source, batch.teacher_ids, block_rows=256) if sig.source is not None else None
    out: dict[str, torch.Tensor] = {}
    if spec.loss == "alm":
        assert src is not None
        out["chunk_loglik"] = src.logliks(pred).float()
    elif spec.loss in ("uld", "gold"):
        assert src is not None
        tops, rests, gv, gi, gr = [], [], [], [], []
        for i in range(0, len(pred), block):
            sl = slice(i, min(i + block, len(pred)))
            part = pred.select(sl)
            if spec.loss == "uld":
                top, _ = src.uld(part, sl, spec)
            else:
                exact, (top, _) = src.gold(part, sl, spec)
                assert isinstance(exact, torch.Tensor)
                v, ix = torch.topk(exact.float(), gold_top_k(spec), dim=-1)  # (m1, kg) descending
                gv.append(v.exp().half())  # (m1, kg) probabilities
                gi.append(ix)
                gr.append(logsumexp_outside(exact.float(), ix))
            p = top.float().exp()  # (m, k)
            tops.append(p.half())
            rests.append(1 - p.sum(-1))
        k = tops[0].shape[1] if tops else int(spec.uld_top_k or 0)  # (no rows: the width is moot)
        out["chunk_top"] = torch.cat(tops) if tops else torch.zeros(0, k, dtype=torch.float16)
        out["chunk_rest"] = torch.cat(rests) if rests else torch.zeros(0)
        if spec.loss == "gold":
            kg = gold_top_k(spec)
            out["gold_values"] = torch.cat(gv) if gv else torch.zeros(0, kg, dtype=torch.float16)
            out["gold_ids"] = torch.cat(gi) if gi else torch.zeros(0, kg, dtype=torch.int64)
            out["gold_rest"] = torch.cat(gr) if gr else torch.zeros(0)
    for layer in layers:
        assert pooling is not None
        h = sig.hidden[layer]
        out[f"pooled_L{layer}"] = pool_chunks(
            h.reshape(-1, h.shape[-1]), chunks.teacher_start, chunks.teacher_end, how=pooling
        ).to(torch.bfloat16)
    return out


class ChunkShardWriter:
    """Encodes one shard of a per-chunk cache: `put` a batch of windows at a time (in row order), `finish` at
    the end (the offsets). Every array goes to `sink(key, rows)` as it is made."""

    def __init__(self, sink, *, identity: dict, layers: list) -> None:
        self.sink, self.loss, self.layers = sink, identity["chunks"]["loss"], list(layers)
        self.id_dtype = gold_id_dtype(identity["chunks"].get("gold_width", 0))
        self.counts: list[int] = []  # chunks of each window
        self.ones: list[int] = []  # one-token predicted chunks of each window (gold)

    def put(self, b: int, *, alignments: list, values: dict[str, torch.Tensor]) -> None:
        self.sink("tokens", np.stack([window_digest(al) for al in alignments]))
        for al in alignments:
            tb, sb = np.diff(al.teacher_bounds[1:]), np.diff(al.student_bounds[1:])
            self.counts.append(len(al.teacher_bounds) - 1)
            self.ones.append(int(((tb == 1) & (sb == 1)).sum()))
        for key, x in values.items():
            if key.startswith("pooled_L"):
                self.sink(key, bf16_bits(x).reshape(-1))
            elif key in ("chunk_top", "gold_values"):
                self.sink(key, x.numpy().astype(np.float16).reshape(-1))
            elif key == "gold_ids":
                self.sink(key, x.numpy().astype(self.id_dtype).reshape(-1))
            else:
                self.sink(key, x.numpy().astype(np.float32).reshape(-1))

    def finish(self) -> None:
        self.sink("chunk_offsets", np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64))
        if self.loss == "gold":
            self.sink("one_offsets", np.concatenate([[0], np.cumsum(self.ones)]).astype(np.int64))


def fill_chunk_shard(
    writer,
    online,
    windows: PairedWindows,
    ids: np.ndarray,
    *,
    spec: ChunkLossSpec,
    pooling: Optional[str],
    batch_size: int,
    device: torch.device,
) -> Iterator[int]:
    """Run the teacher over the shard's paired windows, batch by batch, into `writer`; yields the windows done."""
    from hld.data.packing import make_paired_batch

    needs = Needs(logits=bool(spec.loss), layers=tuple(writer.layers))
    for b in range(0, len(ids), batch_size):
        batch = make_paired_batch(windows.rows(ids[b : b + batch_size])).to(device)
        sig = online(batch, needs)
        assert sig is not None
        host = {k: v.cpu() for k, v in chunk_values(sig, batch, spec, writer.layers, pooling=pooling).items()}
        writer.put(b, alignments=batch.alignments, values=host)
        yield b + batch.input_ids.shape[0]


# --------------------------------------------------------------------------- standardisation statistics


def stats_wanted(plans: list[Plan], cfgs: list, *, n_windows: int, max_windows: int) -> Optional[dict]:
    """What `fit_targets` will ask of a per-chunk cache (its states are pooled, so the statistics of the
    teacher's token states are measured at build time and kept in the manifest): the windows, the BOS rule
    and the layers; None when no plan standardises."""
    from hld.distill.objectives import hidden_objectives

    layers = sorted(
        {t for plan in plans for o in hidden_objectives(plan) if o.wants_stats for _, t in o.projectors.pairs}
    )
    if not layers:
        return None
    h = cfgs[0].objective.hidden
    n = min(h.stats_windows, n_windows, max_windows)
    return {"windows": int(n), "skip_first": bool(h.skip_first_position), "layers": layers}


def measure_stats(online, order, wanted: dict) -> dict:
    """`wanted` with the statistics themselves (hld.distill.hidden.estimate_layer_stats, on the online
    teacher over the run's first windows in batch order), as the manifest holds them."""
    from hld.distill.hidden import estimate_layer_stats

    stats = estimate_layer_stats(
        online, order, tuple(wanted["layers"]), n_windows=wanted["windows"], skip_first=wanted["skip_first"]
    )
    moments = {
        str(t): {"mean": m.mean.tolist(), "std": m.std.tolist(), "count": int(m.count)} for t, m in stats.items()
    }
    return wanted | {"moments": moments}


def holds_stats(held: Any, want: dict) -> bool:
    """Does a manifest's `layer_stats` (`held`) hold the statistics `want` names (windows, BOS rule, layers)?"""
    return isinstance(held, dict) and {k: held.get(k) for k in want} == want


def stored_stats(manifest: dict, where, layers, *, n_windows: int, skip_first: bool):
    """The statistics a per-chunk cache holds for `fit_targets` (an HldError when it holds others); None for a
    cache of the teacher's own tokens (the run measures them on the cached states)."""
    from hld.distill.hidden import Moments
    from hld.errors import HldError

    if manifest["codec"]["logits"] != "chunks":
        return None
    have = manifest.get("layer_stats")
    want: dict[str, Any] = {"windows": int(n_windows), "skip_first": bool(skip_first), "layers": sorted(layers)}
    keep = set(want["layers"])
    if not holds_stats(have, want):
        got = None if not isinstance(have, dict) else {k: have.get(k) for k in want}
        raise HldError(
            f"cache {where} holds teacher statistics of {got}, this run standardises with {want}",
            "rebuild the cache for this run's config (hld cache-teacher)",
        )
    return {
        int(t): Moments(mean=torch.tensor(m["mean"]), std=torch.tensor(m["std"]), count=int(m["count"]))
        for t, m in have["moments"].items()
        if int(t) in keep
    }


# --------------------------------------------------------------------------- reading


@dataclass
class CachedChunkSignals(ChunkSignals):
    """A per-chunk cache's signals on the host and the digests of the windows they were built on."""

    tokens: Optional[np.ndarray] = None  # (B, 32) uint8

    def pop_tokens(self) -> np.ndarray:
        t, self.tokens = self.tokens, None
        assert t is not None
        return t


def batch_digests(batch) -> np.ndarray:
    """(B, 32) the digests of a batch's windows (what `tokens` of a per-chunk cache holds)."""
    return np.stack([window_digest(al) for al in batch.alignments])


def read_chunks(reader, rows: np.ndarray, needs: Needs) -> CachedChunkSignals:
    """The per-chunk signals of cache rows `rows` (a batch's windows, in batch order), on the host."""
    ident = reader.manifest["identity"]
    loss, k, d = ident["chunks"]["loss"], int(ident["top_k"]), int(reader.manifest["d_model"])
    shard = rows // reader.shard_windows
    pieces: dict[str, list] = {}
    digests = np.empty((len(rows), DIGEST_BYTES), np.uint8)

    def take(s: int, key: str, lo: int, hi: int, width: int = 1) -> None:
        pieces.setdefault(key, []).append(reader.parts.field(s, key)[lo * width : hi * width])

    for j, (s, r) in enumerate(zip(shard, rows - shard * reader.shard_windows)):
        s, r = int(s), int(r)
        digests[j] = reader.parts.field(s, "tokens")[r]
        o = reader.parts.field(s, "chunk_offsets")
        a, b = int(o[r]), int(o[r + 1])  # every chunk of window r; its predicted ones: [a - r, b - r - 1)
        pa, pb = a - r, b - r - 1
        if needs.logits and loss == "alm":
            take(s, "chunk_loglik", pa, pb)
        if needs.logits and loss == "uld":
            take(s, "chunk_top", pa, pb, k)
            take(s, "chunk_rest", pa, pb)
        if needs.logits and loss == "gold":
            o1 = reader.parts.field(s, "one_offsets")
            a1, b1 = int(o1[r]), int(o1[r + 1])
            kg = int(ident["chunks"]["gold_top_k"])
            take(s, "gold_values", a1, b1, kg)
            take(s, "gold_ids", a1, b1, kg)
            take(s, "gold_rest", a1, b1)
            take(s, "chunk_top", pa - a1, pb - b1, k)  # the other chunks: those before r's not one-token
            take(s, "chunk_rest", pa - a1, pb - b1)
        for layer in needs.layers:
            take(s, f"pooled_L{layer}", a, b, d)

    def cat(key: str, dtype) -> np.ndarray:
        got = pieces.get(key, [])
        return np.concatenate(got).astype(dtype) if got else np.zeros(0, dtype)

    out = CachedChunks()
    if needs.logits and loss == "alm":
        out.loglik = torch.from_numpy(cat("chunk_loglik", np.float32))
    if needs.logits and loss in ("uld", "gold"):
        p = torch.from_numpy(cat("chunk_top", np.float16).astype(np.float32)).view(-1, k)
        out.uld_top, out.uld_rest = p.log(), torch.from_numpy(cat("chunk_rest", np.float32))
    if needs.logits and loss == "gold":
        kg = int(ident["chunks"]["gold_top_k"])
        out.gold_top = TopK(
            values=torch.from_numpy(cat("gold_values", np.float16).astype(np.float32)).view(-1, kg).log(),
            indices=torch.from_numpy(cat("gold_ids", np.int64)).view(-1, kg),
            rest=torch.from_numpy(cat("gold_rest", np.float32)),
        )
    if needs.layers:
        out.pooled = {layer: bf16_from_bits(cat(f"pooled_L{layer}", np.uint16)).view(-1, d) for layer in needs.layers}
    return CachedChunkSignals(chunks=out, tokens=digests)
