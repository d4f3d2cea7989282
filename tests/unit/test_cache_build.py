"""The teacher cache's build: committed shard by shard, resumed after a kill with the same bytes as
an uninterrupted build, split into parts (--shard I/N, torchrun ranks) with the same result, shared
by concurrent builders, a file count that does not grow with the shards; damaged caches refused in
one line before anything reads them."""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import cache_arrays
from hld.cache import writer as cache_writer
from hld.cache.build import ensure_cache, verify_cache
from hld.cache.codec import Codec
from hld.cache.meta import build_dir_of, cache_identity
from hld.cache.reader import CachedTeacher
from hld.cache.writer import build_cache
from hld.config import load_config
from hld.distill.signals import Needs
from hld.distill.signals.online import OnlineTeacher
from hld.errors import HldError
from hld.train.resources import Resources

LAYERS = [1, 3]


@pytest.fixture(scope="module")
def setup(tiny_teacher):
    """The tiny teacher, its training windows (first 20) and the identity a cache of them has."""
    cfg, loaded, windows = tiny_teacher
    ids = np.arange(0, 40, 2)[:20]  # not one range: the sorted ids go to windows.npy
    ident = cache_identity(
        teacher=loaded.identity,
        tokenizer=loaded.tokenizer,
        seq_len=cfg.data.seq_len,
        train_windows=windows,
        layers=LAYERS,
        top_k=16,
    )
    return loaded.model, windows, ids, ident


COMPACT = Codec(logits="compact", hidden="fp8")


def _build(setup, out, *, codec=COMPACT, part=(0, 1), shard_windows=3):
    lm, windows, ids, ident = setup
    return build_cache(
        lm, windows, ids, out, identity=ident, codec=codec, part=part, shard_windows=shard_windows, quiet=True
    )


