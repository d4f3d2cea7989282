"""hld.data.align against an independent check: each side's token boundaries are found by decoding every
prefix of its tokens (a prefix that decodes to a prefix of the text ends at a boundary; a cut inside a
character decodes to U+FFFD), never from offsets. For every chunk the teacher's tokens decode to the
text's substring and so do the student's; the chunks partition both sequences; and the chunk boundaries
are exactly the positions both sides can cut at (the finest partition).

Tokenizers: the shipped byte-level tiny tokenizer; a SentencePiece-style BPE with byte fallback (Gemma's
conventions: spaces become "▁" inside the next token, unknown characters become <0xNN> pieces) and a
GPT-2-style byte-level BPE whose post-processor trims offsets, both trained here on the C4 sample; and
Gemma 3's own (from the embedded GGUF, `slow`: parsing its 262k vocabulary takes ~40 s)."""

from __future__ import annotations

import types

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer

from helpers import ASSETS, SPECIALS, corpus, gpt2_bpe, sentencepiece_bpe, wrap
from hld.data.align import PROBES, Aligner, align_offsets, cut_points
from hld.errors import HldError

ADVERSARIAL = {
    "ascii": "The quick brown fox, 42 times! (x_y) [z]",
    "whitespace runs": "a  b   c\t\td\n\n\ne \r\n f\u00a0g\u3000h    ",
    "leading and trailing spaces": "   lead and trail   ",
    "NFC accents": "café naïve Ångström façade",
    "NFD accents": "cafe\u0301 nai\u0308ve A\u030angstro\u0308m",
    "combining marks stacked": "a\u0301\u0323\u0308 Z\u0351\u0352\u0353",
    "byte fallback": "\U0001d518\U00010348\U00013000 \U0001f9ec \u2603",
    "emoji": "I \u2764\ufe0f it \U0001f600\U0001f44d\U0001f3fd",
    "ZWJ family": "\U0001f468\u200d\U0001f469\u200d\U0001f467\u200d\U0001f466 \U0001f3f3\ufe0f\u200d\U0001f308",
    "flags": "\U0001f1eb\U0001f1f7\U0001f1ef\U0001f1f5 \U0001f1fa\U0001f1f8",
    "CJK": "日本語の文章です。中文句子。한국어 문장.",
    "RTL": "שלום עולם مرحبا بالعالم",
    "mixed direction": "abc \u05d0\u05d1\u05d2 123 \u202edef\u202c",
    "zero width": "a\u200bb\ufeffc\u200cd",
    "special-token text": "<bos> <eos><pad> <0x41> <unk>",
    "byte-level symbols": "Ġ Ċ ĉ",
    "empty": "",
    "one character": "x",
    "one space": " ",
    "one emoji": "\U0001f600",
    "one newline": "\n",
}

ALPHABETS = [
    list("abcdefXYZ0123,.!?-_'\"()"),
    [" ", "  ", "\t", "\n", "\r\n", "\u00a0", "\u3000"],
    list("éèñüçÅøß") + ["e\u0301", "o\u0308", "\u0327"],
    list("日本語中文字한국어ひらカタ。"),
    list("שלוםمرحبا"),
    [
        "\U0001f600",
        "\u2764\ufe0f",
        "\U0001f44d\U0001f3fd",
        "\U0001f468\u200d\U0001f469\u200d\U0001f467",
        "\U0001f1eb\U0001f1f7",
    ],
    ["\U0001d518", "\U00010348", "\U00013000", "\u200b", "\u200d", "\ufeff"],
    ["<bos>", "<eos>", "<0x41>", "<"],
]


@pytest.fixture(scope="module")
def tokenizers() -> dict:
    return {
        "tiny": AutoTokenizer.from_pretrained(str(ASSETS / "tiny_tokenizer")),
        "sentencepiece": sentencepiece_bpe(),
        "gpt2": gpt2_bpe(),
    }


