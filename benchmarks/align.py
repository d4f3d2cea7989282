"""Aligning a teacher's and a student's tokens by text (`hld.data.align`) against tokenising the text
on both sides, on the shipped sample corpus (its train split: Python documentation prose).

    python benchmarks/align.py                               # Gemma 3 (from the embedded GGUF) as teacher
    python benchmarks/align.py --teacher DIR --json          # a saved tokenizer directory instead (no GGUF parse)

Teacher: Gemma 3's tokenizer (262,144 tokens, byte fallback). Students: the shipped tiny byte-level
tokenizer (tests/assets/tiny_tokenizer) and a SentencePiece-style BPE with byte fallback trained here on
the sample (8,000 tokens). One thread (TOKENIZERS_PARALLELISM=false, as a data worker runs), documents in
batches of 256, each phase the minimum of --reps passes over the corpus:
- tokenise: `encode_batch` on each side (offsets come with every `tokenizers.Encoding`);
- round-trip check: each side's `decode_batch` compared with the text (`Aligner(check=True)`);
- align: `Aligner.from_encodings` on every document (offsets to numpy, boundaries, BOS chunk).
The ratio printed is the alignment's time over the two tokenisations'.
"""

from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one thread, before tokenizers is imported
os.environ.setdefault("RAYON_NUM_THREADS", "1")

import argparse  # noqa: E402
import gzip  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _measure import machine, table  # noqa: E402

SAMPLE = ROOT / "src" / "hld" / "assets" / "sample_corpus"
BATCH_DOCS = 256


def documents() -> list[str]:
    docs = []
    for path in sorted(SAMPLE.glob("c4-train.*.json.gz")):
        with gzip.open(path, "rt") as fh:
            docs += [json.loads(line)["text"] for line in fh]
    return docs


def gemma_tokenizer(spec: str | None):
    from transformers import AutoTokenizer

    if spec:
        return AutoTokenizer.from_pretrained(spec)
    from hld.models.loading import embedded_teacher_path

    path = embedded_teacher_path()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)  # ~40 s: the GGUF's vocabulary


def sentencepiece_bpe(docs: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    specials = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator(
        docs, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", name_or_path="bpe-8k")


def best(reps: int, fn) -> tuple[float, object]:
    times, out = [], None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def measure(aligner, docs: list[str], reps: int) -> dict:
    batches = [docs[i : i + BATCH_DOCS] for i in range(0, len(docs), BATCH_DOCS)]

    def encode(side):
        return [side.backend.encode_batch(b, add_special_tokens=False) for b in batches]

    t_teacher, t_encs = best(reps, lambda: encode(aligner.teacher))
    t_student, s_encs = best(reps, lambda: encode(aligner.student))
    t_check, _ = best(reps, lambda: [aligner.check_round_trip(*a) for a in zip(batches, t_encs, s_encs)])

    def align():
        return [
            aligner.from_encodings(d, t, s) for b, te, se in zip(batches, t_encs, s_encs) for d, t, s in zip(b, te, se)
        ]

    t_align, alignments = best(reps, align)
    chars = sum(map(len, docs))
    chunks = sum(a.n_chunks for a in alignments)
    tokenise = t_teacher + t_student
    return {
        "docs": len(docs),
        "chars": chars,
        "chunks": chunks,
        "teacher_tokens": sum(len(a.teacher_ids) for a in alignments),
        "student_tokens": sum(len(a.student_ids) for a in alignments),
        "tokenise_teacher_s": t_teacher,
        "tokenise_student_s": t_student,
        "round_trip_check_s": t_check,
        "align_s": t_align,
        "align_chars_per_s": chars / t_align,
        "align_chunks_per_s": chunks / t_align,
        "tokenise_chars_per_s": chars / tokenise,
        "align_over_tokenise": t_align / tokenise,
        "check_over_tokenise": t_check / tokenise,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", help="a tokenizer directory (default: Gemma 3's, from the embedded GGUF)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--student-vocab", type=int, default=8000)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    from transformers import AutoTokenizer

    from hld.data.align import Aligner

    docs = documents()
    teacher = gemma_tokenizer(a.teacher)
    students = {
        "tiny byte-level (shipped)": AutoTokenizer.from_pretrained(str(ROOT / "tests" / "assets" / "tiny_tokenizer")),
        f"BPE {a.student_vocab} byte fallback": sentencepiece_bpe(docs, a.student_vocab),
    }
    results = {name: measure(Aligner(teacher, student), docs, a.reps) for name, student in students.items()}
    rows = [
        [
            name,
            f"{r['chars'] / 1e6:.2f}M",
            f"{r['teacher_tokens'] / 1e6:.2f}M / {r['student_tokens'] / 1e6:.2f}M",
            f"{r['chunks'] / 1e6:.2f}M",
            f"{r['tokenise_teacher_s']:.2f} + {r['tokenise_student_s']:.2f} s",
            f"{r['round_trip_check_s']:.2f} s",
            f"{r['align_s']:.2f} s",
            f"{r['align_chunks_per_s'] / 1e6:.2f}M / {r['align_chars_per_s'] / 1e6:.1f}M",
            f"{r['align_over_tokenise']:.2f}",
            f"{r['check_over_tokenise']:.2f}",
        ]
        for name, r in results.items()
    ]
    header = ["student", "chars", "tokens t / s", "chunks", "tokenise t + s", "check", "align"]
    header += ["align chunks/s / chars/s", "align ÷ tokenise", "check ÷ tokenise"]
    info = machine()
    print(f"teacher: Gemma 3 tokenizer ({len(teacher)} tokens); {len(docs)} documents; one thread; min of {a.reps}")
    print(table(rows, header))
    print(f"machine: {info}")
    if a.json:
        print(json.dumps({"machine": info, "results": results}))


if __name__ == "__main__":
    main()
