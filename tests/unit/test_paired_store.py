"""Paired windows (hld.data.paired) against independent computations: the documents are read from the
json.gz files here, and each window's text comes from decoding its ids with each side's own tokenizer,
never from the store's chunk table or the aligner. Every window's teacher text is its student text and
the next stretch of the documents (windows follow each other through a unit's text, EOS marking document
ends); windows are as long as the greedy rule allows and no longer; every chunk spells the same text on
both sides; two builds are byte-identical; a document one side cannot round-trip is skipped and counted
with one warning line; a changed tokenizer is another store; damaged and slow inputs are one line.

Pairs: the checked-in tiny byte-level tokenizer (teacher; its post-processor trims offsets) with a
byte-level BPE that `hld.data.bpe` trains here (student), and a SentencePiece-style BPE with byte fallback
(Gemma's conventions, tests/helpers.py) with the same student."""

from __future__ import annotations

import gzip
import json
import types
from pathlib import Path

import numpy as np
import pytest

from helpers import C4_TRAIN, TINY_TEACHER, one_line_error, sentencepiece_bpe, tiny_overrides
from hld.data import paired as pw
from hld.errors import HldError

C4 = sorted(Path(C4_TRAIN).parent.glob("c4-train.*.json.gz"))
SEQ_LEN = 48


def unit_docs(path: Path) -> list[str]:
    with gzip.open(path, "rt") as fh:
        return [t for t in (json.loads(line)["text"] for line in fh) if t.strip()]


@pytest.fixture(scope="module")
def toks():
    from transformers import AutoTokenizer

    from hld.data.bpe import train_bpe

    student, _ = train_bpe(C4_TRAIN, vocab_size=600, max_docs=100, quiet=True)
    return {
        "tiny": AutoTokenizer.from_pretrained(str(TINY_TEACHER)),
        "sentencepiece": sentencepiece_bpe(vocab_size=800),
        "student": student,
    }


@pytest.fixture(scope="module", params=["tiny", "sentencepiece"])
def built(request, toks, tmp_path_factory):
    teacher = toks[request.param]
    root = tmp_path_factory.mktemp(f"paired-{request.param}")
    windows = pw.open_paired_windows(C4_TRAIN, teacher, toks["student"], seq_len=SEQ_LEN, store_dir=str(root))
    return teacher, toks["student"], windows


def _text(tok, ids: np.ndarray) -> str:
    """The text of ids, each EOS as "\\x00" (documents hold no NUL)."""
    pieces, start = [], 0
    ids = [int(i) for i in ids]
    for k, i in enumerate([*ids, tok.eos_token_id]):
        if i == tok.eos_token_id:
            pieces.append(tok.decode(ids[start:k]))
            start = k + 1
    return "\x00".join(pieces)


def test_every_window_is_the_same_text_on_both_sides_and_the_next_text_of_its_unit(built):
    teacher, student, windows = built
    streams = ["".join(d + "\x00" for d in unit_docs(p)) for p in C4]
    assert windows.dropped_chunks == 0
    unit, at = -1, 0
    for w in range(len(windows)):
        al = windows.window(w)
        assert al.teacher_ids[0] == teacher.bos_token_id and al.student_ids[0] == student.bos_token_id
        t_text, s_text = _text(teacher, al.teacher_ids[1:]), _text(student, al.student_ids[1:])
        assert t_text == s_text, w
        u = int(np.searchsorted(windows.offsets, w, side="right")) - 1
        if u != unit:  # a unit's first window starts at its first document
            unit, at = u, 0
        assert streams[unit][at : at + len(t_text)] == t_text, w
        at += len(t_text)
        if w + 1 == len(windows) or windows.offsets[u + 1] == w + 1:  # a unit's last window: a tail is left
            assert 0 < len(streams[unit]) - at


def test_windows_are_as_long_as_both_bounds_allow(built):
    teacher, student, windows = built
    assert windows.teacher_seq_len == pw.default_teacher_seq_len(SEQ_LEN, windows.store.token_ratio)
    for u in range(windows.store.n_units):
        chunks = np.asarray(windows.store.array(u, "chunks"), dtype=np.int64)
        for c0, c1, t0, t1, s0, s1 in np.asarray(windows.index[u]):
            assert 1 + t1 - t0 <= windows.teacher_seq_len and 1 + s1 - s0 <= SEQ_LEN
            assert (t1 - t0, s1 - s0) == tuple(chunks[c0:c1, :2].sum(0))
            nxt = chunks[c1]  # the chunk after the window would break a bound (it exists: tails are dropped)
            assert 1 + t1 - t0 + nxt[0] > windows.teacher_seq_len or 1 + s1 - s0 + nxt[1] > SEQ_LEN


