"""`hld train-tokenizer` through the CLI: the directory it writes loads with `transformers.AutoTokenizer`
as a fast tokenizer with Gemma's special ids, spells every document of the sample corpus back and gives
offsets that cover it (checked here from `return_offsets_mapping`, not through hld's aligner); two
trainings are byte-identical; a failed write leaves nothing that looks complete; bad input is one line."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import numpy as np
import pytest

from helpers import one_line_error
from hld.cli import main
from hld.data.sources import iter_documents


def _train(capsys, out: Path, *extra: str) -> dict:
    capsys.readouterr()
    assert main(["train-tokenizer", "--data", "sample:train", "--out", str(out), "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("tok") / "bpe"
    args = ["train-tokenizer", "--data", "sample:train", "--vocab-size", "2000", "--out", str(out), "--json"]
    assert main(args) == 0
    return out, json.loads((out / "hld_tokenizer.json").read_text())


def test_the_directory_loads_and_spells_the_corpus_back(trained):
    from transformers import AutoTokenizer

    out, record = trained
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.is_fast and len(tok) == 2000 == record["vocab_size"]
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (0, 1, 2)
    docs = list(iter_documents("sample:train"))
    assert record["docs"] == len(docs) and record["chars"] == sum(map(len, docs))
    assert tok("a b").input_ids[0] == tok.bos_token_id  # with specials: BOS first, as Gemma's tokenizer
    enc = tok(docs, add_special_tokens=False, return_offsets_mapping=True)
    for doc, ids, offsets in zip(docs, enc["input_ids"], enc["offset_mapping"]):
        assert tok.decode(ids) == doc
        covered = np.zeros(len(doc) + 1, bool)
        for start, end in offsets:  # every character inside some token's span, none outside the text
            assert 0 <= start <= end <= len(doc)
            covered[start:end] = True
        assert covered[: len(doc)].all()
    # a character the corpus never shows, U+2581 and emoji included: bytes, never <unk>
    for text in ("\u2581x \U0001f600 日本 \u00a0\t\n", "<bos>"):
        assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text


def test_two_trainings_write_the_same_bytes(tmp_path, capsys):
    a = _train(capsys, tmp_path / "a", "--vocab-size", "600", "--max-docs", "300")
    b = _train(capsys, tmp_path / "b", "--vocab-size", "600", "--max-docs", "300")
    assert a["docs"] == b["docs"] == 300 and a["vocab_size"] == 600
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == ["hld_tokenizer.json", "tokenizer.json", "tokenizer_config.json"]
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_a_failed_write_leaves_no_directory(tmp_path, capsys, monkeypatch):
    from transformers import PreTrainedTokenizerFast

    def full_disk(self, directory, **kwargs):
        (Path(directory) / "tokenizer.json").write_text("{")  # half written
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", full_disk)
    out = tmp_path / "tok"
    line = one_line_error(
        capsys,
        ["train-tokenizer", "--data", "sample:train", "--vocab-size", "300", "--max-docs", "20", "--out", str(out)],
        "No space left on device",
    )
    assert "free disk space" in line
    assert list(tmp_path.iterdir()) == []  # neither the directory nor its temporary sibling


@pytest.mark.parametrize(
    "flags, problem",
    [
        (["--vocab-size", "100"], "--vocab-size 100 is outside 259.."),
        (["--vocab-size", "300", "--max-docs", "0"], "--max-docs 0 is not a positive number"),
        (["--vocab-size", "300", "--data", "/nonexistent/c4-*.json.gz"], "matches no file"),
    ],
)
def test_bad_flags_are_one_line(tmp_path, capsys, flags, problem):
    argv = ["train-tokenizer", "--data", "sample:train", "--out", str(tmp_path / "tok"), *flags]
    one_line_error(capsys, argv, problem)
    assert not (tmp_path / "tok").exists()


def test_an_out_that_is_not_new_is_refused(tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    (tmp_path / "file").write_text("mine")
    for out, problem in ((tmp_path / "full", "exists and is not empty"), (tmp_path / "file", "is not a directory")):
        argv = ["train-tokenizer", "--data", "sample:train", "--vocab-size", "300", "--out", str(out)]
        one_line_error(capsys, argv, problem)
    assert (tmp_path / "full" / "notes.txt").read_text() == "mine" and (tmp_path / "file").read_text() == "mine"
