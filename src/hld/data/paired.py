"""Paired windows for a teacher and a student with different tokenizers (issue 34, item 1): every document
tokenised by both, aligned by text (`hld.data.align`), stored once as chunks, and cut into windows at chunk
boundaries, so that a teacher window and its student window cover exactly the same text.

The store (docs/data-format.md, "Paired stores"), one shard per source unit as in `hld.data.store`:

<store>/identity.json, manifest.json   identity (both tokenizers' whole specs, source, text field) + shards
<store>/shards/NNNNN.teacher.bin       unit N's kept documents, each its teacher tokens + teacher EOS (uint32)
<store>/shards/NNNNN.student.bin       the same documents, student tokens + student EOS
<store>/shards/NNNNN.chunks.bin        (n_chunks, 3) uint32: teacher tokens, student tokens, characters of
                                       each chunk in stream order; a document's EOS pair is its last chunk
                                       (1, 1, 0); every text chunk has >= 1 character
<store>/shards/NNNNN.json              the unit's commit record: counts (docs, skipped, ...) and sha256s
<store>/shards/NNNNN.w<S>x<T>-<sha>.npy  the unit's windows for student length S, teacher length T
                                       (cut once, on first use; <sha>: the chunk file's checksum)

A document one side cannot round-trip (decode(encode(text)) != text, e.g. U+2581 through Gemma's
tokenizer) is skipped and counted (`skipped` in its record and the manifest; one warning line when the
store is built), not fatal. A tokenizer without offsets (a slow one) is refused in one line.

Windows (the protocol, `PROTOCOL`): a unit's chunks in order are cut greedily into windows; window =
the BOS pair (chunk 0, no text) + the longest run of whole chunks that keeps the student side within
`seq_len` tokens and the teacher side within `teacher_seq_len` (BOS included). A window never splits a
chunk; a chunk too long for any window alone is dropped (counted: `PairedWindows.dropped_chunks`); the
last, partial window of each unit is dropped (the token store drops its stream's last partial chunk).
Windows do not cross units (units are cut apart, in parallel, and resume apart). Neither side is
truncated: both are padded to their length (`PairedRows`), the padding in no chunk.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Optional

import numpy as np

from hld import files
from hld.atomic import write_file, write_json
from hld.data import store as st
from hld.data.align import Aligner, Alignment
from hld.data.packing import Batch, make_paired_batch
from hld.data.sources import fingerprint, iter_unit, source_units
from hld.data.tokenize import check_out, committed_prefix, enough_units, open_or_build, store_root
from hld.errors import HldError
from hld.fingerprint import tokenizer_spec_fingerprint
from hld.locks import file_lock
from hld.progress import Progress

FORMAT = "hld-paired-store"
VERSION = 1
PROTOCOL = "paired-chunks-v1"  # the window protocol above; a store's directory name starts with it
KINDS = ("teacher", "student", "chunks")
DTYPE = st.DTYPE  # uint32, little-endian
CHUNK_COLS = 3  # teacher tokens, student tokens, characters
BATCH_DOCS = 256
MAX_OPEN = 64  # shard memmaps a process keeps open (least recently used closed first)
IDENTITY_KEYS = (
    "format",
    "version",
    "protocol",
    "teacher_tokenizer",
    "student_tokenizer",
    "source",
    "source_fingerprint",
    "text_field",
    "teacher_special_ids",
    "student_special_ids",
)
_SURROGATE = re.compile("[\ud800-\udfff]")


def _fix(path: Path) -> str:
    return f"delete {path} and rerun (hld tokenize --student-tokenizer, or the command, rebuilds it)"


# ---- identity ------------------------------------------------------------------------------------


def aligner_for(teacher, student) -> Aligner:
    """The Aligner the store is built with: no BOS (BOS belongs to windows), each document's EOS pair as
    its last chunk, the round trip checked per document (a failing document is skipped, not fatal). Refuses
    a slow tokenizer, one that does not reproduce text, or one without BOS/EOS, in one line."""
    aligner = Aligner(teacher, student, bos=False, eos=True, check=False)
    for side, tok in (("teacher", teacher), ("student", student)):
        if getattr(tok, "bos_token_id", None) is None:
            raise HldError(
                f"the {side} tokenizer {aligner_name(tok)!r} has no BOS token, which every window starts with",
                "give a tokenizer with a bos token (hld train-tokenizer writes <bos>)",
            )
    return aligner


def aligner_name(tok) -> str:
    return str(getattr(tok, "name_or_path", "") or type(tok).__name__)


def identity(spec: str, teacher, student, text_field: str) -> dict:
    """What a paired store of `spec` must match (everything but its shards)."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "protocol": PROTOCOL,
        "teacher_tokenizer": tokenizer_spec_fingerprint(teacher),
        "student_tokenizer": tokenizer_spec_fingerprint(student),
        "source": spec,
        "source_fingerprint": fingerprint(spec),
        "text_field": text_field,
        "teacher_special_ids": [int(teacher.bos_token_id), int(teacher.eos_token_id)],
        "student_special_ids": [int(student.bos_token_id), int(student.eos_token_id)],
    }


