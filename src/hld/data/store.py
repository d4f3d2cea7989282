"""Token store: a corpus tokenised once into flat uint32 shards, read lazily by global window index.

Layout (docs/data-format.md):

<store>/manifest.json     identity (protocol, tokenizer, source, text field, EOS id) + the committed
                          shards, in source order: name, unit, docs, tokens, sha256 (+ `complete`)
<store>/shards/NNNNN.bin  unit N's documents, each its tokens + EOS, as raw little-endian uint32
<store>/shards/NNNNN.json the shard's commit record (written after its .bin): what the manifest lists

One shard per source unit (a local file, or one of a `datasets` source's own shards), so units
tokenise in parallel and a killed build resumes unit by unit. The stream the shards hold, read in
order, is exactly `packing.tokenize_stream` over the source's documents; windows are cut from it by
`packing`'s protocol (`Windows`). Opening a store reads its manifest and stats its shards (sizes
only): O(shards), never O(tokens). A shard's sha256 is checked the first time a process reads it,
and the verdict is stamped beside it (`NNNNN.ok`, keyed by inode, size, mtime, ctime and checksum) so other
processes and ranks reuse it instead of re-reading the corpus (a write in place changes the ctime: hashed again).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import numpy as np

from hld import files
from hld.atomic import read_json_object, write_json
from hld.errors import HldError
from hld.fingerprint import file_sha256, file_state

FORMAT = "hld-token-store"
VERSION = 1
DTYPE = np.dtype("<u4")  # Gemma 3 has 262,144 ids: more than uint16 holds
MAX_OPEN = 64  # shard memmaps a process keeps open at once (least recently used closed first)


def _rebuild_fix(path: Path) -> str:
    return f"delete {path} and rerun (hld tokenize, or the command, rebuilds it)"


class TokenStore:
    """A committed store, read-only. `tokens` in total; `read(start, stop)` any range of the stream."""

    def __init__(self, path: Path, *, expect: Optional[dict] = None) -> None:
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        if expect is not None:
            check_identity(self.manifest, expect, self.path)
        shards = self.manifest["shards"]
        lengths = np.array([s["tokens"] for s in shards], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(lengths)])  # (n_shards + 1,) stream offsets
        for s in shards:  # sizes at open (a stat per shard); checksums at first read
            f = self.shard_file(s["name"])
            there = os.path.lexists(f)  # a device, FIFO, directory or dangling link: refused, never mapped
            size = files.regular_file(f, "token store shard", _rebuild_fix(self.path)).st_size if there else None
            if size != s["tokens"] * DTYPE.itemsize:
                got = "missing" if size is None else f"{size} bytes"
                raise HldError(
                    f"token store shard {f} is {got}, its manifest says {s['tokens'] * DTYPE.itemsize} bytes "
                    "(truncated or replaced)",
                    _rebuild_fix(self.path),
                )
        self._maps: OrderedDict[int, np.memmap] = OrderedDict()
        self._verified: set[int] = set()

    @property
    def tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def identity(self) -> str:
        """What names the stream: identity fields + each shard's checksum (not a hash of the tokens)."""
        m = self.manifest
        keys = {k: m[k] for k in IDENTITY_KEYS}
        keys["shards"] = [(s["name"], s["tokens"], s["sha256"]) for s in m["shards"]]
        return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:20]

    def shard_file(self, name: str) -> Path:
        return self.path / "shards" / f"{name}.bin"

    def _map(self, i: int) -> np.memmap:
        if i in self._maps:
            self._maps.move_to_end(i)
            return self._maps[i]
        s = self.manifest["shards"][i]
        if i not in self._verified:
            verify_shard(self.path, s)
            self._verified.add(i)
        if len(self._maps) >= MAX_OPEN:
            self._maps.popitem(last=False)  # its mmap closes when the array is collected
        m = np.memmap(self.shard_file(s["name"]), dtype=DTYPE, mode="r")
        self._maps[i] = m
        return m

    def read(self, start: int, stop: int) -> np.ndarray:
        """Stream tokens [start, stop) as int64 (may span shards)."""
        if not 0 <= start <= stop <= self.tokens:
            raise IndexError(f"token range [{start}, {stop}) outside the store's {self.tokens}")
        out = np.empty(stop - start, dtype=np.int64)
        i = int(np.searchsorted(self.offsets, start, side="right")) - 1
        pos = start
        while pos < stop:
            lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
            take = min(stop, hi) - pos
            if take > 0:
                out[pos - start : pos - start + take] = self._map(i)[pos - lo : pos - lo + take]
                pos += take
            i += 1
        return out

    def doc_end(self, n_docs: int, eos_id: int) -> int:
        """Stream offset just past the EOS of document `n_docs` (all tokens if the store has fewer)."""
        seen = 0
        for i, s in enumerate(self.manifest["shards"]):
            if seen + s["docs"] >= n_docs:
                ends = np.flatnonzero(np.asarray(self._map(i)) == eos_id)  # an EOS ends every document
                return int(self.offsets[i]) + int(ends[n_docs - seen - 1]) + 1
            seen += s["docs"]
        return self.tokens