def _files(d: Path) -> dict[str, bytes]:
    """Every data file's bytes (the manifest and the record logs: compared without their timings)."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.suffix in (".bin", ".npy")}


def _arrays(d: Path) -> dict:
    return cache_arrays(d)


def _without_timing(m: dict) -> dict:
    m = {k: v for k, v in m.items() if k not in ("build_seconds", "bytes")}
    m["shards"] = [{k: v for k, v in r.items() if k != "seconds"} for r in m["shards"]]
    return m


def test_a_killed_build_keeps_its_shards_and_the_rerun_equals_an_uninterrupted_build(tmp_path, setup, monkeypatch):
    whole = _build(setup, tmp_path / "whole")
    assert whole is not None and len(whole["shards"]) == 7  # 20 windows in shards of 3
    calls = {"n": 0}
    finish = cache_writer.ShardWriter.finish

    def dies_at_the_fourth_shard(self):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt  # what SIGTERM (sigterm_as_error) or a crash raises mid-shard
        return finish(self)

    monkeypatch.setattr(cache_writer.ShardWriter, "finish", dies_at_the_fourth_shard)
    with pytest.raises(KeyboardInterrupt):
        _build(setup, tmp_path / "cut")
    monkeypatch.setattr(cache_writer.ShardWriter, "finish", finish)
    d = build_dir_of(tmp_path / "cut")
    assert not (tmp_path / "cut").exists()  # nothing named like the cache until it is complete
    log = d / "parts" / "p00000of00001.records.jsonl"
    assert [json.loads(line)["shard"] for line in log.read_text().splitlines()] == [0, 1, 2]
    # what SIGKILL leaves on top: the fourth shard's bytes half written and a torn record line
    with open(d / "parts" / "p00000of00001.hidden_L1.bin", "ab") as fh:
        fh.write(b"\x01" * 1000)
    with open(log, "ab") as fh:
        fh.write(b'{"shard": 3, "rows": [9, 12], "fie')
    kept = {k: v for k, v in _files(d).items() if k.endswith("topk_values.bin")}
    built = []
    run = OnlineTeacher.signals

    def counting(self, x, needs):
        built.append(x.shape[0])
        return run(self, x, needs)

    monkeypatch.setattr(OnlineTeacher, "signals", counting)
    again = _build(setup, tmp_path / "cut")
    assert sum(built) == 20 - 9  # only the 11 windows of shards 3..6 ran through the teacher again
    assert _without_timing(again) == _without_timing(whole)
    assert _files(tmp_path / "cut") == _files(tmp_path / "whole")  # byte for byte, every file
    assert all(_files(tmp_path / "cut")[k].startswith(v) for k, v in kept.items())  # the kept prefix
    assert not d.exists()


@pytest.mark.parametrize("n", [2, 3])
def test_parts_built_apart_equal_one_build(tmp_path, setup, n):
    whole = _build(setup, tmp_path / "whole")
    results = [_build(setup, tmp_path / "parts", part=(i, n)) for i in range(n - 1)]
    lm, windows, ids, ident = setup
    done = sum(1 for s in range(7) if s % n != n - 1)
    with pytest.raises(HldError, match=f"is not finished: {done} of 7 shards are built"):
        CachedTeacher(tmp_path / "parts", expect=ident)
    results.append(_build(setup, tmp_path / "parts", part=(n - 1, n)))
    assert all(r is None for r in results[:-1]) and results[-1] is not None  # the last part assembles
    assert _without_timing(results[-1])["shards"] != whole["shards"]  # parts name their own files...
    assert _arrays(tmp_path / "parts") == _arrays(tmp_path / "whole")  # ...the same bytes in them
    m = json.loads((tmp_path / "parts" / "manifest.json").read_text())
    assert sorted({r["part"] for r in m["shards"]}) == [f"p{i:05d}of{n:05d}" for i in range(n)]
    assert all(r["part"] == f"p{r['shard'] % n:05d}of{n:05d}" for r in m["shards"])
    a = CachedTeacher(tmp_path / "parts", expect=ident).read(ids[::-1], 32, Needs(logits=True, layers=(1, 3)))
    b = CachedTeacher(tmp_path / "whole", expect=ident).read(ids[::-1], 32, Needs(logits=True, layers=(1, 3)))
    for key in ("values", "indices", "rest"):
        assert torch.equal(getattr(a.source, key), getattr(b.source, key))
    assert all(torch.equal(a.hidden[k], b.hidden[k]) for k in (1, 3))


def test_two_concurrent_builds_on_one_out_share_the_work(tmp_path, setup):
    """Two builders of one cache at once (two `hld cache-teacher`, two threads here: flock locks open
    files, so they exclude each other as processes do): one builds, the other waits, both get the cache."""
    whole = _build(setup, tmp_path / "whole")
    got: list = [None, None]
    errors: list = []

    def one(i):
        try:
            got[i] = _build(setup, tmp_path / "c")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert all(g is not None and _without_timing(g) == _without_timing(whole) for g in got)
    assert _files(tmp_path / "c") == _files(tmp_path / "whole")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".c.lock", ".whole.lock", "c", "whole"]


def test_a_build_of_another_plan_waits_for_no_one_but_never_wipes_a_running_one(tmp_path, setup, monkeypatch):
    lm, windows, ids, ident = setup
    d = build_dir_of(tmp_path / "c")
    with cache_writer._Builders(
        tmp_path / "c", {"another": "plan", "windows": {"first": 0}}, ids
    ):  # a live builder of another cache
        with pytest.raises(HldError, match="another hld is building a different cache"):
            _build(setup, tmp_path / "c")
        assert json.loads((d / "plan.json").read_text()) == {"another": "plan", "windows": {"first": 0}}  # untouched
    assert _build(setup, tmp_path / "c") is not None  # the other builder gone: its debris is replaced


@pytest.mark.parametrize("codec", [Codec(), Codec(logits="compact", hidden="fp8")])
def test_file_count_does_not_grow_with_the_shards(tmp_path, setup, codec):
    few = _build(setup, tmp_path / "few", codec=codec, shard_windows=10)  # 2 shards
    many = _build(setup, tmp_path / "many", codec=codec, shard_windows=1)  # 20 shards
    assert len(few["shards"]) == 2 and len(many["shards"]) == 20
    count = lambda d: sum(1 for p in d.rglob("*") if p.is_file())  # noqa: E731
    assert count(tmp_path / "few") == count(tmp_path / "many") == len(few["files"]) + 3  # + manifest, windows, log
    lm, windows, ids, ident = setup
    t = CachedTeacher(tmp_path / "many", expect=ident)
    t.read(ids, 32, Needs(logits=True, layers=(1, 3)))
    assert len(t.parts._maps) == len(many["files"])  # one map per part file, not per shard


def test_reads_equal_the_teacher_row_by_row(tmp_path, setup):
    """The batched reader against the teacher itself (exact codec): top-k values, ids, hidden states."""
    lm, windows, ids, ident = setup
    _build(setup, tmp_path / "c", codec=Codec())
    t = CachedTeacher(tmp_path / "c", expect=ident)
    pick = ids[[5, 0, 17, 9]]  # across shards, out of order
    sig = t.read(pick, 32, Needs(logits=True, layers=(1, 3)))
    x = torch.from_numpy(np.asarray(windows[pick])).long()
    with torch.no_grad():
        out = lm(input_ids=x, output_hidden_states=True)
    top = out.logits.topk(16, dim=-1)
    torch.testing.assert_close(sig.source.values.float(), top.values.reshape(-1, 16), rtol=1e-3, atol=1e-2)
    np.testing.assert_array_equal(sig.source.indices.numpy(), top.indices.reshape(-1, 16).numpy())
    # layer 1 = block 1's output = HF's hidden_states[1] (its last entry has the final norm applied)
    torch.testing.assert_close(sig.hidden[1].float(), out.hidden_states[1].float(), rtol=1e-2, atol=1e-2)
    assert np.array_equal(sig.tokens, np.asarray(windows[pick]))
    with pytest.raises(HldError, match="window 1 is not in cache"):
        t.read(np.array([1]), 32, Needs(logits=True))


# ------------------------------------------------------------------------------------ damage


def _manifest(d: Path) -> dict:
    return json.loads((d / "manifest.json").read_text())


def _edit(d: Path, change) -> None:
    m = _manifest(d)
    change(m)
    (d / "manifest.json").write_text(json.dumps(m))


DAMAGE = {
    "no shards": (lambda m: m.pop("shards"), "lacks `shards`"),
    "shards as strings": (lambda m: m.update(shards=["a"] * len(m["shards"])), "shard 0's record is malformed"),
    "too few shards": (lambda m: m["shards"].pop(), "lists 6 shards"),
    "edited top_k": (lambda m: m["identity"].update(top_k=32), "has shape"),
    "top_k above the vocabulary": (lambda m: m["identity"].update(top_k=10**6), "disagrees with itself"),
    "edited seq_len": (lambda m: m.update(seq_len=16), "disagrees with itself"),
    "a codec field": (lambda m: m["codec"].update(value_bits=99), "codec this hld does not know"),
    "index_bits": (lambda m: m["codec"].update(index_bits=4), "codec this hld does not know"),
    "a layer without its arrays": (lambda m: m["identity"].update(layers=[1, 2, 3]), "lacks hidden_L2"),
    "offset past the file": (
        lambda m: m["shards"][6]["fields"]["tokens"].update(offset=10**9),
        "outside its part file",
    ),
    "a file's size": (lambda m: m["files"].update({k: 1 for k in m["files"]}), "its manifest says 1"),
    "no windows": (lambda m: m.pop("windows"), "`windows` entry is malformed"),
    "format 3": (lambda m: m.update(format_version=3), "built by another hld"),
    "not JSON": (None, "unreadable or not valid JSON"),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damaged_manifests_are_refused_in_one_line(tmp_path, setup, case):
    lm, windows, ids, ident = setup
    _build(setup, tmp_path / "c")
    change, problem = DAMAGE[case]
    if change is None:
        (tmp_path / "c" / "manifest.json").write_text('{"format_version": 4, "sha')
    else:
        _edit(tmp_path / "c", change)
    with pytest.raises(HldError, match=problem) as exc:
        CachedTeacher(tmp_path / "c", expect=ident)
    assert "\n" not in str(exc.value) and exc.value.fix


def test_damaged_arrays_are_refused_before_their_first_use(tmp_path, setup):
    """Flips anywhere in a part file: the shard's checksum, checked before its values are used (an
    in-range index flip included); a missing part file or windows index at open."""
    lm, windows, ids, ident = setup
    _build(setup, tmp_path / "c", codec=Codec())
    m = _manifest(tmp_path / "c")
    f = m["shards"][2]["fields"]["topk_indices"]
    path = tmp_path / "c" / "parts" / "p00000of00001.topk_indices.bin"
    data = bytearray(path.read_bytes())
    data[f["offset"]] ^= 0x01  # an index stays inside the vocabulary: only the checksum sees it
    path.write_bytes(bytes(data))
    t = CachedTeacher(tmp_path / "c", expect=ident)
    t.read(ids[:6], 32, Needs(logits=True))  # shards 0 and 1 read fine
    with pytest.raises(HldError, match=r"cache shard 2 \(topk_indices.*corrupt"):
        t.read(ids[6:7], 32, Needs(logits=True))
    with pytest.raises(HldError, match="shard 2 .* corrupt"):
        verify_cache(tmp_path / "c", quiet=True)
    # an out-of-range index with its checksum rewritten to match: the vocabulary check
    data[f["offset"]] ^= 0x01
    data[f["offset"] + 2] = 0x7F
    path.write_bytes(bytes(data))
    import hashlib

    _edit(
        tmp_path / "c",
        lambda m: m["shards"][2]["fields"]["topk_indices"].update(
            sha256=hashlib.sha256(bytes(data[f["offset"] : f["offset"] + f["nbytes"]])).hexdigest()
        ),
    )
    with pytest.raises(HldError, match="outside the teacher's vocabulary"):
        CachedTeacher(tmp_path / "c", expect=ident).read(ids[6:7], 32, Needs(logits=True))
    (tmp_path / "c" / "windows.npy").write_bytes(b"")
    with pytest.raises(HldError, match="windows.npy is missing or unreadable"):
        CachedTeacher(tmp_path / "c", expect=ident)
    shutil.rmtree(tmp_path / "c" / "parts")
    with pytest.raises(HldError, match="is missing"):
        CachedTeacher(tmp_path / "c", expect=ident)


def test_checksums_are_stamped_once_and_reused(tmp_path, setup, monkeypatch):
    import hashlib as h

    lm, windows, ids, ident = setup
    _build(setup, tmp_path / "c")
    CachedTeacher(tmp_path / "c", expect=ident).read(ids, 32, Needs(logits=True, layers=(1,)))
    lines = (tmp_path / "c" / "verified.jsonl").read_text().splitlines()
    assert len(lines) == 7 * (1 + 6 + 2)  # tokens, 6 compact arrays, layer 1 and its scales, per shard
    hashed = []
    real = h.sha256

    def spy(*a):
        hashed.append(1)
        return real(*a)

    monkeypatch.setattr("hld.cache.store.hashlib.sha256", spy)
    CachedTeacher(tmp_path / "c", expect=ident).read(ids, 32, Needs(logits=True, layers=(1,)))
    assert len(hashed) == 1  # windows.npy's; every shard's verdict came from its stamp
    assert verify_cache(tmp_path / "c", quiet=True)["verified"] == 7 * (1 + 6 + 4)  # --verify: all, again


def test_reuse_verifies_first_and_rebuilds_a_damaged_cache(tmp_path, overrides):
    """Item 13: a corrupt cache is not reused by cache-teacher / study --cache."""
    cfg = load_config("smoke", [*overrides, "objective.method=kd", "budget.tokens=512"])
    res = Resources()
    first = ensure_cache([cfg], tmp_path / "c", res, quiet=True)
    assert ensure_cache([cfg], tmp_path / "c", res, quiet=True)["reused"]
    res2 = Resources()  # a new process (a study cell): reuse checks the cache without the teacher's weights
    res2.teacher = lambda *a: pytest.fail("the teacher's weights were loaded to reuse a complete cache")
    assert ensure_cache([cfg], tmp_path / "c", res2, quiet=True)["reused"]
    part = tmp_path / "c" / "parts" / "p00000of00001.topk_values.bin"
    _flip(part)
    again = ensure_cache([cfg], tmp_path / "c", res, quiet=True)
    assert not again.get("reused") and _without_timing(again) == _without_timing(first)
    hld = load_config("smoke", [*overrides, "objective.method=hld-joint", "budget.tokens=512"])
    assert not ensure_cache([hld], tmp_path / "c", res, quiet=True).get("reused")  # kd's cache lacks layers
    assert ensure_cache([cfg], tmp_path / "c", res, quiet=True)["reused"]  # hld's serves kd too


def _flip(path, at=-10):
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def test_another_tools_manifest_is_not_taken_for_a_cache(tmp_path, setup):
    """Issue 24 item 3: a directory with someone's manifest.json holding a format_version is refused."""
    out = tmp_path / "theirs"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"format_version": 2, "files": ["a.bin"]}))
    (out / "a.bin").write_bytes(b"user data")
    with pytest.raises(HldError, match="is not an hld teacher cache"):
        _build(setup, out)
    assert (out / "a.bin").read_bytes() == b"user data"


