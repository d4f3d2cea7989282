"""A teacher cache on disk, format 4 (docs/cache-format.md): a few large files per field, shards
committed one at a time, checksums checked lazily.

<cache>/manifest.json                 the build's plan (identity, codec, shapes, the windows held) +
                                      every shard's record + each part file's size
<cache>/windows.npy                   the sorted window ids held (absent when they are one range)
<cache>/parts/<part>.<field>.bin      one build part's shards of one field, back to back (raw bytes)
<cache>/parts/<part>.records.jsonl    that part's commit log: one record per committed shard
<cache>/verified.jsonl                stamps of the (shard, field) checksums already checked

A build part is one process's share of the shards (`--shard I/N`, a torchrun rank; the whole build
when alone): shard s belongs to part s % N. A part appends each shard's arrays to its field files,
fsyncs them, then appends the shard's record (offsets, shapes, sha256 per field) to its log: a
shard is committed when its record line is complete, and a killed build loses at most the shard in
flight (the bytes past the last record are cut off by the next writer of that part). Files per
cache: fields x parts + parts + 3, whatever the number of shards; a reader keeps at most MAX_OPEN
memory maps. Opening reads the manifest, checks every record against the shapes the plan implies
and stats the part files (sizes): O(shards), no data read. A field of a shard is checked against
its sha256 the first time a process reads it, before its values are used; the verdict is stamped in
verified.jsonl (with the file's inode, size, mtime and ctime: `hld.fingerprint.file_state`) so other processes
and later runs reuse it; a write in place changes the ctime, so a damaged file is hashed again.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Optional

import numpy as np

from hld import files
from hld.atomic import write_file, write_text
from hld.cache.codec import Codec, field_specs
from hld.errors import HldError
from hld.fingerprint import file_state

FORMAT = "hld-teacher-cache"
FORMAT_VERSION = 4  # 4: part files per field, per-shard records, lazy checksums (3: a .npy per shard and field)
MAX_OPEN = 64  # part-file memory maps a reader keeps open at once (least recently used closed first)
REBUILD = "rerun its `hld cache-teacher` (it verifies a cache before reusing it and rebuilds a damaged one)"


def part_name(index: int, count: int) -> str:
    return f"p{index:05d}of{count:05d}"


def n_shards(plan: dict) -> int:
    return -(-plan["n_windows"] // plan["shard_windows"])


def shard_rows(plan: dict, s: int) -> tuple[int, int]:
    """Rows [lo, hi) of the sorted window ids that shard s holds."""
    lo = s * plan["shard_windows"]
    return lo, min(lo + plan["shard_windows"], plan["n_windows"])


def windows_entry(ids: np.ndarray) -> dict:
    """How the plan names the windows held: one range, or the sorted ids in windows.npy (with a hash)."""
    ids = np.asarray(ids, dtype=np.int64)
    if len(ids) and ids[-1] - ids[0] + 1 == len(ids):
        return {"first": int(ids[0]), "count": int(len(ids))}
    return {"file": "windows.npy", "count": int(len(ids)), "sha256": hashlib.sha256(ids.tobytes()).hexdigest()}


def specs_of(plan: dict, slot_bits: Optional[int]) -> dict:
    if plan["codec"]["logits"] == "chunks":  # a per-chunk cache (hld.cache.chunks)
        from hld.cache.chunks import field_specs as chunk_fields

        return chunk_fields(plan["identity"], plan["identity"]["layers"], d_model=plan["d_model"])
    return field_specs(
        Codec(**plan["codec"]),
        plan["identity"]["layers"],
        T=plan["seq_len"],
        k=plan["identity"]["top_k"],
        d_model=plan["d_model"],
        slot_bits=slot_bits,
    )


# ------------------------------------------------------------------------------------ writing


def read_log(path: Path) -> tuple[list[dict], int]:
    """The complete records of a part's commit log and the byte length they take (a torn last line,
    from a process killed while appending it, is not a record)."""
    if not os.path.lexists(path):
        return [], 0
    data = files.read_bytes(path, "cache commit log", REBUILD, max_bytes=files.MAX_MANIFEST_BYTES)
    records, end = [], 0
    for line in data.split(b"\n")[:-1]:  # the piece after the last newline is torn (or empty)
        try:
            rec = json.loads(line)
        except ValueError:
            break
        if not isinstance(rec, dict):
            break
        records.append(rec)
        end += len(line) + 1
    return records, end


class PartWriter:
    """Appends shards to one part's field files. The caller holds the part's lock (one writer per part)."""

    def __init__(self, build_dir: Path, part: str) -> None:
        self.dir = Path(build_dir) / "parts"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.part = part
        self.log = self.dir / f"{part}.records.jsonl"
        self.records, log_end = read_log(self.log)
        if self.log.exists() and self.log.stat().st_size != log_end:
            os.truncate(self.log, log_end)  # drop a torn record
        self.ends: dict[str, int] = {}
        for rec in self.records:
            for key, f in rec["fields"].items():
                self.ends[key] = max(self.ends.get(key, 0), f["offset"] + f["nbytes"])
        self._files: dict[str, Any] = {}
        self._new: dict[str, dict] = {}
        self._hash: dict[str, Any] = {}

    def file(self, key: str) -> Path:
        return self.dir / f"{self.part}.{key}.bin"

    def _fh(self, key: str):
        if key not in self._files:
            fh = os.fdopen(os.open(self.file(key), os.O_RDWR | os.O_CREAT, 0o644), "r+b")
            fh.truncate(self.ends.get(key, 0))  # what a killed shard wrote past the last record
            fh.seek(self.ends.get(key, 0))
            self._files[key] = fh
        return self._files[key]

    def sink(self, key: str, rows: np.ndarray) -> None:
        """Append rows of field `key` to the shard being written."""
        rows = np.ascontiguousarray(rows)
        fh = self._fh(key)
        if key not in self._new:
            self._new[key] = {"offset": fh.tell(), "shape": [0, *rows.shape[1:]], "dtype": rows.dtype.str}
            self._hash[key] = hashlib.sha256()
        entry = self._new[key]
        if list(rows.shape[1:]) != entry["shape"][1:] or rows.dtype.str != entry["dtype"]:
            raise ValueError(f"field {key}: rows {rows.shape} {rows.dtype} after {entry}")
        entry["shape"][0] += rows.shape[0]
        buf = rows.reshape(-1).view(np.uint8).data
        fh.write(buf)
        self._hash[key].update(buf)

    def commit(self, record: dict) -> dict:
        """Make the shard written since the last commit durable, then record it (the commit point)."""
        fields = {}
        for key, entry in self._new.items():
            fh = self._files[key]
            fh.flush()
            os.fsync(fh.fileno())
            nbytes = fh.tell() - entry["offset"]
            fields[key] = {
                "offset": entry["offset"],
                "nbytes": nbytes,
                "shape": entry["shape"],
                "sha256": self._hash[key].hexdigest(),
            }
            self.ends[key] = entry["offset"] + nbytes
        record = record | {"part": self.part, "fields": fields}
        with open(self.log, "ab") as fh:
            fh.write((json.dumps(record, separators=(",", ":")) + "\n").encode())
            fh.flush()
            os.fsync(fh.fileno())
        self.records.append(record)
        self._new, self._hash = {}, {}
        return record

    def abandon(self) -> None:
        """Forget a shard begun but not committed (its bytes are cut off at the next write)."""
        self._new, self._hash = {}, {}

    def close(self) -> None:
        for fh in self._files.values():
            fh.close()
        self._files = {}


def committed(build_dir: Path) -> dict[int, dict]:
    """Every part's committed shard records, by shard index (the first record of a shard wins)."""
    out: dict[int, dict] = {}
    for log in sorted((Path(build_dir) / "parts").glob("*.records.jsonl")):
        for rec in read_log(log)[0]:
            if isinstance(rec.get("shard"), int):
                out.setdefault(rec["shard"], rec)
    return out


