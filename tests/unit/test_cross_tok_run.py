"""A student with its own tokenizer, the run's side (issue 34, items 5, 6, 8): the config keys and their
checks, batches of paired windows, their order, validation in bits per character, the budget in whole
steps and the teacher's FLOPs per student token. Each against a computation of its own: labels and masks
from the window lengths by hand, bits per character from the decoded text's length, FLOPs from the
teacher's per-token count scaled by hand."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from helpers import TINY_TEACHER
from hld.config import RunConfig, load_config, resume_view, to_dict
from hld.data.align import Alignment
from hld.data.packing import IGNORE, make_paired_batch
from hld.errors import HldError


def _rows(student_lengths=(5, 3), teacher_lengths=(4, 6), T_s=6, T_t=7):
    """Hand-made paired rows: window b holds `student_lengths[b]` student ids (BOS 2 first, then 10, 11, ...)
    and `teacher_lengths[b]` teacher ids, padded with 0."""
    B = len(student_lengths)
    s = np.zeros((B, T_s), np.int64)
    t = np.zeros((B, T_t), np.int64)
    als = []
    for b, (ls, lt) in enumerate(zip(student_lengths, teacher_lengths)):
        s[b, :ls] = [2] + list(range(10 + b, 10 + b + ls - 1))
        t[b, :lt] = [2] + list(range(20 + b, 20 + b + lt - 1))
        # chunk 0 the BOS pair, then one chunk of the rest on each side
        als.append(
            Alignment(
                t[b, :lt].astype(np.int32),
                s[b, :ls].astype(np.int32),
                np.array([0, 1, lt], np.int32),
                np.array([0, 1, ls], np.int32),
                np.array([0, 0, 3 * (b + 1)], np.int32),
            )
        )
    return SimpleNamespace(
        student_ids=s,
        teacher_ids=t,
        student_lengths=np.array(student_lengths),
        teacher_lengths=np.array(teacher_lengths),
        alignments=als,
    )


def test_a_paired_batch_predicts_each_next_student_token_and_nothing_past_the_window():
    rows = _rows()
    batch = make_paired_batch(rows, window_ids=np.array([7, 3]))
    for b, n in enumerate(rows.student_lengths):
        want = [int(x) for x in rows.student_ids[b, 1:n]] + [IGNORE] * (rows.student_ids.shape[1] - n + 1)
        assert batch.labels[b].tolist() == want
    assert batch.n_targets == sum(n - 1 for n in rows.student_lengths) == 6
    assert torch.equal(batch.teacher_ids, torch.from_numpy(rows.teacher_ids))
    # the teacher's own positions: its window's tokens, not its padding
    for b, n in enumerate(rows.teacher_lengths):
        assert batch.teacher_mask[b].tolist() == [i < n for i in range(rows.teacher_ids.shape[1])]


def test_a_paired_batch_splits_and_moves_with_its_teacher_rows_and_alignments():
    rows = _rows(student_lengths=(5, 3, 4, 2), teacher_lengths=(4, 6, 2, 3))
    batch = make_paired_batch(rows, window_ids=np.arange(4))
    parts = batch.split(2)
    assert [p.alignments for p in parts] == [rows.alignments[:2], rows.alignments[2:]]
    assert torch.equal(torch.cat([p.teacher_ids for p in parts]), batch.teacher_ids)
    assert sum(p.n_targets for p in parts) == batch.n_targets
    head = batch.first(3)
    assert head.alignments == rows.alignments[:3] and head.teacher_ids.shape[0] == 3
    moved = batch.to(torch.device("cpu"))
    assert moved.paired and moved.alignments is batch.alignments and moved.n_targets == batch.n_targets
    with pytest.raises(ValueError, match="cannot be cut"):
        batch.truncate(2)


def test_validation_in_bits_per_character_is_the_nll_over_the_texts_length():
    from hld.data.paired import PairedRows, PairedSample
    from hld.eval.perplexity import summary

    r = _rows()
    sample = PairedSample(PairedRows(r.teacher_ids, r.student_ids, r.teacher_lengths, r.student_lengths, r.alignments))
    assert sample.chars.tolist() == [3, 6] and len(sample) == 2 and sample.shape == (2, 6)
    assert len(sample[1:]) == 1 and sample[1:].chars.tolist() == [6]
    got = summary(12.0, 6, sample)
    assert got["bpc"] == pytest.approx(12.0 / math.log(2) / 9)
    assert got["loss"] == pytest.approx(2.0)
    assert "bpc" not in summary(12.0, 6, np.zeros((2, 6)))


def test_config_keys_at_their_defaults_leave_an_earlier_run_the_same_run():
    now = to_dict(RunConfig())
    before = copy.deepcopy(now)
    del before["student"]["tokenizer"], before["objective"]["cross_tokenizer"]
    assert resume_view(before) == resume_view(now)
    changed = copy.deepcopy(now)
    changed["student"]["tokenizer"] = "sample-bpe-8k"
    assert resume_view(changed) != resume_view(now)
    changed = copy.deepcopy(now)
    changed["objective"]["cross_tokenizer"]["loss"] = "alm"
    assert resume_view(changed)["objective"]["cross_tokenizer"]["loss"] == "alm"
    # the sections a resume may change are still left out
    assert "log" not in resume_view(now) and "memory_check" not in resume_view(now)["train"]


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["student.preset=depth-2"], "embedding and head are its teacher's"),
        (["teacher.cache=/tmp/x", "objective.cross_tokenizer.uld_top_k=null"], "uld_top_k=null: a per-chunk"),
        (["teacher.cache=/tmp/x", "teacher.cache_signal=sampled"], "not draws of the teacher's tokens"),
        (["objective.top_k=8"], "keep their own top-k"),
        (["objective.method=hld-joint", "objective.hidden.loss=lens"], "pooled per aligned chunk"),
        (["objective.cross_tokenizer.alm_temperature=0"], "alm_temperature=0"),
        (["objective.cross_tokenizer.loss=bleu"], "not one of"),
    ],
)
def test_what_a_student_with_its_own_tokenizer_cannot_do_is_one_line(overrides, words):
    with pytest.raises(HldError) as exc:
        load_config("demo", ["student.tokenizer=sample-bpe-8k", *overrides])
    assert words in str(exc.value) and "\n" not in str(exc.value)


def test_the_cross_tokenizer_keys_load_and_ce_ignores_them():
    cfg = load_config("demo", ["student.tokenizer=sample-bpe-8k", "objective.cross_tokenizer.loss=gold"])
    assert cfg.student.tokenizer == "sample-bpe-8k" and cfg.objective.cross_tokenizer.loss == "gold"
    from hld.study.spec import ignores

    assert ignores("ce", "objective.cross_tokenizer.loss") and not ignores("kd", "objective.cross_tokenizer.loss")
    assert ignores("kd", "objective.cross_tokenizer.pooling") and not ignores(
        "hld-joint", "objective.cross_tokenizer.pooling"
    )


def test_a_run_of_paired_windows_ends_on_a_whole_step_within_its_budget():
    from hld.distill.objectives import Phase, Plan
    from hld.distill.signals import Needs
    from hld.flops import StepCost
    from hld.train.budget import run_length

    cfg = load_config("demo", ["budget.tokens=1200", "train.batch_size=2", "data.seq_len=128"])
    plan = Plan([Phase("kd", 1.0, SimpleNamespace(needs=Needs(), student_layers=()))])  # type: ignore[arg-type]
    costs = {"kd": StepCost(student=1.0, teacher=0.0, projectors=0.0)}
    cut = run_length(cfg, plan, costs)
    assert (cut.steps, cut.last_len) == (5, (1200 - 4 * 256) // 2)  # the last step cut to 88 positions
    whole = run_length(cfg, plan, costs, whole_steps=True)
    assert (whole.steps, whole.last_len) == (4, 128)  # 1,024 <= 1,200 tokens: the cut step dropped


def test_the_teachers_flops_per_student_token_scale_with_its_window_length():
    from transformers import AutoConfig

    from hld.flops import forward_flops_per_token, step_cost
    from hld.models.loading import meta_causal_lm

    with torch.device("meta"):
        teacher = meta_causal_lm(AutoConfig.from_pretrained(str(TINY_TEACHER)))
        student = meta_causal_lm(AutoConfig.from_pretrained(str(TINY_TEACHER)))
    same = step_cost(student, 32, teacher=teacher)
    other = step_cost(student, 32, teacher=teacher, teacher_seq_len=48)
    assert same.teacher == forward_flops_per_token(teacher, 32)
    assert other.teacher == pytest.approx(forward_flops_per_token(teacher, 48) * 48 / 32)
    assert other.student == same.student


def test_a_tokenizer_directory_without_a_tokenizer_is_one_line(tmp_path):
    from hld.train.resources import Resources

    with pytest.raises(HldError) as exc:
        Resources().tokenizer(str(tmp_path), "student.tokenizer")
    assert (
        "\n" not in str(exc.value) and "student.tokenizer" in str(exc.value) and "holds no tokenizer" in str(exc.value)
    )


def test_the_shipped_student_tokenizer_round_trips_and_knows_gemmas_specials():
    from hld.train.resources import Resources

    tok = Resources().tokenizer("sample-bpe-8k", "student.tokenizer")
    assert len(tok) == 8192 and (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (0, 1, 2)
    text = "Hello — naïve café, 東京 🙂  tabs\tand  spaces"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_gold_without_a_shared_vocabulary_is_one_line(monkeypatch):
    """Two tokenizers that spell nothing alike (the shared vocabulary stubbed empty: real byte-level tokenizers
    always share their single characters) leave gold no exact part: refused before training, uld and alm not."""
    from hld.distill.cross_tok import vocab as cv
    from hld.train import assembly
    from hld.train.resources import Resources

    empty = cv.SharedVocab(np.zeros(0, np.int64), np.zeros(0, np.int64), 10, 10)
    monkeypatch.setattr(cv, "shared_vocab", lambda t, s: empty)
    assembly._SHARED.clear()
    tok = Resources().tokenizer("sample-bpe-8k", "student.tokenizer")
    cfg = load_config("demo", ["student.tokenizer=sample-bpe-8k", "objective.cross_tokenizer.loss=gold"])
    with pytest.raises(HldError) as exc:
        assembly.cross_plan(cfg, None, tok, tok, None)
    assert "share none" in str(exc.value) and "loss=uld or alm" in str(exc.value) and "\n" not in str(exc.value)
    uld = load_config("demo", ["student.tokenizer=sample-bpe-8k", "objective.cross_tokenizer.loss=uld"])
    assert assembly.cross_plan(uld, None, tok, tok, None).phases[0].name == "kd"
    assembly._SHARED.clear()