def test_prefetched_reads_are_the_reads_and_are_used(tmp_path, setup, monkeypatch):
    from hld.data.packing import make_batch

    lm, windows, ids, ident = setup
    _build(setup, tmp_path / "c")
    t = CachedTeacher(tmp_path / "c", expect=ident, workers=2)
    needs = Needs(logits=True, layers=(1, 3))
    mbs = [ids[[3, 7, 1]], ids[[19, 0, 8]]]
    want = [t.read(m, 32, needs) for m in mbs]
    t.prefetch(mbs, 32, needs)
    calls = []
    monkeypatch.setattr(t, "read", lambda *a: calls.append(a))  # a miss would read on this thread
    for m, w in zip(mbs, want):
        got = t(make_batch(np.asarray(windows[m]), window_ids=m), needs)
        for key in ("values", "indices", "rest"):
            assert torch.equal(getattr(got.source, key), getattr(w.source, key))
        assert all(torch.equal(got.hidden[k], w.hidden[k]) for k in (1, 3))
    assert not calls
    t.close()


@pytest.mark.parametrize(
    "method,signal",
    [("kd", []), ("hld-joint", []), ("kd", ["teacher.cache_signal=sampled", "teacher.cache_samples=5"])],
)
def test_cache_teacher_builds_what_plan_says(tmp_path, overrides, capsys, method, signal):
    """`hld cache-teacher --config X` stores the layers of X's own arm (none for kd), the tokens, bytes
    and file count `hld plan` gives for it (a sampled signal: its slots of id + weight, exactly)."""
    from hld.cli import main
    from hld.plan import plan_run

    over = [
        *overrides,
        f"objective.method={method}",
        "teacher.cache_codec=exact",
        "teacher.cache_hidden_dtype=bfloat16",
        *signal,
    ]
    assert main(["cache-teacher", "--config", "smoke", "--out", str(tmp_path / "c"), *over, "--json"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    plan = plan_run(load_config("smoke", over))["cache"]
    assert row["layers"] == plan["layers"] == ([] if method == "kd" else [2, 3])
    assert row["tokens"] == plan["tokens"] and row["bytes"] == plan["bytes"]
    assert main(["cache-teacher", "--config", "smoke", "--out", str(tmp_path / "d"), *over, "--dry-run", "--json"]) == 0
    dry = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (dry["tokens"], dry["bytes"], dry["files"]) == (row["tokens"], row["bytes"], plan["files"])
    assert not (tmp_path / "d").exists()
    assert sum(1 for p in (tmp_path / "c").rglob("*") if p.is_file()) == plan["files"] - 1  # no stamps yet


@pytest.mark.parametrize(
    "argv,problem",
    [
        (["--shard", "2/2"], "--shard '2/2' is not I/N"),
        (["--shard", "x"], "is not I/N"),
        ([], "needs --config"),
    ],
)
def test_cache_teacher_flags(tmp_path, capsys, overrides, argv, problem):
    from helpers import one_line_error

    config = [] if not argv else ["--config", "smoke"]
    one_line_error(capsys, ["cache-teacher", *config, "--out", str(tmp_path / "c"), *argv, *overrides], problem)
    assert not (tmp_path / "c").exists()


def test_the_encode_thread_writes_the_bytes_a_serial_build_writes(tmp_path, setup):
    lm, windows, ids, ident = setup
    serial = build_cache(
        lm, windows, ids, tmp_path / "serial", identity=ident, codec=COMPACT, shard_windows=3, quiet=True, overlap=False
    )
    overlapped = _build(setup, tmp_path / "overlapped")  # the default: encode on the background thread
    assert _without_timing(serial) == _without_timing(overlapped)
    assert _files(tmp_path / "serial") == _files(tmp_path / "overlapped")


def test_an_encode_error_stops_every_later_write_and_reaches_the_builder():
    from hld.cache.encode import OrderedEncoder

    done: list[int] = []
    enc = OrderedEncoder(depth=2)

    def step(i):
        if i == 2:
            raise ValueError("encode failed at 2")
        done.append(i)

    with pytest.raises(ValueError, match="encode failed at 2"):
        for i in range(50):
            enc.submit(step, i)
        enc.drain()
    enc.close()
    assert done == [0, 1]  # in order, and nothing after the failed call ran (no gap in the part files)


def test_a_field_damaged_in_place_with_size_and_mtime_kept_is_hashed_again_and_refused(tmp_path, setup):
    """Issue 31: the verdicts were keyed by size and mtime, so a part file damaged in place with both kept
    was trained on. They are keyed by inode and ctime too (`hld.fingerprint.file_state`)."""
    from hld.cache.reader import read_manifest
    from hld.cache.store import Parts

    out = tmp_path / "c"
    _build(setup, out)
    manifest = read_manifest(out)
    n = Parts(out, manifest, verify=True).verify_all()  # every field hashed and stamped
    assert len((out / "verified.jsonl").read_text().splitlines()) == n
    rec = manifest["shards"][0]
    key = next(k for k in rec["fields"] if k != "tokens")
    f, field = out / "parts" / f"{rec['part']}.{key}.bin", rec["fields"][key]
    before = f.stat()
    with open(f, "r+b") as fh:  # one byte inverted in place, the size kept, the mtime set back
        fh.seek(field["offset"] + field["nbytes"] // 2)
        b = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([b[0] ^ 0x01]))
    os.utime(f, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (f.stat().st_size, f.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    with pytest.raises(HldError, match=r"cache shard 0 .* is corrupt \(checksum mismatch\)"):
        Parts(out, manifest, verify=True).verify_all()  # stamps honoured, as a run's reads are