def store_path(ident: dict, store_dir: Optional[str] = None) -> Path:
    key = hashlib.sha256(repr(sorted(ident.items())).encode()).hexdigest()[:20]
    return store_root(store_dir) / f"{PROTOCOL}-{key}"


# ---- building ------------------------------------------------------------------------------------


def aligned_blocks(
    docs: Iterable[str], aligner: Aligner, *, counts: dict, batch_docs: int = BATCH_DOCS
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(teacher ids, student ids, chunk table) uint32 blocks of `docs`, a batch at a time: each kept
    document's tokens + EOS on each side, its chunks (teacher tokens, student tokens, characters). `counts`
    gains docs (kept), skipped (a side cannot round-trip it), repaired (lone surrogates made U+FFFD),
    teacher_tokens, student_tokens, chunks, chars, and `first_skipped` (the first skip's error line)."""
    batch: list[str] = []

    def flush() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        t_encs, s_encs = aligner.encode(batch)
        errors = aligner.round_trip_errors(batch, t_encs, s_encs)
        t_parts, s_parts, c_parts = [], [], []
        for text, t_enc, s_enc, error in zip(batch, t_encs, s_encs, errors):
            if error is not None:
                counts["skipped"] += 1
                problem = re.sub(r" text \d+ of the batch", "", error.problem)
                counts.setdefault("first_skipped", f"document {counts['docs'] + counts['skipped']}: {problem}")
                continue
            al = aligner.from_encodings(text, t_enc, s_enc)
            t_parts.append(al.teacher_ids)
            s_parts.append(al.student_ids)
            c_parts.append(
                np.stack([np.diff(al.teacher_bounds), np.diff(al.student_bounds), np.diff(al.char_bounds)], axis=1)
            )
            counts["docs"] += 1
            counts["chars"] += len(text)
        batch.clear()
        out = tuple(
            np.concatenate(p).astype(DTYPE) if p else np.zeros((0, CHUNK_COLS) if i == 2 else 0, DTYPE)
            for i, p in enumerate((t_parts, s_parts, c_parts))
        )
        counts["teacher_tokens"] += len(out[0])
        counts["student_tokens"] += len(out[1])
        counts["chunks"] += len(out[2])
        return out  # type: ignore[return-value]

    for doc in docs:
        if _SURROGATE.search(doc):
            doc = _SURROGATE.sub("\ufffd", doc)
            counts["repaired"] += 1
        batch.append(doc)
        if len(batch) == batch_docs:
            yield flush()
    if batch:
        yield flush()


def _write_kinds(shards: Path, name: str, fill: Callable[[list[BinaryIO]], None]) -> None:
    """The unit's three files, each complete or absent (`hld.atomic.write_file`, nested so one pass over
    the documents fills all three); the caller's record, written after, is what commits them."""

    def nest(i: int, handles: list[BinaryIO]) -> None:
        if i == len(KINDS):
            fill(handles)
            return
        write_file(shards / f"{name}.{KINDS[i]}.bin", lambda fh: nest(i + 1, [*handles, fh]))

    nest(0, [])


def _part(name: str, kind: str, sha: str) -> dict:
    """One file of a unit as `hld.data.store`'s checksum stamps know a shard."""
    return {"name": f"{name}.{kind}", "sha256": sha}


def build_unit(spec: str, index: int, out: Path, aligner: Aligner, *, text_field: str, unit: str, wait=False):
    """Align unit `index` into `out/shards/NNNNN.*` and commit its record; None when another process
    holds the unit (`wait`: wait for it, then take its record or do the unit)."""
    name = f"{index:05d}"
    shards = out / "shards"
    with file_lock(shards / f"{name}.lock", wait=wait) as mine:
        if not mine:
            return None
        done = shard_record(out, name)
        if done is not None:
            return done
        for stale in shards.glob(f".{name}.*.tmp"):  # a killed build's parts (we hold the unit's lock)
            stale.unlink(missing_ok=True)
        keys = ("docs", "skipped", "repaired", "teacher_tokens", "student_tokens", "chunks", "chars")
        counts: dict = dict.fromkeys(keys, 0)
        shas = {k: hashlib.sha256() for k in KINDS}

        def fill(handles: list[BinaryIO]) -> None:
            for block in aligned_blocks(iter_unit(spec, index, text_field), aligner, counts=counts):
                for kind, arr, fh in zip(KINDS, block, handles):
                    data = arr.tobytes()
                    shas[kind].update(data)
                    fh.write(data)

        _write_kinds(shards, name, fill)
        record = {
            "name": name,
            "unit": unit,
            **counts,
            "tokens": counts["student_tokens"],  # what `need_tokens` counts: the student's
            "sha256": {k: h.hexdigest() for k, h in shas.items()},
        }
        for kind in KINDS:  # hashed as written: the first reader need not re-read them
            st.mark_verified(out, _part(name, kind, record["sha256"][kind]))
        write_json(shards / f"{name}.json", record)
        return record


def _is_record(r) -> bool:
    ints = ("docs", "skipped", "teacher_tokens", "student_tokens", "chunks", "tokens")
    return (
        isinstance(r, dict)
        and isinstance(r.get("name"), str)
        and isinstance(r.get("sha256"), dict)
        and all(isinstance(r["sha256"].get(k), str) for k in KINDS)
        and all(isinstance(r.get(k), int) and not isinstance(r.get(k), bool) and r[k] >= 0 for k in ints)
    )


CHUNK_BYTES = CHUNK_COLS * DTYPE.itemsize  # a chunk's row of the chunk table


def _sizes(r: dict) -> dict[str, int]:
    """The byte size of each of a unit's files, by its record."""
    per = DTYPE.itemsize
    return {
        "teacher": r["teacher_tokens"] * per,
        "student": r["student_tokens"] * per,
        "chunks": r["chunks"] * CHUNK_BYTES,
    }


def shard_bytes(manifest: dict) -> int:
    """The bytes of a store's shard files (its three files per unit), by its manifest's records."""
    return sum(sum(_sizes(r).values()) for r in manifest["shards"])


def shard_record(path: Path, name: str) -> Optional[dict]:
    """The committed record of unit `name`, if its three files have the sizes it says; else None."""
    try:
        rec = json.loads(files.read_text(path / "shards" / f"{name}.json", "", "", max_bytes=files.MAX_CONFIG_BYTES))
    except (HldError, OSError, ValueError):
        return None
    if not _is_record(rec):
        return None
    try:
        if any(os.path.getsize(path / "shards" / f"{name}.{k}.bin") != n for k, n in _sizes(rec).items()):
            return None
    except OSError:
        return None
    return rec


TOTALS = ("docs", "skipped", "repaired", "teacher_tokens", "student_tokens", "chunks", "chars")


def assemble(out: Path, ident: dict, n_units: int, *, need_tokens=None, need_docs=None) -> Optional[dict]:
    """Write the manifest from the committed prefix if it holds what was asked (all units when nothing
    is); returns it, or None while units are missing."""
    with file_lock(out / ".manifest.lock"):
        records = committed_prefix(out, n_units, shard_record)
        if not enough_units(records, n_units, need_tokens, need_docs):
            return None
        manifest = {
            **ident,
            "units": n_units,
            "complete": len(records) == n_units,
            **{k: sum(r.get(k, 0) for r in records) for k in TOTALS},
            "shards": records,
        }
        write_json(out / "manifest.json", manifest)
        return manifest


def build(
    spec: str,
    teacher,
    student,
    out: Path,
    *,
    text_field: str = "text",
    shard: tuple[int, int] = (0, 1),
    workers: int = 1,
    need_tokens: Optional[int] = None,
    need_docs: Optional[int] = None,
    quiet: bool = False,
    desc: str = "align",
) -> Optional[dict]:
    """Align the units of `spec` this process takes (units u with u % N == I, `shard` = (I, N)) into the
    paired store `out`, stopping once the committed prefix holds `need_tokens` student tokens /
    `need_docs` kept documents (all units when neither is given). `workers` > 1: that many spawned
    processes share this task's units (one tokenizer thread each). Returns the manifest, or None while
    other tasks still have units to commit. Skipped documents: one warning line on stderr."""
    aligner = aligner_for(teacher, student)  # refuses slow tokenizers etc. before anything is written
    ident = identity(spec, teacher, student, text_field)
    out = Path(out)
    check_out(out, ident)
    units = source_units(spec)
    mine = [u for u in range(len(units)) if u % shard[1] == shard[0]]
    if workers > 1 and len(mine) > 1:
        _parallel(spec, teacher, student, out, text_field, shard, min(workers, len(mine)), need_tokens, need_docs)
    records: dict[int, dict] = {}
    for u in mine:  # committed units: checked (a stamp makes it a stat), redone if damaged
        rec = shard_record(out, f"{u:05d}")
        if rec is None:
            continue
        try:
            for kind in KINDS:
                st.verify_shard(out, _part(rec["name"], kind, rec["sha256"][kind]))
            records[u] = rec
        except HldError:
            if not quiet:
                print(f"[{desc}] unit {u} ({units[u]}): its files do not match their checksums; aligning it again")
            (out / "shards" / f"{u:05d}.json").unlink(missing_ok=True)
    prog = Progress(len(mine), desc=desc, quiet=quiet, initial=len(records), unit="unit")
    t0, tokens, skipped = time.time(), 0, []
    bounded = need_tokens is not None or need_docs is not None

    def satisfied() -> bool:
        return bounded and enough_units(
            committed_prefix(out, len(units), shard_record), len(units), need_tokens, need_docs
        )

    try:
        for wait in (False, True):  # then the units another process held: wait for its commit
            for u in mine:
                if u in records or satisfied():
                    continue
                rec = build_unit(spec, u, out, aligner, text_field=text_field, unit=units[u], wait=wait)
                if rec is None:
                    continue
                records[u] = rec
                tokens += rec["tokens"]
                if rec["skipped"]:
                    skipped.append(rec)
                prog.update(len(records), tokens_per_s=tokens / max(time.time() - t0, 1e-9))
    finally:
        prog.close()
    if skipped:
        first = next(r for r in skipped if r.get("first_skipped"))
        sys.stderr.write(
            f"hld: warning: {sum(r['skipped'] for r in skipped):,} document(s) of {spec} skipped: one tokenizer "
            f"cannot round-trip them (first: {first['unit']}, {first['first_skipped']})\n"
        )
        sys.stderr.flush()
    return assemble(out, ident, len(units), need_tokens=need_tokens, need_docs=need_docs)


def _worker_build(spec, teacher, student, out, text_field, shard, need_tokens, need_docs) -> None:
    build(
        spec,
        teacher,
        student,
        Path(out),
        text_field=text_field,
        shard=shard,
        need_tokens=need_tokens,
        need_docs=need_docs,
        quiet=True,
    )


def _parallel(spec, teacher, student, out, text_field, shard, workers, need_tokens, need_docs) -> None:
    """Worker k of task I/N builds the units u with u % (N * workers) == I + N * k (the task's own units,
    dealt over its workers); the task then takes up whatever is left and assembles."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # N workers on N cores: no thread pool per worker
    try:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            parts = [(shard[0] + shard[1] * k, shard[1] * workers) for k in range(workers)]
            futures = [
                pool.submit(_worker_build, spec, teacher, student, str(out), text_field, p, need_tokens, need_docs)
                for p in parts
            ]
            for f in futures:
                f.result()
    finally:
        if old is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old


# ---- reading -------------------------------------------------------------------------------------


def read_manifest(path: Path) -> dict:
    return st.checked_manifest(
        path,
        kind="paired store",
        format=FORMAT,
        version=VERSION,
        keys=(*IDENTITY_KEYS, *TOTALS, "shards"),
        is_record=_is_record,
        fix=_fix(path),
    )


def verify_all(path: Path) -> int:
    """Check every file of every unit against its checksum now, stamps ignored (`hld tokenize --verify`);
    returns the number of units checked."""
    m = read_manifest(path)
    for rec in m["shards"]:
        for kind in KINDS:
            (path / "shards" / f"{rec['name']}.{kind}.ok").unlink(missing_ok=True)
            st.verify_shard(path, _part(rec["name"], kind, rec["sha256"][kind]))
    return len(m["shards"])


class PairedStore:
    """A committed paired store, read-only: each unit's teacher stream, student stream and chunk table."""

    def __init__(self, path: Path, *, expect: Optional[dict] = None) -> None:
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        if expect is not None:
            st.check_identity(self.manifest, expect, self.path)
        for rec in self.manifest["shards"]:  # sizes at open (a stat per file); checksums at first read
            for kind, size in _sizes(rec).items():
                f = self.file(rec["name"], kind)
                there = os.path.lexists(f)
                got = files.regular_file(f, "paired store file", _fix(self.path)).st_size if there else None
                if got != size:
                    raise HldError(
                        f"paired store file {f} is {'missing' if got is None else f'{got} bytes'}, its manifest "
                        f"says {size} bytes (truncated or replaced)",
                        _fix(self.path),
                    )
        self._maps: OrderedDict[tuple[int, str], np.ndarray] = OrderedDict()
        self._verified: set[tuple[int, str]] = set()

    @property
    def n_units(self) -> int:
        return len(self.manifest["shards"])

    @property
    def token_ratio(self) -> float:
        """Teacher tokens per student token in the store's first unit (EOS included): a committed unit never
        changes, so a store extended by a later run keeps its ratio, and the default teacher window length
        (`default_teacher_seq_len`) and the windows cut with it stay those of the first run."""
        first = self.manifest["shards"][0] if self.manifest["shards"] else self.manifest
        return first["teacher_tokens"] / max(first["student_tokens"], 1)

    @property
    def identity(self) -> str:
        m = self.manifest
        keys = {k: m[k] for k in IDENTITY_KEYS}
        keys["shards"] = [(s["name"], s["chunks"], s["sha256"]) for s in m["shards"]]
        return hashlib.sha256(repr(sorted(keys.items())).encode()).hexdigest()[:20]

    def file(self, name: str, kind: str) -> Path:
        return self.path / "shards" / f"{name}.{kind}.bin"

    def array(self, i: int, kind: str) -> np.ndarray:
        """Unit i's `kind` file, memory-mapped (verified against its checksum on first use)."""
        key = (i, kind)
        if key in self._maps:
            self._maps.move_to_end(key)
            return self._maps[key]
        rec = self.manifest["shards"][i]
        if key not in self._verified:
            st.verify_shard(self.path, _part(rec["name"], kind, rec["sha256"][kind]))
            self._verified.add(key)
        if len(self._maps) >= MAX_OPEN:
            self._maps.popitem(last=False)
        empty = _sizes(rec)[kind] == 0  # an empty file cannot be mapped
        flat: np.ndarray = np.zeros(0, DTYPE) if empty else np.memmap(self.file(rec["name"], kind), DTYPE, mode="r")
        arr = flat.reshape(-1, CHUNK_COLS) if kind == "chunks" else flat
        self._maps[key] = arr
        return arr

    def index_file(self, i: int, seq_len: int, teacher_seq_len: int) -> Path:
        rec = self.manifest["shards"][i]
        return self.path / "shards" / f"{rec['name']}.w{seq_len}x{teacher_seq_len}-{rec['sha256']['chunks'][:16]}.npy"

    def windows_index(self, i: int, seq_len: int, teacher_seq_len: int) -> np.ndarray:
        """Unit i's windows as (n, 6) int64 rows [chunk start, chunk end, teacher token start, teacher token
        end, student token start, student token end) in the unit's streams: cut once (`cut_windows`) and
        kept beside the unit (its name carries the chunk file's checksum: a rebuilt unit is cut again)."""
        f = self.index_file(i, seq_len, teacher_seq_len)
        try:
            index = np.load(f, mmap_mode="r")
            if index.ndim == 2 and index.shape[1] == 6 and index.dtype == np.int64:
                return index
        except (OSError, ValueError):
            pass  # absent, or not an index (cut it again)
        index = cut_windows(self.array(i, "chunks"), seq_len=seq_len, teacher_seq_len=teacher_seq_len)
        try:
            write_file(f, lambda fh: np.save(fh, index))
        except OSError:  # a read-only store: every process cuts for itself
            pass
        return index


def cut_windows(chunks: np.ndarray, *, seq_len: int, teacher_seq_len: int) -> np.ndarray:
    """The windows of one unit's chunk table (n_chunks, 3): greedy, each the BOS pair + the longest run of
    whole chunks with <= seq_len - 1 student and <= teacher_seq_len - 1 teacher tokens; a chunk too long
    alone is skipped; the last window (no chunk left to stop it) dropped. (n_windows, 6) int64 rows:
    chunk start, chunk end, teacher token start, end, student token start, end."""
    t = np.asarray(chunks[:, 0], dtype=np.int64)
    s = np.asarray(chunks[:, 1], dtype=np.int64)
    ct, cs = np.concatenate(([0], np.cumsum(t))), np.concatenate(([0], np.cumsum(s)))
    too_long = (t > teacher_seq_len - 1) | (s > seq_len - 1)
    rows, i, n = [], 0, len(t)
    while i < n:
        if too_long[i]:
            i += 1
            continue
        # the last chunk end j with both sides within their room; chunk i fits, so j > i
        j = min(
            int(np.searchsorted(ct, ct[i] + teacher_seq_len - 1, side="right")) - 1,
            int(np.searchsorted(cs, cs[i] + seq_len - 1, side="right")) - 1,
        )
        if j >= n:  # the unit's last chunks: a partial window, dropped
            break
        rows.append((i, j, ct[i], ct[j], cs[i], cs[j]))
        i = j
    return np.asarray(rows, dtype=np.int64).reshape(-1, 6)


def default_teacher_seq_len(seq_len: int, token_ratio: float) -> int:
    """The teacher's window length when none is given: BOS + (seq_len - 1) student tokens' worth of teacher
    tokens at the store's measured ratio, with a margin of 1/4 (a window's own ratio varies), rounded up
    to a multiple of 8 (docs/decisions.md, "paired windows")."""
    room = int(np.ceil((seq_len - 1) * token_ratio * 1.25)) + 1
    return int(-(-room // 8) * 8)


@dataclass
class PairedRows:
    """B paired windows, each side padded to its length (padding after the window's tokens, in no chunk)."""

    teacher_ids: np.ndarray  # (B, teacher_seq_len) int64; [:, 0] the teacher's BOS
    student_ids: np.ndarray  # (B, seq_len) int64; [:, 0] the student's BOS
    teacher_lengths: np.ndarray  # (B,) int64: the window's teacher tokens (BOS included)
    student_lengths: np.ndarray  # (B,) int64
    alignments: list[Alignment]  # per window, bounds into its rows; hld.distill.cross_tok.Chunks reads them


class PairedWindows:
    """The paired windows of a store (the module's protocol), by global index: units in order, each unit's
    windows in order. `window(w)` one window's Alignment (BOS pair first); `rows(idx)` a padded batch."""

    def __init__(
        self,
        store: PairedStore,
        *,
        seq_len: int,
        teacher_seq_len: Optional[int] = None,
        teacher_pad_id: int,
        student_pad_id: int,
        teacher_vocab_size: int,
        student_vocab_size: int,
        max_docs: Optional[int] = None,
    ) -> None:
        if teacher_seq_len is None:
            teacher_seq_len = default_teacher_seq_len(seq_len, store.token_ratio)
        for key, value in (("data.seq_len", seq_len), ("the teacher's window length", teacher_seq_len)):
            if value < 2:
                raise HldError(f"{key}={value} leaves no prediction in a window (BOS + at least one token)", "use >= 2")
        self.store, self.seq_len, self.teacher_seq_len = store, seq_len, teacher_seq_len
        self.pad = (int(teacher_pad_id), int(student_pad_id))
        self.vocab = (int(teacher_vocab_size), int(student_vocab_size))
        self.bos = tuple(int(store.manifest[f"{k}_special_ids"][0]) for k in ("teacher", "student"))
        self.index = [store.windows_index(i, seq_len, teacher_seq_len) for i in range(store.n_units)]
        if max_docs is not None:
            self.index = self._first_docs(max_docs)
        self.offsets = np.concatenate(([0], np.cumsum([len(ix) for ix in self.index]))).astype(np.int64)
        self.n = int(self.offsets[-1])
        if self.n == 0:
            raise HldError(
                f"the paired store {store.path} holds no whole window of data.seq_len={seq_len} "
                f"(teacher {teacher_seq_len})",
                "add text or lower data.seq_len",
            )
        ident = f"{store.identity}|{seq_len}|{teacher_seq_len}|{self.n}"
        self.fingerprint = hashlib.sha256(ident.encode()).hexdigest()[:20]

    def _first_docs(self, max_docs: int) -> list[np.ndarray]:
        """The windows that lie within the store's first `max_docs` documents."""
        out, seen = [], 0
        for i, index in enumerate(self.index):
            docs = self.store.manifest["shards"][i]["docs"]
            if seen + docs <= max_docs:
                out.append(index)
            elif seen < max_docs:
                ends = np.flatnonzero(np.asarray(self.store.array(i, "chunks")[:, 2]) == 0)  # EOS chunks
                last = int(ends[max_docs - seen - 1]) + 1  # one past the EOS of the last document kept
                out.append(index[np.asarray(index[:, 1]) <= last])
            else:
                out.append(index[:0])
            seen += docs
        return out

    def __len__(self) -> int:
        return self.n

    @property
    def dropped_chunks(self) -> int:
        """Chunks in no window because each alone is longer than a window (not counting units' tails)."""
        return sum(int((np.asarray(ix[1:, 0]) - np.asarray(ix[:-1, 1])).sum()) for ix in self.index if len(ix))

    def _locate(self, w: int) -> tuple[int, np.ndarray]:
        if not 0 <= w < self.n:
            raise IndexError(f"window {w} of {self.n}")
        i = int(np.searchsorted(self.offsets, w, side="right")) - 1
        return i, np.asarray(self.index[i][w - self.offsets[i]])

    def window(self, w: int) -> Alignment:
        """Window w: both sides' ids (each BOS first) and its chunks (chunk 0 the BOS pair, no text)."""
        i, (c0, c1, t0, t1, s0, s1) = self._locate(int(w))
        chunks = np.asarray(self.store.array(i, "chunks")[c0:c1], dtype=np.int64)
        if not 0 <= c0 < c1 or (t1 - t0, s1 - s0) != tuple(chunks[:, :2].sum(0)) or len(chunks) != c1 - c0:
            f = self.store.index_file(i, self.seq_len, self.teacher_seq_len)  # one flipped number is caught here
            raise HldError(f"the window index {f} is damaged (window {w})", f"delete {f} (it is cut again)")
        t_ids = np.concatenate(([self.bos[0]], self.store.array(i, "teacher")[t0:t1])).astype(np.int32)
        s_ids = np.concatenate(([self.bos[1]], self.store.array(i, "student")[s0:s1])).astype(np.int32)
        for side, ids in enumerate((t_ids, s_ids)):
            if len(ids) and int(ids.max()) >= self.vocab[side]:  # a damaged file or another tokenizer's ids
                raise HldError(
                    f"paired store {self.store.path} holds id {int(ids.max())}, outside the "
                    f"{('teacher', 'student')[side]} vocabulary ({self.vocab[side]})",
                    _fix(self.store.path),
                )

        # chunk 0: the BOS pair, no text; then the window's chunks
        tb = np.concatenate(([0, 1], 1 + np.cumsum(chunks[:, 0]))).astype(np.int32)
        sb = np.concatenate(([0, 1], 1 + np.cumsum(chunks[:, 1]))).astype(np.int32)
        cb = np.concatenate(([0, 0], np.cumsum(chunks[:, 2]))).astype(np.int32)
        return Alignment(t_ids, s_ids, tb, sb, cb)

    def sample(self, n: int) -> PairedSample:
        """The first n windows (all, if fewer), held whole."""
        return PairedSample(self.rows(np.arange(min(n, self.n))))

    def student_windows(self) -> list[np.ndarray]:
        """Every window's student ids without padding (BOS first), in index order."""
        return [self.window(w).student_ids for w in range(self.n)]

    def rows(self, idx) -> PairedRows:
        """Windows `idx` as padded rows on each side, with their alignments."""
        idx = np.atleast_1d(np.asarray(idx, dtype=np.int64))
        als = [self.window(int(w)) for w in idx]
        teacher = np.full((len(idx), self.teacher_seq_len), self.pad[0], dtype=np.int64)
        student = np.full((len(idx), self.seq_len), self.pad[1], dtype=np.int64)
        for b, al in enumerate(als):
            teacher[b, : len(al.teacher_ids)] = al.teacher_ids
            student[b, : len(al.student_ids)] = al.student_ids
        lengths = [np.array([len(getattr(al, f"{k}_ids")) for al in als], np.int64) for k in ("teacher", "student")]
        return PairedRows(teacher, student, lengths[0], lengths[1], als)


class PairedSample:
    """Paired windows held whole (validation's first n, `PairedWindows.sample`), as `hld.eval.perplexity`
    reads them: `len`, `shape` (n, seq_len), a slice (another sample), `batch(start, stop)` a `Batch` of
    windows start..stop-1 (`make_paired_batch`), and `chars` (n,): the characters of each window's text,
    which its predictions spell (every student token after BOS; a document's EOS spells none), for bits
    per character (`val/bpc`)."""

    def __init__(self, rows: PairedRows) -> None:
        self.rows = rows
        self.shape = rows.student_ids.shape
        self.chars = np.array([int(al.char_bounds[-1]) for al in rows.alignments], np.int64)

    def __len__(self) -> int:
        return int(self.shape[0])

    def __getitem__(self, sl: slice) -> PairedSample:
        r = self.rows
        return PairedSample(
            PairedRows(
                r.teacher_ids[sl], r.student_ids[sl], r.teacher_lengths[sl], r.student_lengths[sl], r.alignments[sl]
            )
        )

    def batch(self, start: int, stop: int) -> Batch:
        return make_paired_batch(self[start:stop].rows)

    def student_windows(self) -> list[np.ndarray]:
        """Each window's student ids without padding (BOS first)."""
        return [ids[:n] for ids, n in zip(self.rows.student_ids, self.rows.student_lengths)]

    def teacher_side(self) -> TeacherSide:
        """The same windows as the teacher reads them (its own rows; the text's characters alike)."""
        return TeacherSide(self)


class TeacherSide:
    """A `PairedSample` read by the teacher: `batch` gives the teacher's rows as `input_ids`, each predicting
    its next token up to its window's last; `chars` are the sample's (the same text)."""

    def __init__(self, sample: PairedSample) -> None:
        self.sample = sample
        self.shape = sample.rows.teacher_ids.shape
        self.chars = sample.chars

    def __len__(self) -> int:
        return len(self.sample)

    def __getitem__(self, sl: slice) -> TeacherSide:
        return TeacherSide(self.sample[sl])

    def batch(self, start: int, stop: int) -> Batch:
        r = self.sample[start:stop].rows
        swapped = PairedRows(r.student_ids, r.teacher_ids, r.student_lengths, r.teacher_lengths, r.alignments)
        b = make_paired_batch(swapped)
        return Batch(b.input_ids, b.labels)


# ---- opening -------------------------------------------------------------------------------------


def open_paired(
    spec: str,
    teacher,
    student,
    *,
    text_field: str = "text",
    store_dir: Optional[str] = None,
    need_tokens: Optional[int] = None,
    need_docs: Optional[int] = None,
    may_build: bool = True,
    quiet: bool = True,
    what: str = "data.train",
) -> PairedStore:
    """The paired store of `spec` for this tokenizer pair, holding at least what is needed (all of the
    source when nothing is named); built or extended on first use for a local source when `may_build`."""
    aligner_for(teacher, student)  # the tokenizers refused in one line before any store is looked for
    ident = identity(spec, teacher, student, text_field)
    out = store_path(ident, store_dir)
    return open_or_build(
        spec,
        out,
        opened=lambda: PairedStore(out, expect=ident),
        assembled=lambda: assemble(out, ident, len(source_units(spec)), need_tokens=need_tokens, need_docs=need_docs),
        build_it=lambda: build(
            spec,
            teacher,
            student,
            out,
            text_field=text_field,
            need_tokens=need_tokens,
            need_docs=need_docs,
            quiet=quiet,
        ),
        need_tokens=need_tokens,
        need_docs=need_docs,
        may_build=may_build,
        store_dir=store_dir,
        what=what,
        kind="paired store",
        remote_fix="run `hld tokenize --student-tokenizer ...` with this config first",
        missing_fix="run `hld tokenize --student-tokenizer`",
    )


def open_paired_windows(
    spec: str,
    teacher,
    student,
    *,
    seq_len: int,
    teacher_seq_len: Optional[int] = None,
    text_field: str = "text",
    store_dir: Optional[str] = None,
    max_docs: Optional[int] = None,
    need_windows: Optional[int] = None,
    may_build: bool = True,
    what: str = "data.train",
) -> PairedWindows:
    """The paired windows of `spec` (this module's protocol): all of the source, or its first `max_docs`
    kept documents; `need_windows`: only about that much is aligned (validation)."""
    need_tokens = need_windows * (seq_len - 1) if need_windows is not None and max_docs is None else None
    store = open_paired(
        spec,
        teacher,
        student,
        text_field=text_field,
        store_dir=store_dir,
        need_tokens=need_tokens,
        need_docs=max_docs,
        may_build=may_build,
        what=what,
    )
    if store.manifest["student_tokens"] == 0:
        raise HldError(f"{what}={spec} holds no document both tokenizers can spell", "point it at real text")

    def pad(tok) -> int:
        return int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)

    return PairedWindows(
        store,
        seq_len=seq_len,
        teacher_seq_len=teacher_seq_len,
        teacher_pad_id=pad(teacher),
        student_pad_id=pad(student),
        teacher_vocab_size=len(teacher),
        student_vocab_size=len(student),
        max_docs=max_docs,
    )