def assemble(build_dir: Path, plan: dict) -> dict:
    """The manifest of a build whose shards are all committed (no writer running): part files cut to
    their committed ends, their sizes recorded, written last (a directory with manifest.json is complete)."""
    build_dir = Path(build_dir)
    records = committed(build_dir)
    shards = [records[s] for s in range(n_shards(plan))]
    ends: dict[str, int] = {}
    for rec in shards:
        for key, f in rec["fields"].items():
            name = f"parts/{rec['part']}.{key}.bin"
            ends[name] = max(ends.get(name, 0), f["offset"] + f["nbytes"])
    for name, end in ends.items():
        os.truncate(build_dir / name, end)  # bytes of a shard some other part committed first
    manifest = plan | {
        "shards": shards,
        "files": ends,
        "build_seconds": sum(rec.get("seconds", 0.0) for rec in shards),
    }
    write_text(build_dir / "manifest.json", json.dumps(manifest, separators=(",", ":")))  # ~1.3 kB a shard
    return manifest


def write_windows(build_dir: Path, ids: np.ndarray) -> None:
    write_file(Path(build_dir) / "windows.npy", lambda fh: np.save(fh, np.asarray(ids, dtype=np.int64)))


# ------------------------------------------------------------------------------------ reading


def _bad(path: Path, what: str) -> HldError:
    return HldError(f"teacher cache {path} is damaged: {what}", REBUILD)


