"""Text sources, tokenise-and-pack, batch order and the token cache, each checked against an
independent computation (files read by hand, windows and labels built with plain loops)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from hld.data import packing
from hld.data.loader import BatchOrder
from hld.data.packing import IGNORE, make_batch, pack_windows
from hld.data.sources import iter_documents
from hld.data.tokenize import open_windows
from hld.errors import HldError

ASSETS = Path(__file__).resolve().parents[1] / "assets"
BOS, EOS = 2, 1


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(str(ASSETS / "tiny_tokenizer"))
    assert (t.bos_token_id, t.eos_token_id, t.pad_token_id) == (BOS, EOS, 0)
    return t


def _read_c4(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _write_jsonl(path: Path, records: list, *, gz: bool = False) -> Path:
    text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as fh:
            fh.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def _hand_stream(texts: list[str], tok) -> np.ndarray:
    """ids + EOS per document, one document at a time, concatenated (no BOS: windows get it)."""
    out: list[int] = []
    for t in texts:
        out += [*tok.encode(t, add_special_tokens=False, split_special_tokens=True), EOS]
    return np.asarray(out)


def _stream(spec: str, tok, max_docs=None) -> np.ndarray:
    return packing.tokenize_stream(iter_documents(spec), tok, eos_id=EOS, max_docs=max_docs)


def _hand_windows(stream: list[int], seq_len: int) -> list[list[int]]:
    """The README's protocol with plain lists: chunks of seq_len-1, each led by BOS, tail dropped."""
    body, out = seq_len - 1, []
    for start in range(0, len(stream) - body + 1, body):
        out.append([BOS] + list(stream[start : start + body]))
    return out


# --------------------------------------------------------------------------- sources


def test_c4_fixture_shards_in_sorted_file_order():
    files = sorted((ASSETS / "c4").glob("c4-train.*.json.gz"))
    assert [f.name for f in files] == ["c4-train.00000-of-00002.json.gz", "c4-train.00001-of-00002.json.gz"]
    records = [r for f in files for r in _read_c4(f)]
    assert all(set(r) == {"text", "timestamp", "url"} for r in records)  # C4 record format
    docs = list(iter_documents(str(ASSETS / "c4" / "c4-train.*.json.gz")))
    assert docs == [r["text"] for r in records]
    assert len(docs) > 100


def test_c4_glob_order_is_sorted_names_not_creation_order(tmp_path):
    # written in reverse order: directory order (glob's order) may follow creation
    for shard, texts in ((2, ["c1", "c2"]), (1, ["b1"]), (0, ["a1", "a2", "a3"])):
        recs = [{"text": t, "timestamp": "2019-04-25T12:57:54Z", "url": f"https://x/{t}"} for t in texts]
        _write_jsonl(tmp_path / f"c4-train.{shard:05d}-of-00003.json.gz", recs, gz=True)
    expected = ["a1", "a2", "a3", "b1", "c1", "c2"]
    assert list(iter_documents(str(tmp_path / "c4-train.*.json.gz"))) == expected
    assert list(iter_documents(str(tmp_path))) == expected  # a directory: its data files, sorted


def test_jsonl_skips_blank_lines_and_empty_texts(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(
        '{"text": "first doc"}\n\n   \n{"text": "  "}\n{"text": "zweites Dokument \\u00e9"}\n'
        '{"text": "third\\n\\nwith a blank line inside"}\n',
        encoding="utf-8",
    )
    assert list(iter_documents(str(path))) == ["first doc", "zweites Dokument é", "third\n\nwith a blank line inside"]


def test_jsonl_gz_with_custom_text_field(tmp_path):
    recs = [{"id": i, "content": f"document number {i}", "text": "not this one"} for i in range(5)]
    path = _write_jsonl(tmp_path / "corpus.jsonl.gz", recs, gz=True)
    assert list(iter_documents(str(path), "content")) == [f"document number {i}" for i in range(5)]


def test_txt_blank_line_paragraphs(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("line one\nline two\n\n\n   \nsecond para\n\nlast para\nno final newline", encoding="utf-8")
    assert list(iter_documents(str(path))) == ["line one\nline two", "second para", "last para\nno final newline"]


def test_hf_local_dataset_saved_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets", reason="the hf: source needs the optional `datasets` package")
    datasets.disable_progress_bars()
    single = tmp_path / "single"
    datasets.Dataset.from_dict({"body": ["alpha beta", "", "gamma"], "n": [1, 2, 3]}).save_to_disk(str(single))
    assert list(iter_documents(f"hf:{single}::train", "body")) == ["alpha beta", "gamma"]

    multi = tmp_path / "multi"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": ["t1", "t2"]}),
            "validation": datasets.Dataset.from_dict({"text": ["v1"]}),
        }
    ).save_to_disk(str(multi))
    assert list(iter_documents(f"hf:{multi}::validation")) == ["v1"]
    assert list(iter_documents(f"hf:{multi}::train")) == ["t1", "t2"]
    with pytest.raises(HldError, match="test"):
        list(iter_documents(f"hf:{multi}::test"))


