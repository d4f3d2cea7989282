"""The vocabulary two tokenizers share: pairs (teacher id, student id) of tokens that spell the same text,
built once from the two tokenizers (for GOLD's exact KD, hld.distill.cross_tok.gold).

A token's text is what it decodes to *after* a fixed anchor token: decode([anchor, id]) minus
decode([anchor]), so a decoder that strips the first token's leading space (Llama's SentencePiece) and
one that does not (Gemma's) both give "▁the" the text " the", and byte-level BPE's "Ġthe" gives " the"
too: tokens match by what they spell, whatever each vocabulary calls them. A token has no text of its
own, and is left out, when
- it is a special token (BOS, EOS, PAD, control tokens): they spell nothing;
- its text holds U+FFFD: a piece of a character (byte fallback <0xE6>, a byte-level fragment of a CJK
  character or an emoji) has no text alone;
- its text is empty, or does not follow the anchor's text.
Several ids of one side may spell the same text (byte fallback <0x41> and "A"; a duplicate piece). The
id kept is the one the tokenizer itself encodes that text as, when its encoding is that one token;
otherwise the text is ambiguous on that side and left out. So each text maps to at most one id per side,
and the pairs are a one-to-one map between the two id sets.

Where a chunk is one token on each side (hld.distill.cross_tok.chunks), both tokens spell the chunk's
text, so both are in the map unless one was left out above.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch
from tokenizers import Tokenizer

REPLACEMENT = "\ufffd"


@dataclass(frozen=True)
class SharedVocab:
    """Tokens both vocabularies hold: student_ids[i] spells what teacher_ids[i] spells."""

    teacher_ids: np.ndarray  # (n,) int64, ascending
    student_ids: np.ndarray  # (n,) int64
    teacher_vocab_size: int
    student_vocab_size: int

    def __len__(self) -> int:
        return len(self.teacher_ids)

    def tensors(self, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return (
            torch.as_tensor(self.teacher_ids, dtype=torch.int64, device=device),
            torch.as_tensor(self.student_ids, dtype=torch.int64, device=device),
        )


def _backend(tokenizer) -> Tokenizer:
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"{type(tokenizer).__name__} is not a fast tokenizer (no backend_tokenizer)")
    return backend


def token_texts(tokenizer) -> dict[str, int]:
    """text -> the one id of `tokenizer` (an HF fast tokenizer or a `tokenizers.Tokenizer`) that spells
    it, for every token with a text of its own (the module docstring's rules)."""
    tok = _backend(tokenizer)
    n = tok.get_vocab_size(with_added_tokens=True)
    special = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
    anchor = tok.encode("a", add_special_tokens=False).ids
    head = tok.decode(anchor, skip_special_tokens=False)
    ids = [i for i in range(n) if i not in special]
    decoded = tok.decode_batch([anchor + [i] for i in ids], skip_special_tokens=False)
    by_text: dict[str, list[int]] = defaultdict(list)
    for i, d in zip(ids, decoded):
        text = d[len(head) :]
        if d.startswith(head) and text and REPLACEMENT not in text:
            by_text[text].append(i)
    out = {text: group[0] for text, group in by_text.items() if len(group) == 1}
    tied = [text for text, group in by_text.items() if len(group) > 1]
    for text, enc in zip(tied, tok.encode_batch(tied, add_special_tokens=False)):
        if len(enc.ids) == 1 and enc.ids[0] in by_text[text]:
            out[text] = enc.ids[0]
    return out


def shared_vocab(teacher, student) -> SharedVocab:
    """The (teacher id, student id) pairs of tokens that spell the same text, sorted by teacher id."""
    t_texts, s_texts = token_texts(teacher), token_texts(student)
    pairs = sorted((t_id, s_texts[text]) for text, t_id in t_texts.items() if text in s_texts)
    arr = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    return SharedVocab(
        teacher_ids=arr[:, 0].copy(),
        student_ids=arr[:, 1].copy(),
        teacher_vocab_size=_backend(teacher).get_vocab_size(with_added_tokens=True),
        student_vocab_size=_backend(student).get_vocab_size(with_added_tokens=True),
    )