def check_records(path: Path, manifest: dict) -> None:
    """Every shard record against what the plan implies (row ranges, fields, dtypes, shapes, offsets
    inside the files' recorded sizes), and each part file's size on disk: no data read."""
    shards, sizes = manifest.get("shards"), manifest.get("files")
    if not isinstance(shards, list) or not isinstance(sizes, dict):
        raise _bad(path, "its manifest lacks `shards` or `files`")
    if len(shards) != n_shards(manifest):
        raise _bad(path, f"its manifest lists {len(shards)} shards, its windows need {n_shards(manifest)}")
    for name, size in sizes.items():
        f = path / name
        if not os.path.lexists(f):
            raise _bad(path, f"{name} is missing")
        got = files.regular_file(f, f"teacher cache {path}: part file", REBUILD).st_size  # never map a device
        if not isinstance(size, int) or got != size:
            raise _bad(path, f"{name} is {got} bytes, its manifest says {size} (truncated or replaced)")
    specs: dict = {}  # slot width -> field specs (one per distinct width, not per shard)
    for s, rec in enumerate(shards):
        _check_record(path, manifest, s, rec, specs)


def _check_record(path: Path, manifest: dict, s: int, rec: Any, cache: dict) -> None:
    where = f"shard {s}"
    if not isinstance(rec, dict) or rec.get("shard") != s or not isinstance(rec.get("fields"), dict):
        raise _bad(path, f"{where}'s record is malformed")
    lo, hi = shard_rows(manifest, s)
    if rec.get("rows") != [lo, hi]:
        raise _bad(path, f"{where} holds rows {rec.get('rows')}, the plan says {[lo, hi]}")
    slot_bits = rec.get("slot_bits")
    if manifest["codec"]["logits"] == "compact" and not (
        isinstance(slot_bits, int) and 1 <= slot_bits <= manifest["codec"]["index_bits"]
    ):
        raise _bad(path, f"{where} has slot width {slot_bits!r}")
    if slot_bits not in cache:
        cache[slot_bits] = specs_of(manifest, slot_bits)
    specs = cache[slot_bits]
    if rec["fields"].keys() != specs.keys():
        missing = sorted(set(specs) - set(rec["fields"]))
        raise _bad(path, f"{where} lacks {', '.join(missing) or 'nothing'} / has other fields")
    for key, (dtype, row) in specs.items():
        f = rec["fields"][key]
        if not isinstance(f, dict) or not all(isinstance(f.get(x), int) and f[x] >= 0 for x in ("offset", "nbytes")):
            raise _bad(path, f"{where}'s {key} entry is malformed")
        shape = f.get("shape")
        want = [hi - lo + 1] if row == () else [hi - lo, *row] if row is not None else None
        flat = want is None and isinstance(shape, list) and len(shape) == 1 and isinstance(shape[0], int)
        if not (shape == want or flat):
            raise _bad(path, f"{where}'s {key} has shape {shape}, the plan implies {want or '(n,)'}")
        if math.prod(shape) * dtype.itemsize != f["nbytes"]:
            raise _bad(path, f"{where}'s {key} takes {f['nbytes']} bytes for shape {shape}")
        size = manifest["files"].get(f"parts/{rec.get('part')}.{key}.bin")
        if size is None or f["offset"] + f["nbytes"] > size:
            raise _bad(path, f"{where}'s {key} lies outside its part file")
        if not isinstance(f.get("sha256"), str):
            raise _bad(path, f"{where}'s {key} has no checksum")


