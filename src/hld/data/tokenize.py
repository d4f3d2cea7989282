"""Build a token store (`hld.data.store`): tokenise a source once, unit by unit, in parallel.

Each unit (a source file, or one of a `datasets` source's shards) becomes one shard: its tokens are
streamed into a temporary file while they are hashed, the file is renamed into place, then its
commit record is written. A unit is claimed with a non-blocking lock, so several processes (the
workers of one `hld tokenize`, the tasks of a SLURM array, two users) share a store without doing a
unit twice; a unit whose record exists is skipped, so a killed build resumes where it stopped.
The manifest is (re)assembled from the records in source order by whoever commits the unit that
completes what was asked for, or by the first reader that finds the records without one.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import BinaryIO, Optional

from hld.atomic import write_file, write_fix, write_json
from hld.data import store as st
from hld.data import token_files
from hld.data.packing import PROTOCOL, encode_batches
from hld.data.sources import fingerprint, is_local_dataset, iter_unit, source_units
from hld.errors import HldError
from hld.fingerprint import tokenizer_fingerprint
from hld.locks import file_lock
from hld.paths import cache_root
from hld.progress import Progress

# `hld tokenize`'s steady rate per worker (reading C4 json.gz, the Gemma 3 fast tokenizer, writing
# shards) on one core of the 2-core AMD EPYC dev machine: 0.52M tokens/s (docs/performance.md, section 8)
TOKENS_PER_CORE_S = 0.52e6


def identity(spec: str, tokenizer, text_field: str) -> dict:
    """The fields a store of `spec` must match (everything but its shards)."""
    return {
        "format": st.FORMAT,
        "version": st.VERSION,
        "protocol": PROTOCOL,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "source": spec,
        "source_fingerprint": fingerprint(spec),
        "text_field": text_field,
        "eos_id": int(tokenizer.eos_token_id),
    }


def store_root(store_dir: Optional[str] = None) -> Path:
    """Where stores live: `data.store_dir`, else $HLD_CACHE_DIR/stores."""
    return Path(store_dir).expanduser() if store_dir else cache_root() / "stores"


def store_path(ident: dict, store_dir: Optional[str] = None) -> Path:
    key = hashlib.sha256(repr(sorted(ident.items())).encode()).hexdigest()[:20]
    return store_root(store_dir) / f"{PROTOCOL}-{key}"  # the protocol in the name: another's is never read


def is_remote(spec: str) -> bool:
    """A source read over the network (`hf:` on the hub): never tokenised automatically."""
    return spec.startswith("hf:") and not is_local_dataset(spec)


# ---- tokenising one unit -------------------------------------------------------------------------


def tokenize_unit(
    spec: str, index: int, out: Path, tokenizer, *, text_field: str, unit: str, wait: bool = False
) -> Optional[dict]:
    """Tokenise unit `index` into `out/shards/NNNNN.bin` and commit its record; None if another process
    holds the unit (it is working on it). `wait`: wait for that process instead, then take its record
    (or do the unit, if it died first)."""
    name = f"{index:05d}"
    shards = out / "shards"
    with file_lock(shards / f"{name}.lock", wait=wait) as mine:
        if not mine:
            return None
        done = st.shard_record(out, name)
        if done is not None:
            return done
        for stale in shards.glob(f".{name}.bin.*.tmp"):  # a killed build's part (we hold the unit's lock)
            stale.unlink(missing_ok=True)
        counts = {"docs": 0, "repaired": 0, "tokens": 0}
        sha = hashlib.sha256()

        def fill(fh: BinaryIO) -> None:
            eos = int(tokenizer.eos_token_id)
            if token_files.is_token_file(spec):  # ids from another tool: copied, checked against the tokenizer
                blocks = token_files.iter_unit(spec, index, eos_id=eos, vocab_size=len(tokenizer), counts=counts)
            else:
                blocks = encode_batches(iter_unit(spec, index, text_field), tokenizer, eos_id=eos, counts=counts)
            for arr in blocks:
                data = arr.tobytes()
                sha.update(data)
                fh.write(data)
                counts["tokens"] += len(arr)

        write_file(shards / f"{name}.bin", fill)
        record = {"name": name, "unit": unit, "sha256": sha.hexdigest(), **counts}
        st.mark_verified(out, record)  # hashed as it was written: the first reader need not re-read it
        st.write_record(out, record)
        return record


_WORKER: dict = {}


def _worker_init(tokenizer) -> None:
    _WORKER["tokenizer"] = tokenizer


def _worker_unit(spec: str, index: int, out: str, text_field: str, unit: str) -> tuple[int, Optional[dict]]:
    return index, tokenize_unit(spec, index, Path(out), _WORKER["tokenizer"], text_field=text_field, unit=unit)


# ---- the store -----------------------------------------------------------------------------------


def committed_prefix(out: Path, n_units: int, record=st.shard_record) -> list[dict]:
    """The committed records of units 0, 1, ... up to the first missing one (`record(out, name)`: a unit's
    record if its files are complete, else None; a paired store passes its own)."""
    records = []
    for i in range(n_units):
        rec = record(out, f"{i:05d}")
        if rec is None:
            break
        records.append(rec)
    return records


def enough_units(records: list[dict], n_units: int, need_tokens: Optional[int], need_docs: Optional[int]) -> bool:
    """Do the committed units' records cover what the caller needs (every unit, or the tokens / documents
    asked for)?"""
    if len(records) == n_units:
        return True
    if need_tokens is None and need_docs is None:
        return False
    tokens, docs = sum(r["tokens"] for r in records), sum(r["docs"] for r in records)
    return (need_tokens is None or tokens >= need_tokens) and (need_docs is None or docs >= need_docs)


def assemble(out: Path, ident: dict, units: list[str], *, need_tokens=None, need_docs=None) -> Optional[dict]:
    """Write the manifest from the committed prefix if it holds what was asked for (all units when
    nothing is); returns it, or None when units are still missing."""
    with file_lock(out / ".manifest.lock"):
        records = committed_prefix(out, len(units))
        if not enough_units(records, len(units), need_tokens, need_docs):
            return None
        manifest = {
            **ident,
            "units": len(units),
            "complete": len(records) == len(units),
            "tokens": sum(r["tokens"] for r in records),
            "docs": sum(r["docs"] for r in records),
            "shards": records,
        }
        write_json(out / "manifest.json", manifest)
        return manifest


def check_out(out: Path, ident: dict) -> None:
    """`out` is empty, or a store of this very source and tokenizer (its identity.json)."""
    try:
        (out / "shards").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise HldError(f"cannot create the token store {out}: {exc.strerror or exc}", write_fix(exc)) from exc
    f = out / "identity.json"
    # Ranks (or array tasks) starting on one store race here: under the lock one writes the identity and
    # the others read it. Dot-names are ours (this lock, atomic temporaries, the manifest lock).
    with file_lock(out / ".identity.lock"):
        if not f.exists():
            if any(p.name != "shards" and not p.name.startswith(".") for p in out.iterdir()):
                raise HldError(f"{out} is not empty and is not an hld token store", "pick an empty or new --out")
            write_json(f, ident)
            return
    from hld.atomic import read_json_object

    have = read_json_object(f, "token store identity", f"delete {out} and rerun")
    diff = [k for k in ident if have.get(k) != ident[k]]
    if diff:
        raise HldError(
            f"{out} holds a token store of another {', '.join(diff)} (source {have.get('source')!r})",
            f"pick another --out, or delete {out}",
        )


def build(
    spec: str,
    tokenizer,
    out: Path,
    *,
    text_field: str = "text",
    workers: int = 1,
    shard: tuple[int, int] = (0, 1),
    need_tokens: Optional[int] = None,
    need_docs: Optional[int] = None,
    quiet: bool = False,
    desc: str = "tokenize",
) -> Optional[dict]:
    """Tokenise the units of `spec` this process takes (`shard` = (I, N): units u with u % N == I) into
    the store `out`, stopping once the committed prefix holds `need_tokens` / `need_docs` (all units when
    neither is given). Returns the manifest, or None when other tasks still have units to commit."""
    ident = identity(spec, tokenizer, text_field)
    out = Path(out)
    check_out(out, ident)
    units = source_units(spec)
    mine = [u for u in range(len(units)) if u % shard[1] == shard[0]]
    records = {u: r for u in mine if (r := st.shard_record(out, f"{u:05d}")) is not None}
    for u, rec in list(records.items()):  # committed units: checked (a stamp makes it a stat), redone if damaged
        try:
            st.verify_shard(out, rec)
        except HldError:
            if not quiet:
                print(f"[{desc}] unit {u} ({units[u]}): its shard does not match its checksum; tokenising it again")
            (out / "shards" / f"{u:05d}.json").unlink(missing_ok=True)
            del records[u]
    todo = [u for u in mine if u not in records]
    prog = Progress(len(mine), desc=desc, quiet=quiet, initial=len(records), unit="unit")
    t0, tokens, repaired = time.time(), 0, 0

    def done(u: int, rec: Optional[dict]) -> None:
        nonlocal tokens, repaired
        if rec is not None:
            records[u] = rec
            tokens += rec["tokens"]
            repaired += rec.get("repaired", 0)
        prog.update(len(records), tokens_per_s=tokens / max(time.time() - t0, 1e-9))

    def satisfied() -> bool:
        prefix = []
        for u in range(len(units)):
            if u not in records and st.shard_record(out, f"{u:05d}") is None:
                break
            prefix.append(records.get(u) or st.shard_record(out, f"{u:05d}"))
        return enough_units(prefix, len(units), need_tokens, need_docs)

    bounded = need_tokens is not None or need_docs is not None
    try:
        if workers <= 1 or len(todo) <= 1:
            for u in todo:
                if bounded and satisfied():
                    break
                done(u, tokenize_unit(spec, u, out, tokenizer, text_field=text_field, unit=units[u]))
        else:
            _parallel(spec, tokenizer, out, todo, units, text_field, workers, done, satisfied)
        for u in todo:  # units another process held (two runs starting on one corpus): wait for its commit
            if u not in records and not (bounded and satisfied()):
                done(u, tokenize_unit(spec, u, out, tokenizer, text_field=text_field, unit=units[u], wait=True))
    finally:
        prog.close()
    if repaired and not quiet:
        print(f"[{desc}] {repaired} document(s) with text UTF-8 cannot hold were repaired (U+FFFD)", flush=True)
    return assemble(out, ident, units, need_tokens=need_tokens, need_docs=need_docs)


def _parallel(spec, tokenizer, out, todo, units, text_field, workers, done, satisfied) -> None:
    """Units on `workers` processes, in source order, each worker's tokenizer on one thread."""
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # N workers on N cores: no thread pool per worker
    ctx = multiprocessing.get_context("spawn")  # a fork after the tokenizer ran would disable its threads anyway
    try:
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init, initargs=(tokenizer,)) as pool:
            pending: set[Future] = set()
            queue = list(todo)
            while queue or pending:
                while queue and len(pending) < workers and not satisfied():
                    pending.add(pool.submit(_worker_unit, spec, (u := queue.pop(0)), str(out), text_field, units[u]))
                if not pending:
                    break
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in finished:
                    done(*f.result())
    finally:
        if old is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old


