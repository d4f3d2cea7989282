"""A student tokenizer trained on a corpus (`hld train-tokenizer`, issue 34 item 6): byte-level BPE with
the `tokenizers` package, written as a Hugging Face tokenizer directory.

What it is, and why:
- **byte-level** (GPT-2's pre-tokenizer and decoder, the 256 byte symbols in the initial alphabet): every
  text is encodable, and decode(encode(text)) == text for any text (no normaliser, no <unk>), which
  aligning by text needs (`hld.data.align`: a side that does not round-trip is refused). Offsets come with
  every encoding (a fast tokenizer) and are not trimmed (no ByteLevel post-processor), so they cover the
  text as the Aligner needs.
- specials at Gemma's ids: `<pad>` 0, `<eos>` 1, `<bos>` 2; encoding with special tokens prepends `<bos>`
  as Gemma's tokenizer does (the data path adds BOS and EOS itself and encodes without specials).
- deterministic: the same documents in the same order give the same files, byte for byte (BPE's merges
  break count ties by the pair; no timing or path is written into the directory).

The directory holds `tokenizer.json`, `tokenizer_config.json` and `hld_tokenizer.json` (what it was
trained on: source, documents, characters, vocabulary size), and is written whole or not
at all (`hld.atomic.new_dir`).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

from hld.atomic import new_dir, write_fix
from hld.data.sources import iter_unit, source_units
from hld.errors import HldError
from hld.progress import Progress

SPECIALS = ("<pad>", "<eos>", "<bos>")  # ids 0, 1, 2 (Gemma 3's pad, eos, bos)
MIN_VOCAB = 256 + len(SPECIALS)  # the byte alphabet and the specials
MAX_VOCAB = 1 << 20
MARKER = "hld_tokenizer.json"
_SURROGATE = re.compile("[\ud800-\udfff]")


def check_out(out: Path) -> None:
    """`--out` is new or an empty directory (never a file, a link, or the current directory)."""
    if out.is_symlink():
        raise HldError(f"--out {out} is a symbolic link", "give a new directory")
    if out.exists() and not out.is_dir():
        raise HldError(f"--out {out} exists and is not a directory", "give a new directory")
    if out.exists() and any(out.iterdir()):
        raise HldError(f"--out {out} exists and is not empty", "give a new or empty directory")
    cwd, resolved = Path.cwd().resolve(), out.resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise HldError(f"--out {out} is or contains the current directory", "give a new directory, e.g. --out tok")


def train_bpe(
    spec: str,
    *,
    vocab_size: int,
    text_field: str = "text",
    max_docs: Optional[int] = None,
    quiet: bool = False,
):
    """A byte-level BPE of `vocab_size` ids trained on the documents of `spec` (its first `max_docs`), as
    a `transformers` fast tokenizer; and what it read ({"docs", "chars", "repaired"})."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if not MIN_VOCAB <= vocab_size <= MAX_VOCAB:
        raise HldError(
            f"--vocab-size {vocab_size} is outside {MIN_VOCAB}..{MAX_VOCAB:,}",
            f"give at least {MIN_VOCAB} (the 256 bytes and {', '.join(SPECIALS)}); 8000-64000 is usual",
        )
    if max_docs is not None and max_docs < 1:
        raise HldError(f"--max-docs {max_docs} is not a positive number", "give --max-docs 1 or more, or leave it out")
    units = source_units(spec)
    counts = {"docs": 0, "chars": 0, "repaired": 0}
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    prog = Progress(len(units), desc="train-tokenizer", quiet=quiet, unit="unit", rate_unit="char")
    try:  # the trainer counts words as it reads; the merges come after the last document
        tok.train_from_iterator(_documents(spec, units, text_field, max_docs, counts, prog), trainer)
    finally:
        prog.close()
    if counts["docs"] == 0:
        raise HldError(f"--data {spec} holds no document with text", "point --data at real text")
    bos = tok.token_to_id("<bos>")
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", bos)]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    return fast, counts


def _documents(spec: str, units: list[str], text_field: str, max_docs, counts: dict, prog: Progress) -> Iterator[str]:
    """The source's documents in order (lone surrogates replaced by U+FFFD and counted, as the token store
    does), counting them; progress by unit."""
    for u in range(len(units)):
        for doc in iter_unit(spec, u, text_field):
            if max_docs is not None and counts["docs"] >= max_docs:
                return
            if _SURROGATE.search(doc):
                doc = _SURROGATE.sub("\ufffd", doc)
                counts["repaired"] += 1
            counts["docs"] += 1
            counts["chars"] += len(doc)
            yield doc
        prog.update(u + 1, tokens_per_s=counts["chars"] / max(time.time() - prog.start, 1e-9))


def write_tokenizer(out: Path, tokenizer, record: dict) -> None:
    """The tokenizer directory at `out`, complete or absent."""
    try:
        with new_dir(out) as tmp:
            tokenizer.save_pretrained(str(tmp))
            (tmp / MARKER).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    except OSError as exc:
        raise HldError(f"cannot write {out}: {exc.strerror or exc}", write_fix(exc)) from exc


def train_tokenizer(
    spec: str,
    out: Path,
    *,
    vocab_size: int,
    text_field: str = "text",
    max_docs: Optional[int] = None,
    quiet: bool = False,
) -> dict:
    """`hld train-tokenizer`: train on `spec`, write `out`; returns its record."""
    out = Path(out)
    check_out(out)
    tokenizer, counts = train_bpe(spec, vocab_size=vocab_size, text_field=text_field, max_docs=max_docs, quiet=quiet)
    record = {
        "kind": "hld-tokenizer",
        "model": "byte-level BPE",
        "source": spec,
        "text_field": text_field,
        "max_docs": max_docs,
        "vocab_size": len(tokenizer),
        "asked_vocab_size": vocab_size,
        **counts,
    }
    write_tokenizer(out, tokenizer, record)
    return record