def test_hf_missing_text_field_is_named(tmp_path):
    datasets = pytest.importorskip("datasets", reason="the hf: source needs the optional `datasets` package")
    datasets.disable_progress_bars()
    datasets.Dataset.from_dict({"body": ["a", "b"]}).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(HldError, match="'text'"):
        list(iter_documents(f"hf:{tmp_path / 'ds'}::train"))


def test_local_hf_dataset_is_stored_and_windowed_like_files(tmp_path, tok, hld_cache_dir):
    datasets = pytest.importorskip("datasets", reason="the hf: source needs the optional `datasets` package")
    datasets.disable_progress_bars()
    texts = ["one two three", "four five", "six"] * 5
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "ds"))
    w = open_windows(f"hf:{tmp_path / 'ds'}::train", tok, seq_len=4)
    assert w[:].tolist() == _hand_windows(_hand_stream(texts, tok).tolist(), 4)
    assert len(list((hld_cache_dir / "stores").glob("*/manifest.json"))) == 1  # a local dataset gets a store


@pytest.mark.parametrize(
    "spec, problem",
    [
        ("nothing-*.jsonl", "matches no file"),
        ("data.csv", "unsupported extension"),
        ("hf:only-two:parts", "hf:NAME:CONFIG:SPLIT"),
    ],
)
def test_bad_specs(tmp_path, spec, problem):
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(HldError, match=problem):
        list(iter_documents(spec if spec.startswith("hf:") else str(tmp_path / spec)))


@pytest.mark.parametrize(
    "content, problem",
    [
        (b'{"text": "ok"}\n{"text": "ok"}\n{"text": broken\n', r"bad\.jsonl:3 is not a JSON object"),
        (b'{"text": "ok"}\n{"body": "no text"}\n', r"bad\.jsonl:2 has no 'text' field"),
        (b'{"text": 5}\n', r"bad\.jsonl:1 field 'text' is not a string"),
        (b"[1, 2]\n", r"bad\.jsonl:1 has no 'text' field"),
        (b'{"text": "caf\xe9"}\n', "not valid UTF-8"),
    ],
)
def test_bad_jsonl_records(tmp_path, content, problem):
    (tmp_path / "bad.jsonl").write_bytes(content)
    with pytest.raises(HldError, match=problem):
        list(iter_documents(str(tmp_path / "bad.jsonl")))


