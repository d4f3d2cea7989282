"""Align a teacher's and a student's tokens of one text through character offsets (issue 34, item 1).

Both tokenizers read the same text. A **chunk** is a run of teacher tokens and a run of student tokens
that cover exactly the same characters: chunk c is teacher tokens [tb[c], tb[c+1]), student tokens
[sb[c], sb[c+1]) and the text text[cb[c]:cb[c+1]]. Chunks partition both token sequences in order; a
boundary sits at every character position where *both* sides have a token boundary (the finest such
partition: ALM, arXiv 2503.20083; the span matching of MinED / FuseLLM).

A side's token boundary at character p, between tokens k-1 and k, means every token before k ends at or
before p and every token from k on starts at or after p: with `end` the running maximum of the token
ends and `start` the running minimum of the starts from the right, `end[k-1] == start[k] == p`. That
one test handles what makes offsets lie:
- byte-fallback pieces (`<0xF0>` … of one character) and byte-level pieces all carry that character's
  span, so no boundary falls between them;
- overlapping or empty spans (an empty span never opens a boundary inside another token's span; one at
  a boundary joins the chunk that starts there);
- SentencePiece's "▁" (Gemma puts a space into the next token, its span includes the space) and
  byte-level BPE's "Ġ" need nothing special once offsets are not trimmed: a byte-level post-processor's
  `trim_offsets` (GPT-2, RoBERTa) drops spaces from the spans — `Aligner` tokenises with a copy whose
  trimming is off (the ids are the same).
Offsets must cover the text without gaps; a side whose offsets do not is refused in one line.

BOS / EOS: with `bos=True` each side's BOS is prepended and the two BOSes form chunk 0, an empty text
(Gemma expects a BOS at the start of every window); `eos=True` appends each side's EOS as one last
empty-text chunk. Special-token text inside a document is tokenised as text, as in the data path.

What must round-trip: each side's decode(encode(text)) == text, for every text aligned (offsets index
the original text even when a normaliser rewrote it, so a tokenizer that lowercases, NFKC-folds or maps
a character to <unk> would produce "aligned" chunks whose tokens do not spell their text). The
tokenizers are probed once when an `Aligner` is built; `check=True` (the default) also decodes every
text aligned.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from typing import Optional

import numpy as np
from tokenizers import Tokenizer

from hld.errors import HldError, one_line

# pieces a faithful LLM tokenizer reproduces: case, accents composed and decomposed, NFKC-foldable
# characters (ligature, full-width, superscript), whitespace runs, CJK, RTL, emoji (ZWJ, flag)
PROBES = (
    "Hello World",
    "a  b\t\tc\n\n d ",
    "café cafe\u0301",
    "\ufb01 \uff21 x\u00b2",
    "日本語 한국어",
    "שלום مرحبا",
    "\U0001f468\u200d\U0001f469\u200d\U0001f467 \U0001f1eb\U0001f1f7",
)


@dataclass(frozen=True)
class Alignment:
    """One text's tokens on both sides and its chunks (n = number of chunks)."""

    teacher_ids: np.ndarray  # (n_teacher_tokens,) int32, BOS/EOS included when asked for
    student_ids: np.ndarray  # (n_student_tokens,) int32
    teacher_bounds: np.ndarray  # (n + 1,) int32: chunk c = teacher tokens [tb[c], tb[c+1])
    student_bounds: np.ndarray  # (n + 1,) int32: chunk c = student tokens [sb[c], sb[c+1])
    char_bounds: np.ndarray  # (n + 1,) int32: chunk c = text[cb[c]:cb[c+1]] (BOS/EOS chunks: empty)

    @property
    def n_chunks(self) -> int:
        return len(self.char_bounds) - 1


def cut_points(offsets: np.ndarray, n_chars: int) -> tuple[np.ndarray, np.ndarray]:
    """(token index k, character p) of every token boundary of one side, p ascending, k the first index
    at each p; k = 0 at p = 0 and k = n_tokens at p = n_chars included. `offsets` (n_tokens, 2): each
    token's [start, end) in the text. Raises ValueError when the offsets leave a character uncovered or
    point outside the text."""
    n = len(offsets)
    if n == 0 or n_chars == 0:
        if n or n_chars:
            raise ValueError("tokens for an empty text" if n else "no tokens for a non-empty text")
        return np.zeros(1, np.int64), np.zeros(1, np.int64)
    start, end = offsets[:, 0].astype(np.int64), offsets[:, 1].astype(np.int64)
    reach = np.maximum.accumulate(end)  # reach[k]: the furthest character tokens 0..k cover
    floor = np.minimum.accumulate(start[::-1])[::-1]  # floor[k]: the first character tokens k.. cover
    if start[0] != 0 or reach[-1] != n_chars or (start[1:] > reach[:-1]).any() or floor[0] < 0:
        raise ValueError("the offsets do not cover the text")
    k = np.flatnonzero(reach[:-1] == floor[1:]) + 1  # boundaries between tokens k-1 and k
    p = reach[k - 1]
    # p ascends; of several k at one p (empty spans) the first; empty spans at either end stay in the
    # first / last chunk
    keep = (p > 0) & (p < n_chars) & np.concatenate(([True], p[1:] != p[:-1]))
    return np.concatenate(([0], k[keep], [n])), np.concatenate(([0], p[keep], [n_chars]))