class Parts:
    """Read access to a cache's part files: views of one shard's field, each checked on first use."""

    def __init__(self, path: Path, manifest: dict, *, verify: bool) -> None:
        self.path, self.manifest, self.verify = Path(path), manifest, verify
        self._maps: OrderedDict[str, np.memmap] = OrderedDict()
        self._checked: set[tuple[int, str]] = set()
        self._stamps = self._read_stamps()
        self._dtypes = {key: dtype for key, (dtype, _) in specs_of(manifest, 1).items()}  # slot width aside
        self._lock = threading.Lock()  # the maps and the checks are shared by the prefetching threads

    def _map(self, name: str) -> np.memmap:
        if name in self._maps:
            self._maps.move_to_end(name)
            return self._maps[name]
        if len(self._maps) >= MAX_OPEN:
            self._maps.popitem(last=False)  # its mmap closes when the last view of it is collected
        m = np.memmap(self.path / name, dtype=np.uint8, mode="r")
        self._maps[name] = m
        return m

    def field(self, s: int, key: str) -> np.ndarray:
        """Shard s's array `key` (a read-only view of its part file), verified first if not yet."""
        rec = self.manifest["shards"][s]
        f = rec["fields"][key]
        name = f"parts/{rec['part']}.{key}.bin"
        with self._lock:
            raw = self._map(name)[f["offset"] : f["offset"] + f["nbytes"]]
            if self.verify and (s, key) not in self._checked:
                self._check(s, key, name, raw, f["sha256"])
        return raw.view(self._dtypes[key]).reshape(f["shape"])

    def arrays(self, s: int, keys) -> dict[str, np.ndarray]:
        return {key: self.field(s, key) for key in keys}

    # ---------------------------------------------------------------- checksums and their stamps

    def _stamp(self, s: int, key: str, name: str, digest: str) -> str:
        return f"{s} {key} {digest} {file_state(self.path / name)}"

    def _read_stamps(self) -> set[str]:
        try:
            f = self.path / "verified.jsonl"
            return set(files.read_text(f, "stamps", "", max_bytes=files.MAX_MANIFEST_BYTES).splitlines())
        except (HldError, OSError, UnicodeDecodeError):
            return set()

    def _check(self, s: int, key: str, name: str, raw: np.ndarray, digest: str) -> None:
        stamp = self._stamp(s, key, name, digest)
        if stamp not in self._stamps:
            if hashlib.sha256(raw.data).hexdigest() != digest:
                raise HldError(
                    f"cache shard {s} ({key}, in {self.path / name}) is corrupt (checksum mismatch)", REBUILD
                )
            self._stamps.add(stamp)
            try:
                with open(self.path / "verified.jsonl", "a") as fh:  # one short append: lines stay whole
                    fh.write(stamp + "\n")
            except OSError:  # a read-only cache: every process checks for itself
                pass
        self._checked.add((s, key))

    def verify_all(self, keys=None, *, force: bool = False) -> int:
        """Check every shard's fields now (`keys`: those only); `force` ignores the stamps. Returns the
        number of (shard, field) checksums that held."""
        if force:
            self._stamps = set()
        n = 0
        for s, rec in enumerate(self.manifest["shards"]):
            for key in rec["fields"] if keys is None else keys:
                self._checked.discard((s, key))
                self.field(s, key)
                n += 1
        return n


def open_windows(path: Path, manifest: dict) -> tuple[Optional[int], Optional[np.ndarray]]:
    """(first, None) when the windows held are one range, else (None, the sorted ids) memory-mapped;
    the ids file is checked against its size and its hash."""
    w = manifest.get("windows")
    if not isinstance(w, dict) or not isinstance(w.get("count"), int) or w["count"] != manifest.get("n_windows"):
        raise _bad(path, "its manifest's `windows` entry is malformed")
    if "first" in w:
        if not isinstance(w["first"], int) or w["first"] < 0:
            raise _bad(path, "its manifest's `windows` entry is malformed")
        return w["first"], None
    try:
        files.regular_file(path / "windows.npy", f"teacher cache {path}: windows.npy", REBUILD)
        ids = np.load(path / "windows.npy", mmap_mode="r")
    except (OSError, ValueError, EOFError) as exc:
        raise _bad(path, f"windows.npy is missing or unreadable ({exc})") from exc
    if ids.dtype != np.int64 or ids.shape != (w["count"],):
        raise _bad(path, f"windows.npy holds {ids.shape} {ids.dtype}, its manifest says ({w['count']},) int64")
    if hashlib.sha256(np.ascontiguousarray(ids).data).hexdigest() != w.get("sha256"):
        raise HldError(f"teacher cache {path}: windows.npy is corrupt (checksum mismatch)", REBUILD)
    return None, ids