@pytest.fixture(scope="module")
def gemma():
    """Gemma 3's tokenizer from the embedded GGUF (no network)."""
    pytest.importorskip("gguf", reason="Gemma 3's tokenizer comes from the GGUF: pip install 'hld[gguf]'")
    try:
        from hld.models.loading import embedded_teacher_path

        path = embedded_teacher_path()
    except HldError as exc:
        pytest.skip(f"Gemma 3's tokenizer is not available offline: {exc}")
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def decode(tok, ids) -> str:
    return tok.decode(list(map(int, ids)), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def decoded_boundaries(tok, ids, text: str) -> set[int]:
    """The character positions where a prefix of the tokens spells a prefix of the text."""
    cuts = set()
    for k in range(len(ids) + 1):
        prefix = decode(tok, ids[:k])
        if text.startswith(prefix):
            cuts.add(len(prefix))
    return cuts


def check(aligner: Aligner, teacher, student, text: str, *, finest: bool = True) -> None:
    al = aligner(text)
    tb, sb, cb = al.teacher_bounds, al.student_bounds, al.char_bounds
    assert tb.dtype == sb.dtype == cb.dtype == np.int32
    assert tb[0] == sb[0] == cb[0] == 0
    assert (tb[-1], sb[-1], cb[-1]) == (len(al.teacher_ids), len(al.student_ids), len(text))
    assert (np.diff(tb) >= 1).all() and (np.diff(sb) >= 1).all()  # every chunk has tokens on both sides
    first = 1 if aligner.bos else 0
    if aligner.bos:  # chunk 0: the two BOSes and no text
        assert (tb[1], sb[1], cb[1]) == (1, 1, 0)
        assert (al.teacher_ids[0], al.student_ids[0]) == (teacher.bos_token_id, student.bos_token_id)
    assert (np.diff(cb[first:]) >= 1).all()  # every text chunk has text
    for c in range(first, al.n_chunks):
        piece = text[cb[c] : cb[c + 1]]
        assert decode(teacher, al.teacher_ids[tb[c] : tb[c + 1]]) == piece, (c, piece)
        assert decode(student, al.student_ids[sb[c] : sb[c + 1]]) == piece, (c, piece)
    assert "".join(text[cb[c] : cb[c + 1]] for c in range(al.n_chunks)) == text
    if finest:
        t_ids, s_ids = al.teacher_ids[first:], al.student_ids[first:]
        both = decoded_boundaries(teacher, t_ids, text) & decoded_boundaries(student, s_ids, text)
        assert sorted(both) == cb[first:].tolist()


PAIRS = [("sentencepiece", "tiny"), ("sentencepiece", "gpt2"), ("gpt2", "tiny"), ("tiny", "sentencepiece")]


@pytest.mark.parametrize("case", list(ADVERSARIAL))
@pytest.mark.parametrize("pair", PAIRS, ids="-".join)
def test_adversarial_text_aligns_chunk_by_chunk(tokenizers, pair, case):
    teacher, student = tokenizers[pair[0]], tokenizers[pair[1]]
    check(Aligner(teacher, student), teacher, student, ADVERSARIAL[case])


def random_texts(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    texts = []
    for _ in range(n):
        picks = rng.integers(0, len(ALPHABETS), size=int(rng.integers(1, 30)))
        texts.append("".join(ALPHABETS[a][rng.integers(0, len(ALPHABETS[a]))] for a in picks))
    return texts


@pytest.mark.parametrize("pair", PAIRS[:3], ids="-".join)
def test_random_mixed_alphabet_texts_align(tokenizers, pair):
    teacher, student = tokenizers[pair[0]], tokenizers[pair[1]]
    aligner = Aligner(teacher, student, bos=False)
    for text in random_texts(150, seed=sum(map(ord, "".join(pair)))):
        check(aligner, teacher, student, text)


def test_a_batch_of_corpus_documents_is_the_documents_aligned_one_by_one(tokenizers):
    teacher, student = tokenizers["sentencepiece"], tokenizers["tiny"]
    aligner = Aligner(teacher, student, eos=True)
    docs = corpus(12)
    for doc, al in zip(docs, aligner.batch(docs)):
        one = aligner(doc)
        for name in ("teacher_ids", "student_ids", "teacher_bounds", "student_bounds", "char_bounds"):
            assert np.array_equal(getattr(al, name), getattr(one, name))
        assert (al.teacher_ids[-1], al.student_ids[-1]) == (teacher.eos_token_id, student.eos_token_id)
        assert al.char_bounds[-2] == al.char_bounds[-1] == len(doc)  # the EOS chunk: no text
        ids = teacher(doc, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        assert al.teacher_ids[1:-1].tolist() == ids  # the data path's ids, BOS and EOS aside
    check(Aligner(teacher, student), teacher, student, docs[0], finest=False)


def test_trimmed_offsets_are_untrimmed_and_the_callers_tokenizer_left_alone(tokenizers):
    gpt2 = tokenizers["gpt2"]
    text = "a  b c"
    trimmed = gpt2(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    assert any(s == e for s, e in trimmed)  # what trimming does: a lone "Ġ" gets an empty span
    aligner = Aligner(gpt2, tokenizers["tiny"])
    check(aligner, gpt2, tokenizers["tiny"], text)
    assert gpt2(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"] == trimmed


def test_cut_points_on_offsets_that_overlap_or_are_empty():
    # "ab😀c": byte pieces of 😀 share its span; an empty span at 2 and one at the end
    offsets = np.array([[0, 1], [1, 2], [2, 2], [2, 3], [2, 3], [2, 3], [2, 3], [3, 4], [4, 4]])
    k, p = cut_points(offsets, 4)
    assert k.tolist() == [0, 1, 2, 7, 9] and p.tolist() == [0, 1, 2, 3, 4]  # the empty span joins the chunk at 2
    tb, sb, cb = align_offsets(offsets, np.array([[0, 2], [2, 4]]), 4)
    assert (tb.tolist(), sb.tolist(), cb.tolist()) == ([0, 2, 9], [0, 1, 2], [0, 2, 4])
    assert [x.tolist() for x in align_offsets(np.zeros((0, 2)), np.zeros((0, 2)), 0)] == [[0], [0], [0]]


@pytest.mark.parametrize(
    "offsets", [[[0, 1], [2, 3]], [[1, 2], [2, 3]], [[0, 1], [1, 2]], []], ids=["gap", "late start", "short", "none"]
)
def test_offsets_that_leave_text_uncovered_are_refused(offsets):
    with pytest.raises(ValueError, match="cover|no tokens"):
        cut_points(np.array(offsets, dtype=np.int64).reshape(-1, 2), 3)


def test_a_slow_tokenizer_is_refused_in_one_line(tokenizers):
    slow = types.SimpleNamespace(is_fast=False, name_or_path="some/slow-tokenizer")
    with pytest.raises(HldError) as err:
        Aligner(slow, tokenizers["tiny"])
    assert "teacher tokenizer 'some/slow-tokenizer'" in err.value.problem and "offsets" in err.value.problem
    assert "use_fast=True" in err.value.fix and "\n" not in err.value.line()


@pytest.mark.parametrize("normalizer", [normalizers.Lowercase(), normalizers.NFKC(), normalizers.NFD()])
def test_a_normalizer_that_changes_text_is_refused_in_one_line(tokenizers, normalizer):
    tok = Tokenizer.from_str(tokenizers["tiny"].backend_tokenizer.to_str())
    tok.normalizer = normalizer
    with pytest.raises(HldError) as err:
        Aligner(tokenizers["tiny"], wrap(tok, "lowering-tokenizer"))
    assert "student tokenizer 'lowering-tokenizer' does not reproduce text" in err.value.problem
    assert "normalizer" in err.value.fix and "\n" not in err.value.line()


def test_a_document_one_side_cannot_round_trip_is_refused_in_one_line(tokenizers):
    # Gemma's convention: the normaliser writes a space as "▁", so the text "▁" itself decodes as a space
    aligner = Aligner(tokenizers["sentencepiece"], tokenizers["tiny"])
    aligner("a b")
    with pytest.raises(HldError) as err:
        aligner.batch(["fine", "a\u2581b"])
    assert "teacher tokenizer 'test-sentencepiece-bpe' cannot round-trip text 1" in err.value.problem
    assert "'▁b' decodes as ' b'" in err.value.problem and "\n" not in err.value.line()
    # no byte fallback: a character outside the vocabulary becomes <unk>
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
    tok.decoder = decoders.Metaspace(prepend_scheme="never")
    pieces = [*ADVERSARIAL.values(), *PROBES]
    tok.train_from_iterator(pieces, trainers.BpeTrainer(special_tokens=SPECIALS, show_progress=False))
    aligner = Aligner(tokenizers["tiny"], wrap(tok, "no-byte-fallback"), check=True)
    with pytest.raises(HldError, match="student tokenizer 'no-byte-fallback' cannot round-trip text 0"):
        aligner("Ω")
    assert Aligner(tokenizers["tiny"], wrap(tok, "no-byte-fallback"), check=False)("Ω").n_chunks == 2


def test_bos_without_a_bos_token_is_refused(tokenizers):
    bare = Tokenizer.from_str(tokenizers["tiny"].backend_tokenizer.to_str())
    with pytest.raises(HldError, match="has no BOS token"):
        Aligner(bare, tokenizers["tiny"])
    assert Aligner(bare, tokenizers["tiny"], bos=False)("ab").n_chunks >= 1


@pytest.mark.slow
@pytest.mark.parametrize("student", ["tiny", "sentencepiece", "gpt2"])
def test_gemma3_teacher_aligns_adversarial_and_random_text(gemma, tokenizers, student):
    aligner = Aligner(gemma, tokenizers[student])
    for text in [*ADVERSARIAL.values(), *random_texts(100, seed=3)]:
        check(aligner, gemma, tokenizers[student], text)
    with pytest.raises(HldError, match="teacher tokenizer .* cannot round-trip"):
        aligner("a\u2581b")


class FakeEncoding:
    """What `Aligner.from_encodings` reads of a `tokenizers.Encoding`."""

    def __init__(self, ids: list[int], offsets: list[tuple[int, int]]) -> None:
        self.ids, self.offsets = ids, offsets

    def __len__(self) -> int:
        return len(self.ids)


def test_offsets_with_a_gap_are_refused_in_one_line_naming_the_side(tokenizers):
    aligner = Aligner(tokenizers["tiny"], tokenizers["sentencepiece"])
    good, gap = FakeEncoding([5, 6], [(0, 1), (1, 3)]), FakeEncoding([5, 6], [(0, 1), (2, 3)])
    assert aligner.from_encodings("abc", good, good).n_chunks == 3  # BOS, "a", "bc"
    with pytest.raises(HldError) as err:
        aligner.from_encodings("abc", good, gap)
    assert "student tokenizer 'test-sentencepiece-bpe' gives offsets that do not cover a text of 3" in err.value.problem
    assert "\n" not in err.value.line()
