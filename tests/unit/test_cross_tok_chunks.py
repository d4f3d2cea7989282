"""hld.distill.cross_tok.chunks: an alignment's chunks as flat rows of a batch, checked against rows
written out by hand, against a loop, and on real tokenizers against decoding: the rows that predict a
chunk have read exactly the text before it, on both sides."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import bounds_alignment, corpus, gpt2_bpe, sentencepiece_bpe
from hld.data.align import Aligner
from hld.distill.cross_tok.chunks import Chunks, token_rows


def test_two_windows_by_hand():
    # window 0: chunks (1 | 1), (3 | 1), (1 | 2); window 1: (1 | 1), (1 | 3)
    als = [bounds_alignment([0, 1, 4, 5], [0, 1, 2, 4]), bounds_alignment([0, 1, 2], [0, 1, 4])]
    ch = Chunks.from_alignments(als, teacher_len=6, student_len=5)
    assert ch.teacher_start.tolist() == [0, 1, 4, 6, 7]
    assert ch.teacher_end.tolist() == [1, 4, 5, 7, 8]
    assert ch.student_start.tolist() == [0, 1, 2, 5, 6]
    assert ch.student_end.tolist() == [1, 2, 4, 6, 9]
    assert ch.first.tolist() == [True, False, False, True, False]
    assert ch.one_to_one.tolist() == [True, False, False, True, False]
    pred = ch.predicted()
    assert len(pred) == 3
    assert pred.teacher_pred_rows.tolist() == [0, 3, 6]  # the last teacher row of the chunk before
    assert pred.student_pred_rows.tolist() == [0, 1, 5]


def test_a_window_longer_than_its_rows_is_refused():
    with pytest.raises(ValueError, match="more than the rows"):
        Chunks.from_alignments([bounds_alignment([0, 1, 4], [0, 1, 2])], teacher_len=3, student_len=8)


def test_token_rows_against_a_loop():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 5, (12,), generator=g)
    start = torch.cumsum(lengths, 0) - lengths + torch.randint(0, 3, (12,), generator=g).cumsum(0)  # with gaps
    end = start + lengths
    rows, chunk = token_rows(start, end)
    want_rows = [r for s, e in zip(start.tolist(), end.tolist()) for r in range(s, e)]
    want_chunk = [c for c, (s, e) in enumerate(zip(start.tolist(), end.tolist())) for _ in range(s, e)]
    assert rows.tolist() == want_rows
    assert chunk.tolist() == want_chunk


@pytest.fixture(scope="module")
def pair():
    return sentencepiece_bpe(vocab_size=1500, n_docs=80), gpt2_bpe(vocab_size=350, n_docs=80)


def test_predicting_rows_have_read_the_same_text_on_both_sides(pair):
    teacher, student = pair
    texts = [d[:300] for d in corpus(6)] + ["naïve 日本語 \U0001f600 a  b"]
    als = Aligner(teacher, student).batch(texts)
    T_t = max(len(a.teacher_ids) for a in als) + 3
    T_s = max(len(a.student_ids) for a in als) + 2
    ch = Chunks.from_alignments(als, teacher_len=T_t, student_len=T_s).predicted()
    t_flat = np.full(len(als) * T_t, -1, np.int64)
    s_flat = np.full(len(als) * T_s, -1, np.int64)
    for b, a in enumerate(als):
        t_flat[b * T_t : b * T_t + len(a.teacher_ids)] = a.teacher_ids
        s_flat[b * T_s : b * T_s + len(a.student_ids)] = a.student_ids
    n_one = n_multi = 0
    for i in range(len(ch)):
        tr, sr = int(ch.teacher_pred_rows[i]), int(ch.student_pred_rows[i])
        b = tr // T_t
        assert sr // T_s == b
        t_prefix = teacher.decode(t_flat[b * T_t + 1 : tr + 1].tolist())  # after the BOS, up to the row
        s_prefix = student.decode(s_flat[b * T_s + 1 : sr + 1].tolist())
        assert t_prefix == s_prefix and texts[b].startswith(t_prefix)
        t_piece = teacher.decode(t_flat[int(ch.teacher_start[i]) : int(ch.teacher_end[i])].tolist())
        s_piece = student.decode(s_flat[int(ch.student_start[i]) : int(ch.student_end[i])].tolist())
        assert t_piece == s_piece and texts[b][len(t_prefix) :].startswith(t_piece)
        if bool(ch.one_to_one[i]):
            n_one += 1
        else:
            n_multi += 1
    assert n_one > 20 and n_multi > 20  # both kinds of chunk occur
