"""hld.distill.cross_tok.vocab on tokenizers trained in the test: one tokenizer against itself is the
identity on every id the corpus uses; across a SentencePiece-style and a byte-level tokenizer, every chunk
the aligner finds to be one token on each side (an independent path: offsets, not decoding) pairs two ids
that the map pairs; a decoder that strips the first space (Llama's) maps like one that does not; byte
fallback pieces that duplicate a character defer to the tokenizer's own encoding."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from tokenizers import decoders, pre_tokenizers

from helpers import corpus, gpt2_bpe, sentencepiece_bpe, wrap
from hld.data.align import Aligner
from hld.distill.cross_tok.chunks import Chunks
from hld.distill.cross_tok.vocab import shared_vocab, token_texts


@pytest.fixture(scope="module")
def tokenizers():
    return sentencepiece_bpe(vocab_size=1500, n_docs=80), gpt2_bpe(vocab_size=700, n_docs=80)


def texts() -> list[str]:
    return [d[:400] for d in corpus(30)]


def test_a_tokenizer_against_itself_is_the_identity_on_what_the_corpus_uses(tokenizers):
    sp, _ = tokenizers
    v = shared_vocab(sp, sp)
    assert (v.teacher_ids == v.student_ids).all()
    assert v.teacher_vocab_size == v.student_vocab_size == len(sp)
    used = {i for t in texts() for i in sp(t, add_special_tokens=False)["input_ids"]}
    fragments = {sp.convert_tokens_to_ids(f"<0x{b:02X}>") for b in range(0x80, 0x100)}  # pieces of characters
    assert used - fragments <= set(v.teacher_ids.tolist())
    specials = set(sp.all_special_ids)
    assert not specials & set(v.teacher_ids.tolist())


def test_one_token_chunks_pair_ids_the_map_pairs(tokenizers):
    sp, bl = tokenizers
    v = shared_vocab(sp, bl)
    assert len(set(v.teacher_ids.tolist())) == len(v) == len(set(v.student_ids.tolist()))  # one-to-one
    pairs = set(zip(v.teacher_ids.tolist(), v.student_ids.tolist()))
    als = Aligner(sp, bl).batch(texts())
    T_t = max(len(a.teacher_ids) for a in als)
    T_s = max(len(a.student_ids) for a in als)
    ch = Chunks.from_alignments(als, teacher_len=T_t, student_len=T_s).predicted()
    one = ch.select(ch.one_to_one)
    t_flat = np.concatenate([np.pad(a.teacher_ids, (0, T_t - len(a.teacher_ids))) for a in als])
    s_flat = np.concatenate([np.pad(a.student_ids, (0, T_s - len(a.student_ids))) for a in als])
    seen = set(zip(t_flat[one.teacher_start.numpy()].tolist(), s_flat[one.student_start.numpy()].tolist()))
    assert len(seen) > 100
    assert seen <= pairs
    t_the, s_the = sp.convert_tokens_to_ids("▁the"), bl.convert_tokens_to_ids("Ġthe")
    assert (t_the, s_the) in pairs


def test_a_decoder_that_strips_the_first_space_maps_the_same(tokenizers):
    sp, bl = tokenizers
    llama = copy.deepcopy(sp.backend_tokenizer)
    llama.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    llama.decoder = decoders.Sequence([sp.backend_tokenizer.decoder, decoders.Strip(" ", 1, 0)])
    assert wrap(llama, "llama-like").decode([sp.convert_tokens_to_ids("▁the")]) == "the"  # stripped alone
    a, b = shared_vocab(sp, bl), shared_vocab(wrap(llama, "llama-like"), bl)
    assert (a.teacher_ids == b.teacher_ids).all() and (a.student_ids == b.student_ids).all()


def test_byte_fallback_duplicates_defer_to_the_tokenizers_encoding(tokenizers):
    sp, _ = tokenizers
    texts_of = token_texts(sp)
    a, byte_a = sp.convert_tokens_to_ids("a"), sp.convert_tokens_to_ids("<0x61>")
    assert sp.decode([byte_a]) == sp.decode([a]) == "a"
    assert texts_of["a"] == a and byte_a not in texts_of.values()
    assert sp.convert_tokens_to_ids("<0xC3>") not in texts_of.values()  # half of "é": no text alone