def test_every_chunk_spells_the_same_text_on_both_sides(built):
    teacher, student, windows = built
    rows = windows.rows(np.arange(min(len(windows), 40)))
    assert rows.teacher_ids.shape == (len(rows.alignments), windows.teacher_seq_len)
    assert rows.student_ids.shape == (len(rows.alignments), SEQ_LEN)
    for b, al in enumerate(rows.alignments):
        tb, sb, cb = al.teacher_bounds, al.student_bounds, al.char_bounds
        assert (tb[-1], sb[-1]) == (rows.teacher_lengths[b], rows.student_lengths[b])
        t_pad = teacher.pad_token_id if teacher.pad_token_id is not None else teacher.eos_token_id
        assert (rows.teacher_ids[b, tb[-1] :] == t_pad).all()
        assert (rows.student_ids[b, sb[-1] :] == student.pad_token_id).all()
        text = _text(teacher, al.teacher_ids[1:])
        assert (tb[1], sb[1], cb[1]) == (1, 1, 0)  # chunk 0: the BOS pair
        for c in range(1, al.n_chunks):
            t_ids, s_ids = al.teacher_ids[tb[c] : tb[c + 1]], al.student_ids[sb[c] : sb[c + 1]]
            piece = text.replace("\x00", "")[cb[c] : cb[c + 1]]
            if cb[c] == cb[c + 1]:  # an EOS pair ends a document
                assert t_ids.tolist() == [teacher.eos_token_id] and s_ids.tolist() == [student.eos_token_id]
            else:
                assert teacher.decode(t_ids) == student.decode(s_ids) == piece, (b, c)


def test_chunks_of_a_batch_index_its_padded_rows(built):
    from hld.distill.cross_tok.chunks import Chunks

    teacher, student, windows = built
    rows = windows.rows([0, 3, 1])
    chunks = Chunks.from_alignments(rows.alignments, teacher_len=windows.teacher_seq_len, student_len=SEQ_LEN)
    flat_t, flat_s = rows.teacher_ids.reshape(-1), rows.student_ids.reshape(-1)
    pred = chunks.predicted()
    assert len(pred) == sum(al.n_chunks - 1 for al in rows.alignments)
    # the rows predicting a chunk read the same text on both sides: both are their window's BOS, or both
    # the last token of the chunk before (EOS pairs line up)
    t_eos = flat_t[pred.teacher_pred_rows.numpy()] == teacher.eos_token_id
    s_eos = flat_s[pred.student_pred_rows.numpy()] == student.eos_token_id
    assert (t_eos == s_eos).all()


def test_two_builds_are_byte_identical(toks, tmp_path):
    def files(root: Path) -> dict[str, bytes]:
        return {
            p.name: p.read_bytes()
            for p in sorted(root.glob("*/shards/*"))
            if p.suffix in (".bin", ".npy") or p.name.endswith(".json")
        }

    for name in ("a", "b"):
        pw.open_paired_windows(C4_TRAIN, toks["tiny"], toks["student"], seq_len=SEQ_LEN, store_dir=str(tmp_path / name))
    a, b = files(tmp_path / "a"), files(tmp_path / "b")
    assert a == b and len(a) == 2 * 5  # per unit: three streams, the record, the window index


def _jsonl(path: Path, docs: list[str]) -> str:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return str(path)