IDENTITY_KEYS = ("format", "version", "protocol", "tokenizer", "source", "source_fingerprint", "text_field", "eos_id")


def read_manifest(path: Path) -> dict:
    return checked_manifest(
        path,
        kind="token store",
        format=FORMAT,
        version=VERSION,
        keys=(*IDENTITY_KEYS, "shards"),
        is_record=_is_record,
        fix=_rebuild_fix(path),
    )


def checked_manifest(
    path: Path, *, kind: str, format: str, version: int, keys: tuple, is_record: Callable[[Any], bool], fix: str
) -> dict:
    """A store's manifest.json (`kind`: "token store", "paired store"), or one line naming what is wrong with
    it: not this format, another version, a key missing, a shard entry that is not a unit's record."""
    m = read_json_object(path / "manifest.json", f"{kind} manifest", fix)
    if m.get("format") != format:
        raise HldError(f"{path / 'manifest.json'} is not an hld {kind} manifest", fix)
    if m.get("version") != version:
        raise HldError(f"{kind} {path} has format version {m.get('version')}, this hld reads {version}", fix)
    missing = [k for k in keys if k not in m]
    if missing:
        raise HldError(f"{kind} manifest {path / 'manifest.json'} lacks {', '.join(missing)}", fix)
    if not isinstance(m["shards"], list) or not all(is_record(s) for s in m["shards"]):
        raise HldError(f"{kind} manifest {path / 'manifest.json'} has malformed shard entries", fix)
    return m


def _is_record(s: Any) -> bool:
    return (
        isinstance(s, dict)
        and isinstance(s.get("name"), str)
        and isinstance(s.get("sha256"), str)
        and all(isinstance(s.get(k), int) and not isinstance(s.get(k), bool) and s[k] >= 0 for k in ("tokens", "docs"))
    )


def check_identity(manifest: dict, expect: dict, path: Path) -> None:
    for k, v in expect.items():
        if manifest.get(k) != v:
            raise HldError(
                f"token store {path} was built with {k}={manifest.get(k)!r}, this run needs {v!r}",
                _rebuild_fix(path),
            )


def _stamp(path: Path, s: dict) -> Path:
    return path / "shards" / f"{s['name']}.ok"


def _stamp_text(f: Path, s: dict) -> str:
    """What a verdict holds for: the file as the kernel knows it (`hld.fingerprint.file_state`) + its checksum."""
    return f"{file_state(f)} {s['sha256']}"


def verify_shard(path: Path, s: dict) -> None:
    """The shard's sha256 against its record, unless a stamp says it was checked since it last changed."""
    f = path / "shards" / f"{s['name']}.bin"
    stamp = _stamp(path, s)
    try:
        if files.read_text(stamp, "stamp", "", max_bytes=4096) == _stamp_text(f, s):
            return
    except (HldError, OSError, ValueError):  # no stamp, or a damaged one (not UTF-8): check the shard itself
        pass
    if file_sha256(f) != s["sha256"]:
        raise HldError(
            f"token store shard {f} does not match its checksum (damaged on disk or edited)", _rebuild_fix(path)
        )
    mark_verified(path, s)


def mark_verified(path: Path, s: dict) -> None:
    """Stamp shard `s` as matching its checksum as it is now (its writer hashed what it wrote)."""
    try:
        _stamp(path, s).write_text(_stamp_text(path / "shards" / f"{s['name']}.bin", s))
    except OSError:  # a read-only store: every process checks for itself
        pass