def open_store(
    spec: str,
    tokenizer,
    *,
    text_field: str = "text",
    store_dir: Optional[str] = None,
    need_tokens: Optional[int] = None,
    need_docs: Optional[int] = None,
    may_build: bool = True,
    quiet: bool = True,
    what: str = "data.train",
) -> st.TokenStore:
    """The store of `spec` holding at least what is needed (all of the source when nothing is named),
    built or extended on first use for a local source when `may_build`."""
    ident = identity(spec, tokenizer, text_field)
    out = store_path(ident, store_dir)
    return open_or_build(
        spec,
        out,
        opened=lambda: st.TokenStore(out, expect=ident),
        assembled=lambda: assemble(out, ident, source_units(spec), need_tokens=need_tokens, need_docs=need_docs),
        build_it=lambda: build(
            spec, tokenizer, out, text_field=text_field, need_tokens=need_tokens, need_docs=need_docs, quiet=quiet
        ),
        need_tokens=need_tokens,
        need_docs=need_docs,
        may_build=may_build,
        store_dir=store_dir,
        what=what,
        kind="token store",
        remote_fix="run `hld tokenize` with this config first (`hld plan` estimates how long it takes)",
        missing_fix="run `hld tokenize` first",
    )


def open_or_build(
    spec: str,
    out: Path,
    *,
    opened,
    assembled,
    build_it,
    need_tokens: Optional[int],
    need_docs: Optional[int],
    may_build: bool,
    store_dir: Optional[str],
    what: str,
    kind: str,
    remote_fix: str,
    missing_fix: str,
):
    """The store at `out` (`opened()`) if it holds what is needed; else the one its committed units make
    (`assembled()`: units committed by others, a SLURM array, no manifest yet), else built or extended
    (`build_it()`) for a local source when `may_build`. A token store and a paired store (`kind`) alike."""
    if (out / "manifest.json").exists():
        store = opened()
        m = store.manifest
        if m["complete"] or enough_units(m["shards"], m["units"], need_tokens, need_docs):
            return store
        if is_remote(spec) and need_tokens is None and need_docs is None:
            return store  # a hub corpus tokenised for a budget (`hld tokenize`): runs read the prefix it holds
    elif (out / "identity.json").exists():
        if assembled() is not None:
            return opened()
    if is_remote(spec):
        raise HldError(
            f"{what}={spec} has no {kind} (in {store_root(store_dir)}), and a hub corpus is never "
            "tokenised at start-up",
            remote_fix,
        )
    if not may_build:
        raise HldError(f"{what}={spec}: the {kind} {out} is missing or incomplete", missing_fix)
    build_it()
    return opened()


