"""The token store (hld.data.store, hld.data.tokenize): windows read from it against `pack_windows`
over a stream tokenised by hand, resumable and parallel builds against a one-shot build (bytewise),
damaged shards and manifests refused in one line, and a hub corpus never tokenised at start-up."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from hld.data import store as st
from hld.data import tokenize as tk
from hld.data.packing import pack_windows
from hld.errors import HldError

ASSETS = Path(__file__).resolve().parents[1] / "assets"
BOS, EOS = 2, 1


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(str(ASSETS / "tiny_tokenizer"))
    assert (t.bos_token_id, t.eos_token_id) == (BOS, EOS)
    return t


def _hand_stream(texts: list[str], tok) -> np.ndarray:
    """ids + EOS per document, one document at a time (the documents with text: blank ones are skipped)."""
    out: list[int] = []
    for t in texts:
        if t.strip():
            out += [*tok.encode(t, add_special_tokens=False, split_special_tokens=True), EOS]
    return np.asarray(out, dtype=np.int64)


def _corpus(tmp_path: Path, n_files: int = 4, seed: int = 0) -> tuple[str, list[str]]:
    """JSONL files with documents of every size: one character, a word, blank, a sentence, ~2k words."""
    rng = np.random.default_rng(seed)
    words = ["the", "cat", "sat", "on", "a", "mat", "über", "naïve", "42", "<bos>", "x"]
    texts: list[str] = []
    for f in range(n_files):
        docs = ["a", "word", " ", "one short sentence.", " ".join(rng.choice(words, size=2000))]
        docs += [" ".join(rng.choice(words, size=int(rng.integers(1, 300)))) for _ in range(20)]
        (tmp_path / f"part-{f:02d}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
        texts += docs
    return str(tmp_path / "part-*.jsonl"), texts


def _store_bytes(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((path / "shards").glob("*.bin"))}


@pytest.mark.parametrize("seq_len", [2, 3, 7, 32, 129])
def test_store_windows_are_pack_windows(tmp_path, tok, seq_len):
    spec, texts = _corpus(tmp_path)
    stream = _hand_stream(texts, tok)
    want = pack_windows(stream, seq_len, bos_id=BOS)
    w = tk.open_windows(spec, tok, seq_len=seq_len)
    assert len(w) == len(want) == len(stream) // (seq_len - 1)  # the last partial chunk is dropped
    assert w.shape == want.shape
    np.testing.assert_array_equal(w[:], want)
    np.testing.assert_array_equal(w[3 : len(want) - 2], want[3:-2])  # one read of the stream
    np.testing.assert_array_equal(w[::5], want[::5])
    idx = np.random.default_rng(0).integers(0, len(want), size=50)
    np.testing.assert_array_equal(w[idx], want[idx])
    np.testing.assert_array_equal(w[-1], want[-1])
    np.testing.assert_array_equal(np.stack(list(w)), want)
    assert w[idx].dtype == np.int64
    with pytest.raises(IndexError):
        w[len(want)]


@pytest.mark.parametrize("max_docs", [1, 3, 26, 10_000])
def test_first_documents_are_the_hand_streams_first_documents(tmp_path, tok, max_docs):
    spec, texts = _corpus(tmp_path)
    with_text = [t for t in texts if t.strip()]
    stream = _hand_stream(with_text[:max_docs], tok)
    w = tk.open_windows(spec, tok, seq_len=3, max_docs=max_docs)
    np.testing.assert_array_equal(w[:], pack_windows(stream, 3, bos_id=BOS))


def test_validation_reads_only_the_units_it_needs(tmp_path, tok):
    spec, texts = _corpus(tmp_path, n_files=4)
    w = tk.open_windows(spec, tok, seq_len=16, need_windows=2, what="data.validation")
    out = tk.store_path(tk.identity(spec, tok, "text"))
    m = st.read_manifest(out)
    assert len(m["shards"]) == 1 and not m["complete"]  # the first file holds 2 windows: only it was read
    first = _hand_stream(texts[:25], tok)  # the first file's documents
    np.testing.assert_array_equal(w[:2], pack_windows(first, 16, bos_id=BOS)[:2])
    full = tk.open_windows(spec, tok, seq_len=16)  # all of it: the store is extended, not rebuilt
    assert st.read_manifest(out)["complete"] and len(full) > len(w)
    np.testing.assert_array_equal(full[:], pack_windows(_hand_stream(texts, tok), 16, bos_id=BOS))


def test_killed_build_resumes_without_redoing_committed_units(tmp_path, tok, monkeypatch):
    (tmp_path / "src").mkdir()
    spec, _ = _corpus(tmp_path / "src", n_files=5)
    one = tmp_path / "one"
    tk.build(spec, tok, one, quiet=True)
    calls: list[int] = []
    real = tk.tokenize_unit

    def dies_after_two(spec_, index, out, tokenizer, **kw):
        if len(calls) == 2:
            raise RuntimeError("killed")  # the build is killed while unit 2 is in flight
        calls.append(index)
        return real(spec_, index, out, tokenizer, **kw)

    resumed = tmp_path / "resumed"
    monkeypatch.setattr(tk, "tokenize_unit", dies_after_two)
    with pytest.raises(RuntimeError, match="killed"):
        tk.build(spec, tok, resumed, quiet=True)
    assert calls == [0, 1] and not (resumed / "manifest.json").exists()  # never a store that looks complete
    (resumed / "shards" / ".00002.bin.killed.tmp").write_bytes(b"half a shard")  # what a SIGKILL leaves
    before = {p.name: p.stat().st_mtime_ns for p in (resumed / "shards").glob("0000[01].*")}

    calls.clear()
    monkeypatch.setattr(tk, "tokenize_unit", lambda *a, **k: (calls.append(a[1]), real(*a, **k))[1])
    m = tk.build(spec, tok, resumed, quiet=True)
    assert calls == [2, 3, 4]  # units 0 and 1 were committed: not redone
    assert before == {p.name: p.stat().st_mtime_ns for p in (resumed / "shards").glob("0000[01].*")}
    assert not list((resumed / "shards").glob("*.tmp"))
    assert _store_bytes(resumed) == _store_bytes(one)
    assert m == st.read_manifest(one)


@pytest.mark.slow
def test_two_workers_and_array_tasks_build_the_same_store(tmp_path, tok):
    (tmp_path / "src").mkdir()
    spec, _ = _corpus(tmp_path / "src", n_files=4)
    one, two, array = tmp_path / "one", tmp_path / "two", tmp_path / "array"
    ref = tk.build(spec, tok, one, quiet=True)
    assert tk.build(spec, tok, two, workers=2, quiet=True) == ref
    assert _store_bytes(two) == _store_bytes(one)
    assert tk.build(spec, tok, array, shard=(1, 2), quiet=True) is None  # units 1, 3: 0 and 2 still missing
    assert sorted(p.name for p in (array / "shards").glob("*.bin")) == ["00001.bin", "00003.bin"]
    assert tk.build(spec, tok, array, shard=(0, 2), quiet=True) == ref  # the last task assembles the manifest
    assert _store_bytes(array) == _store_bytes(one)


def test_a_reader_assembles_what_array_tasks_committed(tmp_path, tok):
    spec, texts = _corpus(tmp_path, n_files=2)
    out = tk.store_path(tk.identity(spec, tok, "text"))
    tk.build(spec, tok, out, shard=(0, 2), quiet=True)
    tk.build(spec, tok, out, shard=(1, 2), quiet=True)
    (out / "manifest.json").unlink()  # e.g. the last task was killed between its record and the manifest
    w = tk.open_windows(spec, tok, seq_len=5, may_build=False)
    np.testing.assert_array_equal(w[:], pack_windows(_hand_stream(texts, tok), 5, bos_id=BOS))


@pytest.fixture
def built(tmp_path, tok):
    spec, _ = _corpus(tmp_path, n_files=2)
    tk.open_windows(spec, tok, seq_len=8)
    return spec, tk.store_path(tk.identity(spec, tok, "text"))


def test_truncated_shard_is_refused_at_open(built, tok):
    spec, out = built
    f = out / "shards" / "00001.bin"
    f.write_bytes(f.read_bytes()[:-4])
    with pytest.raises(HldError, match=r"00001\.bin is \d+ bytes, its manifest says \d+ bytes") as e:
        tk.open_windows(spec, tok, seq_len=8)
    assert "\n" not in str(e.value) and "delete" in e.value.fix


def test_flipped_shard_is_refused_before_its_first_read(built, tok):
    spec, out = built
    f = out / "shards" / "00000.bin"
    raw = bytearray(f.read_bytes())
    raw[100] ^= 0x01  # an in-range id: nothing but the checksum can tell
    f.write_bytes(bytes(raw))
    w = tk.open_windows(spec, tok, seq_len=8)  # a fresh process: sizes at open, checksum at first read
    with pytest.raises(HldError, match=r"00000\.bin does not match its checksum"):
        w[0]


def test_checksum_verdict_is_reused_until_the_file_changes(built, tok, monkeypatch):
    spec, out = built
    hashed: list[str] = []
    real = st.file_sha256
    monkeypatch.setattr(st, "file_sha256", lambda p: (hashed.append(Path(p).name), real(p))[1])
    w = tk.open_windows(spec, tok, seq_len=8)
    w[:]
    assert hashed == []  # the first open (the build's process) stamped both shards
    f = out / "shards" / "00001.bin"
    f.write_bytes(f.read_bytes())  # same bytes, new mtime: checked again
    tk.open_windows(spec, tok, seq_len=8)[:]
    assert hashed == ["00001.bin"]
    assert st.verify_all(out) == 2 and hashed == ["00001.bin", "00000.bin", "00001.bin"]


@pytest.mark.parametrize(
    "edit, problem",
    [
        (lambda m: "not json {", "not valid JSON|cannot read|damaged"),
        (lambda m: json.dumps({**m, "format": "other"}), "not an hld token store"),
        (lambda m: json.dumps({k: v for k, v in m.items() if k != "shards"}), "lacks shards"),
        (lambda m: json.dumps({**m, "shards": ["00000"]}), "malformed shard entries"),
        (lambda m: json.dumps({**m, "shards": [{**m["shards"][0], "tokens": -1}]}), "malformed shard entries"),
        (lambda m: json.dumps({**m, "eos_id": 7}), "built with eos_id=7"),
    ],
)
def test_damaged_manifest_is_one_line(built, tok, edit, problem):
    spec, out = built
    f = out / "manifest.json"
    f.write_text(edit(json.loads(f.read_text())))
    with pytest.raises(HldError, match=problem) as e:
        tk.open_windows(spec, tok, seq_len=8, may_build=False)
    assert "\n" not in str(e.value)


def test_ids_outside_the_vocabulary_are_refused(built, tok):
    spec, out = built
    m = json.loads((out / "manifest.json").read_text())
    s = m["shards"][0]
    f = out / "shards" / f"{s['name']}.bin"
    ids = np.fromfile(f, dtype=st.DTYPE)
    ids[0] = len(tok) + 5
    ids.tofile(f)
    s["sha256"] = st.file_sha256(f)  # a consistent but foreign store: another tokenizer's ids
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(HldError, match="outside the vocabulary"):
        tk.open_windows(spec, tok, seq_len=8)[0]


def test_out_directory_of_another_source_or_tool_is_refused(tmp_path, tok):
    spec, _ = _corpus(tmp_path, n_files=1)
    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("keep me")
    with pytest.raises(HldError, match="not empty and is not an hld token store"):
        tk.build(spec, tok, other, quiet=True)
    assert (other / "mine.txt").read_text() == "keep me"
    store = tmp_path / "store"
    tk.build(spec, tok, store, quiet=True)
    with pytest.raises(HldError, match="another text_field"):
        tk.build(spec, tok, store, text_field="body", quiet=True)


def test_a_second_process_mid_write_of_the_identity_is_not_a_stranger(tmp_path, tok):
    """Two ranks starting on one store: the other's atomic temporary of identity.json (caught in CI,
    rank 0 refusing the store rank 1 was creating) is ours, not a foreign file."""
    spec, _ = _corpus(tmp_path, n_files=1)
    store = tmp_path / "store"
    (store / "shards").mkdir(parents=True)
    (store / ".identity.json.x1y2.tmp").write_text("{")
    m = tk.build(spec, tok, store, quiet=True)
    assert m["complete"] and json.loads((store / "identity.json").read_text())["source"]


def test_lone_surrogates_are_repaired_and_counted(tmp_path, tok):
    (tmp_path / "s.jsonl").write_text('{"text": "ok \\ud800 there"}\n{"text": "fine"}\n')
    m = tk.build(str(tmp_path / "s.jsonl"), tok, tmp_path / "store", quiet=True)
    assert m["shards"][0]["repaired"] == 1 and m["docs"] == 2
    want = _hand_stream(["ok \ufffd there", "fine"], tok)
    np.testing.assert_array_equal(np.fromfile(tmp_path / "store" / "shards" / "00000.bin", dtype=st.DTYPE), want)


def test_hub_corpus_without_a_store_is_refused_before_anything_loads(tmp_path):
    from hld.config import load_config

    cfg = load_config("paper-123m", [f"data.store_dir={tmp_path}"])
    with pytest.raises(HldError, match=r"data.train=hf:allenai/c4:en:train has no token store") as e:
        tk.require_stores(cfg.data, "paper-123m")
    assert "hld tokenize --config paper-123m" in e.value.fix


# --------------------------------------------------------------------------- flat token files of other tools


@pytest.mark.parametrize("kind", ["npy-int64", "bin-uint16", "bin-uint32"])
def test_flat_token_file_windows_are_pack_windows(tmp_path, tok, kind):
    spec_text, texts = _corpus(tmp_path, n_files=1)
    stream = _hand_stream(texts, tok)
    fmt, dtype = kind.split("-")
    path = tmp_path / f"ids.{fmt}"
    if fmt == "npy":
        np.save(path, stream.astype(dtype))
        spec = f"tokens:{path}"
    else:
        stream.astype(f"<{'u2' if dtype == 'uint16' else 'u4'}").tofile(path)
        spec = f"tokens:{path}:{dtype}"
    w = tk.open_windows(spec, tok, seq_len=9)
    np.testing.assert_array_equal(w[:], pack_windows(stream, 9, bos_id=BOS))
    m = st.read_manifest(tk.store_path(tk.identity(spec, tok, "text")))
    assert m["docs"] == int((stream == EOS).sum()) and m["shards"][0]["repaired"] == 0


def test_flat_token_file_without_a_closing_eos_gets_one(tmp_path, tok):
    np.save(tmp_path / "ids.npy", np.array([5, 6, EOS, 7, 8, 9]))
    w = tk.open_windows(f"tokens:{tmp_path / 'ids.npy'}", tok, seq_len=4)
    assert w[:].tolist() == [[BOS, 5, 6, EOS], [BOS, 7, 8, 9]]  # the closing EOS is the dropped tail
    m = st.read_manifest(tk.store_path(tk.identity(f"tokens:{tmp_path / 'ids.npy'}", tok, "text")))
    assert (m["docs"], m["tokens"], m["shards"][0]["repaired"]) == (2, 7, 1)


@pytest.mark.parametrize(
    "write, suffix, problem",
    [
        (lambda p: np.save(p, np.array([3, 4, 10_000])), "", "holds id 10000, outside the tokenizer's vocabulary"),
        (lambda p: np.save(p, np.array([3, -1, 4])), "", "holds id -1"),
        (lambda p: np.save(p, np.zeros((2, 3), np.int32)), "", "2-D int32 array"),
        (lambda p: np.save(p, np.zeros(3, np.float32)), "", "not a 1-D array of integer ids"),
        (lambda p: p.write_bytes(b"not numpy"), "", "cannot read the token file"),
        (lambda p: np.save(p, np.array([3, 4])), ":uint16", "its header holds its dtype"),
    ],
)
def test_bad_flat_token_files_are_one_line(tmp_path, tok, write, suffix, problem):
    path = tmp_path / "ids.npy"
    write(path)
    with pytest.raises(HldError, match=problem):
        tk.open_windows(f"tokens:{path}{suffix}", tok, seq_len=4)


def test_raw_token_file_needs_its_dtype(tmp_path, tok):
    (tmp_path / "train.bin").write_bytes(np.arange(3, 20, dtype="<u2").tobytes())
    with pytest.raises(HldError, match="its dtype cannot be read from it") as e:
        tk.open_windows(f"tokens:{tmp_path / 'train.bin'}", tok, seq_len=4)
    assert "uint16" in e.value.fix


def test_a_unit_held_by_another_process_is_waited_for_not_left_out(tmp_path, tok):
    # another process holds unit 1 (flock: two open file descriptions conflict even in one process) and
    # dies after a second without committing it: the build skips it, does the rest, then waits and does it
    import fcntl
    import os
    import threading

    (tmp_path / "src").mkdir()
    spec, _ = _corpus(tmp_path / "src", n_files=3)
    one = tk.build(spec, tok, tmp_path / "one", quiet=True)
    out = tmp_path / "two"
    (out / "shards").mkdir(parents=True)
    fd = os.open(out / "shards" / "00001.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    released = threading.Event()
    unit1_before_release: list[bool] = []

    def release():
        unit1_before_release.append((out / "shards" / "00001.json").exists())
        released.set()  # before the close: the build cannot do unit 1 until after it
        os.close(fd)

    threading.Timer(1.0, release).start()
    assert tk.build(spec, tok, out, quiet=True) == one
    # it waited for the holder and did unit 1 after: an order, not a duration (no timing under load)
    assert released.is_set() and unit1_before_release == [False] and (out / "shards" / "00001.json").exists()
    assert _store_bytes(out) == _store_bytes(tmp_path / "one")


def test_a_rerun_build_redoes_a_damaged_committed_shard(built, tok, capsys):
    spec, out = built
    good = _store_bytes(out)
    f = out / "shards" / "00001.bin"
    raw = bytearray(f.read_bytes())
    raw[8] ^= 0x01
    f.write_bytes(bytes(raw))
    (out / "shards" / "00000.ok").write_bytes(b"\xff\xfe not a stamp")  # a damaged stamp: the shard is checked
    tk.build(spec, tok, out)
    assert "unit 1" in capsys.readouterr().out
    assert _store_bytes(out) == good


def _damage_in_place_keeping_size_and_mtime(f: Path, offset: int) -> None:
    """One byte inverted through the file system, the size unchanged and the mtime set back (`touch -r`):
    what the size+mtime stamps took for the verified file (issue 31). The ctime moves; no call sets it back."""
    before = f.stat()
    with open(f, "r+b") as fh:
        fh.seek(offset)
        b = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([b[0] ^ 0x01]))
    os.utime(f, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = f.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)


def test_a_shard_damaged_in_place_with_size_and_mtime_kept_is_hashed_again_and_refused(built, tok):
    spec, out = built
    tk.open_windows(spec, tok, seq_len=8)[:]  # read whole: both shards verified and stamped
    f = out / "shards" / "00000.bin"
    assert (out / "shards" / "00000.ok").is_file()
    _damage_in_place_keeping_size_and_mtime(f, 100)  # an in-range id: nothing but the checksum can tell
    w = tk.open_windows(spec, tok, seq_len=8)
    with pytest.raises(HldError, match=r"00000\.bin does not match its checksum"):
        w[:]


def test_a_tokenizer_with_the_same_vocabulary_and_other_merges_is_another_store(tmp_path, tok):
    """The store's key is what decides the ids, not the vocabulary alone: the tiny tokenizer with its merge
    list reversed has every piece at its id and tokenises a text otherwise, so it gets its own store; a copy
    whose truncation was set by a call (`truncation=True`, a per-call setting) keeps the key."""
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(tok.backend_tokenizer.to_str())
    assert spec["model"]["type"] == "BPE" and len(spec["model"]["merges"]) > 10
    spec["model"]["merges"] = spec["model"]["merges"][::-1]
    backend = type(tok.backend_tokenizer).from_str(json.dumps(spec))
    other = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=tok.bos_token, eos_token=tok.eos_token)
    text = "the naïve cat sat on a mat über 42 times"
    src = str(tmp_path / "x.jsonl")
    Path(src).write_text(json.dumps({"text": text}) + "\n")
    assert other.get_vocab() == tok.get_vocab() and other.encode(text) != tok.encode(text)
    assert tk.store_path(tk.identity(src, other, "text")) != tk.store_path(tk.identity(src, tok, "text"))

    same = PreTrainedTokenizerFast(tokenizer_object=type(backend).from_str(tok.backend_tokenizer.to_str()))
    same.bos_token, same.eos_token = tok.bos_token, tok.eos_token
    same("a text", truncation=True, max_length=3)  # sets the backend's truncation
    assert json.loads(same.backend_tokenizer.to_str())["truncation"] is not None
    assert tk.identity(src, same, "text") == tk.identity(src, tok, "text")
