"""Rebuild the checked-in test fixtures under tests/assets (deterministic):

- tiny_tokenizer/   a 512-entry BPE tokenizer (HF fast tokenizer; <pad>=0 <eos>=1 <bos>=2 <unk>=3),
                    trained on the docstrings of a few Python standard-library modules (PSF licence)
- tiny_teacher/     a random 3-block Gemma 3 text model (d=48) over that vocabulary, safetensors
- c4/               C4-format shards (c4-train.0000{0,1}-of-00002.json.gz, c4-validation...) of the
                    same docstring paragraphs, records {text, timestamp, url}

Run: python scripts/make_test_assets.py
"""

from __future__ import annotations

import gzip
import importlib
import inspect
import json
import re
import shutil
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parent.parent / "tests" / "assets"
MODULES = [
    "json",
    "collections",
    "itertools",
    "functools",
    "pathlib",
    "argparse",
    "logging",
    "random",
    "statistics",
    "textwrap",
    "string",
    "heapq",
    "bisect",
    "csv",
    "datetime",
    "decimal",
    "fractions",
    "unittest",
    "subprocess",
    "threading",
    "queue",
    "email",
    "http.client",
    "urllib.request",
]


def paragraphs() -> list[str]:
    out = []
    for name in MODULES:
        mod = importlib.import_module(name)
        objs = [mod] + [getattr(mod, a) for a in sorted(dir(mod)) if not a.startswith("_")]
        for obj in objs:
            doc = inspect.getdoc(obj) if (inspect.ismodule(obj) or inspect.isclass(obj) or callable(obj)) else None
            if not doc:
                continue
            for para in re.split(r"\n\s*\n", doc):
                text = " ".join(para.split())
                if len(text) > 80 and text not in out and ">>>" not in text:
                    out.append(text)
    return out


def documents(paras: list[str], per_doc: int = 3) -> list[str]:
    return ["\n".join(paras[i : i + per_doc]) for i in range(0, len(paras), per_doc)]


def write_shard(path: Path, docs: list[str], split: str) -> None:
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
        for i, d in enumerate(docs):
            rec = {
                "text": d,
                "timestamp": f"2019-04-{1 + i % 28:02d}T12:00:00Z",
                "url": f"https://docs.python.org/3.11/library/#{split}-{i}",
            }
            gz.write((json.dumps(rec, ensure_ascii=False) + "\n").encode())


def build_tokenizer(texts: list[str], out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.save_pretrained(out)


def build_teacher(out: Path, vocab: int) -> None:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(
        vocab_size=vocab,
        hidden_size=48,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=24,
        intermediate_size=96,
        query_pre_attn_scalar=24,
        sliding_window=64,
        max_position_embeddings=512,
        bos_token_id=2,
        eos_token_id=1,
        pad_token_id=0,
        tie_word_embeddings=True,
    )
    torch.manual_seed(1234)
    model = Gemma3ForCausalLM(cfg)
    model.save_pretrained(out, safe_serialization=True)


def main() -> None:
    paras = paragraphs()
    docs = documents(paras)
    n_val = max(8, len(docs) // 10)
    val, train = docs[:n_val], docs[n_val:]
    c4 = OUT / "c4"
    c4.mkdir(parents=True, exist_ok=True)
    half = len(train) // 2
    write_shard(c4 / "c4-train.00000-of-00002.json.gz", train[:half], "train")
    write_shard(c4 / "c4-train.00001-of-00002.json.gz", train[half:], "train")
    write_shard(c4 / "c4-validation.00000-of-00001.json.gz", val, "validation")
    for d in ("tiny_tokenizer", "tiny_teacher"):
        shutil.rmtree(OUT / d, ignore_errors=True)
    build_tokenizer(paras, OUT / "tiny_tokenizer")
    build_teacher(OUT / "tiny_teacher", 512)
    for f in (OUT / "tiny_tokenizer").iterdir():  # the teacher directory carries its tokenizer
        shutil.copy(f, OUT / "tiny_teacher" / f.name)
    print(f"{len(train)} train docs, {len(val)} validation docs, {sum(map(len, docs))} chars")


if __name__ == "__main__":
    main()