def stores_of(spec: str, store_dir: Optional[str] = None) -> list[Path]:
    """The stores under the store root built from `spec` (by any tokenizer): their identity.json says."""
    found = []
    for f in sorted(store_root(store_dir).glob(f"{PROTOCOL}-*/identity.json")):
        try:
            if json.loads(f.read_text()).get("source") == spec:
                found.append(f.parent)
        except (OSError, ValueError):
            continue  # a damaged store is named when it is opened, not here
    return found


def require_stores(data, config: str = "FILE") -> None:
    """Refuse, before any model or tokenizer is loaded, a run reading a hub corpus that has no token
    store: a hub corpus is tokenised by `hld tokenize`, never streamed into memory at start-up."""
    for what, spec in (("data.train", data.train), ("data.validation", data.validation)):
        if is_remote(spec) and not stores_of(spec, data.store_dir):
            raise HldError(
                f"{what}={spec} has no token store in {store_root(data.store_dir)}, and a hub corpus is never "
                "tokenised at start-up",
                f"run `hld tokenize --config {config}` (same overrides) first; `hld plan` estimates how long it takes",
            )


def open_windows(
    spec: str,
    tokenizer,
    *,
    seq_len: int,
    text_field: str = "text",
    store_dir: Optional[str] = None,
    max_docs: Optional[int] = None,
    need_windows: Optional[int] = None,
    may_build: bool = True,
    what: str = "data.train",
) -> st.Windows:
    """The packed windows of `spec` (`packing`'s protocol), read lazily from its token store: all of the
    source, or its first `max_docs` documents; `need_windows`: only that many are read (validation),
    so only that much of the source need be tokenised."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is None or eos is None:
        raise HldError("the tokenizer has no BOS or EOS token", "use a tokenizer that defines both")
    need_tokens = need_windows * (seq_len - 1) if need_windows is not None and max_docs is None else None
    store = open_store(
        spec,
        tokenizer,
        text_field=text_field,
        store_dir=store_dir,
        need_tokens=need_tokens,
        need_docs=max_docs,
        may_build=may_build,
        what=what,
    )
    if store.tokens == 0:
        raise HldError(f"{what}={spec} holds no document with text", "point data.train/validation at real text")
    limit = store.doc_end(max_docs, int(eos)) if max_docs is not None else None
    return st.Windows(store, seq_len, bos_id=int(bos), vocab_size=len(tokenizer), limit=limit)