def verify_all(path: Path) -> int:
    """Check every shard's checksum now (`hld tokenize --verify`); returns the number checked."""
    m = read_manifest(path)
    for s in m["shards"]:
        _stamp(path, s).unlink(missing_ok=True)
        verify_shard(path, s)
    return len(m["shards"])


class Windows:
    """The packed windows of a token stream, cut lazily: window w = BOS + stream[w(L-1) : (w+1)(L-1)]
    (`packing.pack_windows`'s protocol; the last partial chunk dropped). Indexing gives int64 arrays."""

    def __init__(self, store: TokenStore, seq_len: int, *, bos_id: int, vocab_size: int, limit: Optional[int] = None):
        if seq_len < 2:
            raise HldError(
                f"data.seq_len={seq_len} leaves no prediction in a window (BOS + seq_len-1 tokens)",
                "use data.seq_len >= 2",
            )
        tokens = store.tokens if limit is None else min(limit, store.tokens)
        self.store, self.seq_len, self.bos_id, self.vocab_size = store, seq_len, bos_id, vocab_size
        self.n = tokens // (seq_len - 1)
        if self.n == 0:
            raise HldError(
                f"the corpus has {tokens} tokens, fewer than one window of data.seq_len={seq_len}",
                "add text or lower data.seq_len",
            )
        self.fingerprint = hashlib.sha256(f"{store.identity}|{seq_len}|{bos_id}|{self.n}".encode()).hexdigest()[:20]

    def __len__(self) -> int:
        return self.n

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.seq_len)

    def _rows(self, idx: np.ndarray) -> np.ndarray:
        c = self.seq_len - 1
        out = np.empty((len(idx), self.seq_len), dtype=np.int64)
        out[:, 0] = self.bos_id
        for r, w in enumerate(idx):
            out[r, 1:] = self.store.read(int(w) * c, (int(w) + 1) * c)
        self._check_ids(out)
        return out

    def _check_ids(self, out: np.ndarray) -> None:
        if out.size and int(out.max()) >= self.vocab_size:  # a damaged shard or another tokenizer's ids
            raise HldError(
                f"token store {self.store.path} holds id {int(out.max())}, outside the vocabulary ({self.vocab_size})",
                _rebuild_fix(self.store.path),
            )

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, step = key.indices(self.n)
            if step == 1 and stop > start:  # consecutive windows are one read of the stream
                c = self.seq_len - 1
                out = np.empty((stop - start, self.seq_len), dtype=np.int64)
                out[:, 0] = self.bos_id
                out[:, 1:] = self.store.read(start * c, stop * c).reshape(stop - start, c)
                self._check_ids(out)
                return out
            return self._rows(np.arange(start, stop, step))
        if isinstance(key, (int, np.integer)):
            if not -self.n <= key < self.n:
                raise IndexError(f"window {key} of {self.n}")
            return self._rows(np.array([key % self.n]))[0]
        idx = np.asarray(key, dtype=np.int64)
        if idx.size and (idx.min() < -self.n or idx.max() >= self.n):
            raise IndexError(f"window index outside 0..{self.n - 1}")
        return self._rows(idx % self.n)

    def __iter__(self):
        for start in range(0, self.n, 256):
            yield from self[start : start + 256]


WindowArray = np.ndarray | Windows  # what window readers take: an in-RAM (N, L) array or a store's view


def write_record(path: Path, record: dict) -> None:
    write_json(path / "shards" / f"{record['name']}.json", record)


def shard_record(path: Path, name: str) -> Optional[dict]:
    """The committed record of shard `name`, if its .bin is complete (size matches); else None."""
    f = path / "shards" / f"{name}.json"
    try:
        rec = json.loads(files.read_text(f, "shard record", "", max_bytes=files.MAX_CONFIG_BYTES))
    except (HldError, OSError, ValueError):
        return None
    if not _is_record(rec):
        return None
    try:
        if os.path.getsize(path / "shards" / f"{name}.bin") != rec["tokens"] * DTYPE.itemsize:
            return None
    except OSError:
        return None
    return rec