def test_a_document_one_side_cannot_round_trip_is_skipped_and_counted(toks, tmp_path, capsys):
    docs = unit_docs(C4[0])[:30]
    planted = docs[:10] + ["a planted \u2581 document"] + docs[10:]  # "▁" decodes as " " through Gemma's layout
    spec = _jsonl(tmp_path / "c4.jsonl", planted)
    capsys.readouterr()
    windows = pw.open_paired_windows(
        spec, toks["sentencepiece"], toks["student"], seq_len=SEQ_LEN, store_dir=str(tmp_path / "s")
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hld: warning: 1 document(s) of ") and "c4.jsonl, document 11:" in err[0]
    assert "'▁ document' decodes as '  document'" in err[0]
    m = windows.store.manifest
    assert (m["docs"], m["skipped"]) == (30, 1) and m["shards"][0]["skipped"] == 1
    text = "".join(_text(toks["student"], windows.window(w).student_ids[1:]) for w in range(len(windows)))
    assert "planted" not in text and text == "".join(d + "\x00" for d in docs)[: len(text)]


def test_the_first_documents_are_the_windows_within_them(toks, tmp_path):
    docs = unit_docs(C4[0])
    for max_docs in (20, len(docs) + 5):
        windows = pw.open_paired_windows(
            C4_TRAIN, toks["tiny"], toks["student"], seq_len=SEQ_LEN, store_dir=str(tmp_path), max_docs=max_docs
        )
        text = "".join(_text(toks["student"], windows.window(w).student_ids[1:]) for w in range(windows.offsets[1]))
        first = "".join(d + "\x00" for d in docs[:max_docs])
        assert first.startswith(text) and len(first) - len(text) < 4 * SEQ_LEN * 8  # under a window's text left
        if max_docs == 20:
            assert len(windows) == windows.offsets[1] and text.count("\x00") in (19, 20)
        else:
            assert windows.offsets[2] > windows.offsets[1]  # the next unit's documents too


def test_a_damaged_window_index_is_refused_in_one_line(toks, tmp_path):
    windows = pw.open_paired_windows(C4_TRAIN, toks["tiny"], toks["student"], seq_len=SEQ_LEN, store_dir=str(tmp_path))
    f = windows.store.index_file(0, SEQ_LEN, windows.teacher_seq_len)
    index = np.load(f)
    index[3, 2] += 1  # one window's teacher start, off by one token
    np.save(f, index)
    again = pw.PairedWindows(
        windows.store,
        seq_len=SEQ_LEN,
        teacher_pad_id=0,
        student_pad_id=0,
        teacher_vocab_size=len(toks["tiny"]),
        student_vocab_size=len(toks["student"]),
    )
    again.window(2)
    with pytest.raises(HldError, match=r"the window index .* is damaged \(window 3\)") as err:
        again.window(3)
    assert "delete" in err.value.fix
    f.unlink()  # cut again on the next open
    assert np.array_equal(
        pw.PairedWindows(
            windows.store,
            seq_len=SEQ_LEN,
            teacher_pad_id=0,
            student_pad_id=0,
            teacher_vocab_size=len(toks["tiny"]),
            student_vocab_size=len(toks["student"]),
        ).index[0],
        windows.index[0],
    )


def test_another_tokenizer_spec_is_another_store(toks):
    from tokenizers import pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from hld.fingerprint import tokenizer_fingerprint

    backend = type(toks["student"].backend_tokenizer).from_str(toks["student"].backend_tokenizer.to_str())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)  # same vocabulary
    other = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    assert other.get_vocab() == toks["student"].get_vocab()
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(toks["student"])  # the token store's key too
    paths = {
        pw.store_path(pw.identity(C4_TRAIN, toks["tiny"], s, "text")) for s in (toks["student"], other, toks["tiny"])
    }
    assert len(paths) == 3


def test_a_killed_build_resumes_without_redoing_committed_units(toks, tmp_path, monkeypatch):
    calls: list[int] = []
    real = pw.build_unit

    def dies_on_unit_1(spec, index, *args, **kwargs):
        calls.append(index)
        if index == 1:
            raise KeyboardInterrupt
        return real(spec, index, *args, **kwargs)

    monkeypatch.setattr(pw, "build_unit", dies_on_unit_1)
    with pytest.raises(KeyboardInterrupt):
        pw.open_paired(C4_TRAIN, toks["tiny"], toks["student"], store_dir=str(tmp_path))
    assert calls == [0] + [1]
    monkeypatch.setattr(pw, "build_unit", real)
    store = pw.open_paired(C4_TRAIN, toks["tiny"], toks["student"], store_dir=str(tmp_path))
    (path,) = tmp_path.glob(f"{pw.PROTOCOL}-*")
    assert not list(path.glob("shards/.*.tmp")) and store.manifest["complete"]
    fresh = pw.open_paired(C4_TRAIN, toks["tiny"], toks["student"], store_dir=str(tmp_path / "fresh"))
    assert fresh.manifest["shards"] == store.manifest["shards"]


def test_a_damaged_file_is_refused_before_its_first_read(toks, tmp_path):
    windows = pw.open_paired_windows(C4_TRAIN, toks["tiny"], toks["student"], seq_len=SEQ_LEN, store_dir=str(tmp_path))
    path = windows.store.path
    f = path / "shards" / "00000.teacher.bin"
    data = bytearray(f.read_bytes())
    data[100] ^= 1
    f.write_bytes(bytes(data))
    store = pw.PairedStore(path)
    with pytest.raises(HldError, match="does not match its checksum") as err:
        store.array(0, "teacher")
    assert "\n" not in err.value.line()
    f.write_bytes(bytes(data[:-4]))
    with pytest.raises(HldError, match="00000.teacher.bin is .* bytes, its manifest says"):
        pw.PairedStore(path)