def align_offsets(
    teacher_offsets: np.ndarray, student_offsets: np.ndarray, n_chars: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(teacher bounds, student bounds, character bounds), int32, for one text's two offset arrays: the
    boundaries both sides share. Raises ValueError as `cut_points`."""
    tk, tp = cut_points(teacher_offsets, n_chars)
    sk, sp = cut_points(student_offsets, n_chars)
    si = np.minimum(np.searchsorted(sp, tp), len(sp) - 1)  # both ascend: a merge, not a sort
    shared = sp[si] == tp
    return tk[shared].astype(np.int32), sk[si[shared]].astype(np.int32), tp[shared].astype(np.int32)


@dataclass
class _Side:
    role: str  # "teacher" / "student"
    name: str  # what the errors call it
    backend: Tokenizer  # the tokenizer's own, or an untrimmed copy
    bos_id: Optional[int]
    eos_id: Optional[int]


def _side(tokenizer, role: str) -> _Side:
    name = str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)
    if isinstance(tokenizer, Tokenizer):
        backend, bos, eos = tokenizer, None, None
    else:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if not getattr(tokenizer, "is_fast", False) or backend is None:
            raise HldError(
                f"the {role} tokenizer {name!r} is a slow tokenizer: it gives no character offsets, which "
                "aligning two tokenizers by text needs",
                "load it with AutoTokenizer.from_pretrained(..., use_fast=True) or give a tokenizer.json",
            )
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    post = backend.post_processor
    if post is not None and '"trim_offsets":true' in post.__getstate__().decode():
        spec = json.loads(backend.to_str())  # a copy (seconds for a 262k vocabulary): the caller's stays
        spec["post_processor"] = _untrimmed(spec["post_processor"])
        backend = Tokenizer.from_str(json.dumps(spec))
    side = _Side(role, name, backend, bos, eos)
    _probe(side)
    return side


def _untrimmed(node):
    """A post-processor spec with every `trim_offsets` off (it drops spaces from the spans, not the ids)."""
    if isinstance(node, dict):
        return {k: (False if k == "trim_offsets" else _untrimmed(v)) for k, v in node.items()}
    if isinstance(node, list):
        return [_untrimmed(v) for v in node]
    return node


def _encode(side: _Side, texts: list[str]) -> list:
    # a document that spells "<bos>" gets no real BOS (transformers sets this flag on every call too)
    side.backend.encode_special_tokens = True
    return side.backend.encode_batch(texts, add_special_tokens=False)


def _probe(side: _Side) -> None:
    for text in PROBES:
        enc = _encode(side, [text])[0]
        got = side.backend.decode(enc.ids, skip_special_tokens=False)
        if got != text:
            normalizer = one_line(str(side.backend.normalizer), 80)
            raise HldError(
                f"the {side.role} tokenizer {side.name!r} does not reproduce text: {text!r} decodes back as "
                f"{got!r} (normalizer: {normalizer}); its tokens cannot be aligned by text",
                "use a tokenizer whose decode(encode(text)) is the text (byte fallback or byte-level BPE, no "
                "lowercasing/NFKC/accent-stripping normalizer), or remove that normalizer from its tokenizer.json",
            )


def _round_trip_errors(side: _Side, texts: list[str], encs) -> list[Optional[HldError]]:
    """Per text, None when its tokens decode back to it, else the one-line error that says where not."""
    decoded = side.backend.decode_batch([e.ids for e in encs], skip_special_tokens=False)
    errors: list[Optional[HldError]] = []
    for i, (text, got) in enumerate(zip(texts, decoded)):
        if got == text:
            errors.append(None)
            continue
        at = next((j for j, (a, b) in enumerate(zip(text, got)) if a != b), min(len(text), len(got)))
        errors.append(
            HldError(
                f"the {side.role} tokenizer {side.name!r} cannot round-trip text {i} of the batch: at character "
                f"{at} {text[at : at + 12]!r} decodes as {got[at : at + 12]!r}; its chunks would not be that text",
                "drop or clean such documents, or use a tokenizer that encodes every character (byte fallback)",
            )
        )
    return errors


class Aligner:
    """Tokenise texts with a teacher's and a student's tokenizer (Hugging Face fast tokenizers, or
    `tokenizers.Tokenizer` with bos = eos = False) and align them: `aligner(text)` or
    `aligner.batch(texts)`. Built once (the probes refuse a tokenizer that cannot spell text back)."""

    def __init__(self, teacher, student, *, bos: bool = True, eos: bool = False, check: bool = True) -> None:
        self.teacher, self.student = _side(teacher, "teacher"), _side(student, "student")
        self.bos, self.eos, self.check = bos, eos, check
        for side in (self.teacher, self.student):
            for what, want in (("bos", bos), ("eos", eos)):
                if want and getattr(side, f"{what}_id") is None:
                    raise HldError(
                        f"the {side.role} tokenizer {side.name!r} has no {what.upper()} token, which {what}=True needs",
                        f"give a tokenizer with a {what} token or align with {what}=False",
                    )

    def __call__(self, text: str) -> Alignment:
        return self.batch([text])[0]

    def batch(self, texts: list[str]) -> list[Alignment]:
        t_encs, s_encs = self.encode(texts)
        if self.check:
            self.check_round_trip(texts, t_encs, s_encs)
        return [self.from_encodings(text, t, s) for text, t, s in zip(texts, t_encs, s_encs)]

    def encode(self, texts: list[str]) -> tuple[list, list]:
        """The teacher's and the student's `tokenizers.Encoding` of each text (no special tokens)."""
        return _encode(self.teacher, texts), _encode(self.student, texts)

    def check_round_trip(self, texts: list[str], t_encs: list, s_encs: list) -> None:
        """Refuse, in one line, a text that either side's tokens do not decode back to."""
        error = next((e for e in self.round_trip_errors(texts, t_encs, s_encs) if e is not None), None)
        if error is not None:
            raise error

    def round_trip_errors(self, texts: list[str], t_encs: list, s_encs: list) -> list[Optional[HldError]]:
        """Per text, None when both sides' tokens decode back to it, else the error naming the first side
        that does not (the data path skips and counts such documents)."""
        teacher = _round_trip_errors(self.teacher, texts, t_encs)
        student = _round_trip_errors(self.student, texts, s_encs)
        return [t if t is not None else s for t, s in zip(teacher, student)]

    def from_encodings(self, text: str, t_enc, s_enc) -> Alignment:
        """The alignment of `text` from its two `tokenizers.Encoding`s (as `batch` made them, unchecked)."""
        t_off, s_off = _offsets(t_enc), _offsets(s_enc)
        try:
            tb, sb, cb = align_offsets(t_off, s_off, len(text))
        except ValueError as exc:
            side = self.teacher if _uncovered(t_off, len(text)) else self.student
            raise HldError(
                f"the {side.role} tokenizer {side.name!r} gives offsets that do not cover a text of "
                f"{len(text)} characters ({exc})",
                "use a tokenizer whose offsets index the original text (a Hugging Face fast tokenizer)",
            ) from exc
        t_ids = np.asarray(t_enc.ids, dtype=np.int32)
        s_ids = np.asarray(s_enc.ids, dtype=np.int32)
        if self.bos:  # chunk 0: the two BOSes, no text
            t_ids = np.concatenate(([self.teacher.bos_id], t_ids)).astype(np.int32)
            s_ids = np.concatenate(([self.student.bos_id], s_ids)).astype(np.int32)
            tb, sb, cb = np.concatenate(([0], tb + 1)), np.concatenate(([0], sb + 1)), np.concatenate(([0], cb))
        if self.eos:  # last chunk: the two EOSes, no text
            t_ids = np.concatenate((t_ids, [self.teacher.eos_id])).astype(np.int32)
            s_ids = np.concatenate((s_ids, [self.student.eos_id])).astype(np.int32)
            tb, sb, cb = (np.concatenate((b, [b[-1] + 1])) for b in (tb, sb, cb))
            cb[-1] -= 1
        return Alignment(t_ids, s_ids, tb.astype(np.int32), sb.astype(np.int32), cb.astype(np.int32))


def _offsets(enc) -> np.ndarray:
    """(n_tokens, 2) int64 from an Encoding's list of (start, end) tuples: reading that list out of the
    tokenizers binding is most of an alignment's time; fromiter spares building a second list of rows."""
    return np.fromiter(itertools.chain.from_iterable(enc.offsets), np.int64, 2 * len(enc)).reshape(-1, 2)


def _uncovered(offsets: np.ndarray, n_chars: int) -> bool:
    try:
        cut_points(offsets, n_chars)
    except ValueError:
        return True
    return False