def test_truncated_gzip_is_an_hld_error(tmp_path):
    good = _write_jsonl(tmp_path / "x.jsonl.gz", [{"text": "word " * 2000}], gz=True).read_bytes()
    (tmp_path / "x.jsonl.gz").write_bytes(good[: len(good) // 2])
    with pytest.raises(HldError, match="truncated"):
        list(iter_documents(str(tmp_path / "x.jsonl.gz")))


# --------------------------------------------------------------------------- tokenise and pack


def test_stream_is_ids_eos_per_document(tok):
    spec = str(ASSETS / "c4" / "c4-validation.*.json.gz")
    texts = [r["text"] for r in _read_c4(ASSETS / "c4" / "c4-validation.00000-of-00001.json.gz")]
    expected = _hand_stream(texts, tok)
    stream = _stream(spec, tok)
    assert stream.dtype == np.int32
    np.testing.assert_array_equal(stream, expected)
    np.testing.assert_array_equal(_stream(spec, tok, max_docs=3), _hand_stream(texts[:3], tok))
    # documents tokenised in batches give the same ids as one at a time
    np.testing.assert_array_equal(packing.tokenize_stream(iter(texts), tok, eos_id=EOS, batch_docs=4), expected)


def test_text_spelling_bos_is_text_not_a_bos(tok):
    stream = packing.tokenize_stream(iter(["a <bos> b"]), tok, eos_id=EOS)
    assert BOS not in stream.tolist()


def test_pack_windows_are_bos_plus_consecutive_chunks_last_partial_dropped():
    stream = np.arange(3, 103, dtype=np.int32)  # 100 tokens, none a BOS
    w = pack_windows(stream, 10, bos_id=BOS)
    assert w.shape == (11, 10) and w.dtype == np.int64  # 100 // 9 chunks of 9
    for i in range(11):
        assert w[i].tolist() == [BOS] + list(range(3 + 9 * i, 3 + 9 * i + 9))
    assert 102 not in w  # the tail 102 (a partial chunk) is dropped
    assert w.tolist() == _hand_windows(stream.tolist(), 10)
    assert pack_windows(np.arange(18), 10, bos_id=BOS).shape == (2, 10)  # exact multiple: nothing dropped
    with pytest.raises(HldError, match="fewer than one window"):
        pack_windows(np.arange(8), 10, bos_id=BOS)
    with pytest.raises(HldError, match="seq_len"):
        pack_windows(np.arange(8), 1, bos_id=BOS)


def test_labels_on_a_hand_written_example():
    windows = np.array([[2, 5, 6, 1, 7, 8], [2, 1, 9, 9, 10, 11]])
    b = make_batch(windows)
    assert b.labels.tolist() == [[5, 6, 1, 7, 8, IGNORE], [1, 9, 9, 10, 11, IGNORE]]
    assert b.n_targets == 10  # seq_len - 1 predictions per window
    assert torch.equal(b.input_ids, torch.from_numpy(windows))


def test_labels_of_real_windows_match_a_loop(tok):
    stream = _stream(str(ASSETS / "c4" / "c4-validation.*.json.gz"), tok)
    T = 32
    windows = pack_windows(stream, T, bos_id=BOS)
    assert windows.tolist() == _hand_windows(stream.tolist(), T)
    b = make_batch(windows)
    labels = b.labels.numpy()
    for r, row in enumerate(windows):
        assert row[0] == BOS and BOS not in row[1:]  # every window starts with BOS, and has only that one
        for i in range(T):
            assert labels[r, i] == (IGNORE if i == T - 1 else row[i + 1]), (r, i)
    assert b.n_targets == len(windows) * (T - 1)
    # an EOS inside a window predicts the next document's first token (the usual C4 packing)
    assert (windows[:, 1:-1] == EOS).sum() > 0
    assert (labels[:, -1] == IGNORE).all()
    parts = b.split(2)
    assert torch.equal(torch.cat([p.labels for p in parts]), b.labels)
    assert sum(p.n_targets for p in parts) == b.n_targets


# --------------------------------------------------------------------------- batch order


def _order(n: int = 10, *, batch_size: int = 4, seed: int = 0, seq_len: int = 3) -> BatchOrder:
    windows = np.arange(n * seq_len).reshape(n, seq_len) + 3  # row r starts at 3r+3: never BOS
    return BatchOrder(windows, batch_size=batch_size, seed=seed)


def test_batch_order_is_a_pure_function_of_the_seed():
    a, b, c = _order(seed=7), _order(seed=7), _order(seed=8)
    steps = range(6)
    assert all(np.array_equal(a.indices(k), b.indices(k)) for k in steps)
    assert all(torch.equal(a.batch(k).input_ids, b.batch(k).input_ids) for k in steps)
    assert any(not np.array_equal(a.indices(k), c.indices(k)) for k in steps)


def test_every_window_once_per_epoch_across_the_boundary():
    n, bs = 10, 4  # 10 windows, batches of 4: batch 2 straddles epochs 0 and 1
    order = _order(n, batch_size=bs, seed=3)
    flat = np.concatenate([order.indices(k) for k in range(3 * n // 2)])  # 60 positions = 6 epochs
    epochs = flat.reshape(-1, n)
    for e in epochs:
        assert sorted(e.tolist()) == list(range(n))
    assert not all(np.array_equal(epochs[0], e) for e in epochs[1:])  # reshuffled each epoch
    b2 = order.batch(2)
    assert b2.input_ids.tolist() == order.windows[np.r_[epochs[0][8:], epochs[1][:2]]].tolist()


def test_batch_k_is_the_same_when_built_fresh():
    walked = _order(seed=11)
    history = [walked.indices(k) for k in range(9)]  # 36 positions: epochs 0..3
    for k in (8, 0, 5, 2, 7):  # any order, any epoch, on a fresh object: resumable from k alone
        assert np.array_equal(_order(seed=11).indices(k), history[k])
        assert np.array_equal(walked.indices(k), history[k])
        assert torch.equal(_order(seed=11).batch(k).input_ids, torch.from_numpy(walked.windows[history[k]]))


def test_batch_larger_than_the_corpus():
    order = _order(3, batch_size=8, seed=0)
    idx = order.indices(0)
    assert len(idx) == 8 and sorted(idx[:3].tolist()) == [0, 1, 2] and sorted(idx[3:6].tolist()) == [0, 1, 2]