def test_a_slow_tokenizer_is_refused_in_one_line(toks):
    slow = types.SimpleNamespace(is_fast=False, name_or_path="some/slow-tokenizer")
    with pytest.raises(HldError, match="student tokenizer 'some/slow-tokenizer' is a slow tokenizer"):
        pw.open_paired(C4_TRAIN, toks["tiny"], slow)


def test_hld_tokenize_builds_the_paired_stores(toks, tmp_path, capsys):
    from hld.cli import main

    toks["student"].save_pretrained(str(tmp_path / "tok"))
    argv = ["tokenize", "--config", "smoke", *tiny_overrides(), "--out", str(tmp_path / "stores"), "--json"]
    capsys.readouterr()
    assert main([*argv, "--student-tokenizer", str(tmp_path / "tok"), "--workers", "1", "--verify"]) == 0
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["stores"]
    assert [r["verified_shards"] for r in rows] == [2, 1]
    assert [r["what"] for r in rows] == ["data.train", "data.validation"]
    assert rows[0]["complete"] and rows[0]["docs"] == sum(len(unit_docs(p)) for p in C4) and rows[0]["skipped"] == 0
    assert all(Path(r["store"]).name.startswith(pw.PROTOCOL) for r in rows)


def test_hld_tokenize_refuses_a_slow_or_missing_student_tokenizer(tmp_path, capsys):
    from transformers import ByT5Tokenizer

    ByT5Tokenizer().save_pretrained(str(tmp_path / "byt5"))  # a Python tokenizer: no offsets
    (tmp_path / "empty").mkdir()
    argv = ["tokenize", "--config", "smoke", *tiny_overrides(), "--out", str(tmp_path / "stores")]
    one_line_error(capsys, [*argv, "--student-tokenizer", str(tmp_path / "byt5")], "is a slow tokenizer")
    one_line_error(capsys, [*argv, "--student-tokenizer", str(tmp_path / "empty")], "holds no tokenizer")
    assert not (tmp_path / "stores").exists()


@pytest.mark.slow
def test_gemma3_as_teacher_skips_a_planted_u2581_and_pairs_the_rest(toks, tmp_path, capsys):
    """Gemma 3's own tokenizer (the embedded GGUF, ~40 s to parse), the case C4 can hold."""
    from transformers import AutoTokenizer

    pytest.importorskip("gguf", reason="Gemma 3's tokenizer comes from the GGUF: pip install 'hld[gguf]'")
    try:
        from hld.models.loading import embedded_teacher_path

        path = embedded_teacher_path()
    except HldError as exc:
        pytest.skip(f"Gemma 3's tokenizer is not available offline: {exc}")
    gemma = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    docs = unit_docs(C4[0])
    spec = _jsonl(tmp_path / "c4.jsonl", docs[:5] + ["x \u2581 y"] + docs[5:])
    capsys.readouterr()
    windows = pw.open_paired_windows(spec, gemma, toks["student"], seq_len=SEQ_LEN, store_dir=str(tmp_path / "s"))
    err = capsys.readouterr().err
    assert windows.store.manifest["skipped"] == 1 and "1 document(s)" in err and "document 6:" in err
    stream, at = "".join(d + "\x00" for d in docs), 0
    for w in range(len(windows)):
        al = windows.window(w)
        assert al.teacher_ids[0] == gemma.bos_token_id
        text = _text(gemma, al.teacher_ids[1:])
        assert text == _text(toks["student"], al.student_ids[1:]) == stream[at : at + len(text)], w
        at += len(text)


def test_a_reader_assembles_what_array_tasks_committed(toks, tmp_path):
    ident = pw.identity(C4_TRAIN, toks["tiny"], toks["student"], "text")
    out = pw.store_path(ident, str(tmp_path))
    for task in (1, 0):  # two SLURM array tasks, each its unit; neither sees the other's commit at its end
        pw.build(C4_TRAIN, toks["tiny"], toks["student"], out, shard=(task, 2), quiet=True)
    (out / "manifest.json").unlink()
    store = pw.open_paired(C4_TRAIN, toks["tiny"], toks["student"], store_dir=str(tmp_path), may_build=False)
    one = pw.open_paired(C4_TRAIN, toks["tiny"], toks["student"], store_dir=str(tmp_path / "one"))
    assert store.manifest["complete"] and store.manifest["shards"] == one.manifest["shards"]
