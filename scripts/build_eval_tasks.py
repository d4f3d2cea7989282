#!/usr/bin/env python3
"""Build the two offline evaluation tasks shipped in ``src/hld/eval/tasks/``.

Both are made from the *validation* split of the shipped sample corpus
(``src/hld/assets/sample_corpus/c4-validation.*.json.gz``, Python 3.11 documentation prose);
the training split is never read, so a student trained on ``sample:train`` has not seen them.

- ``hld_lambada.jsonl`` (LAMBADA-style, scored like ``lambada_openai``): passages of whole
  sentences, 40-100 words, whose last word (the target) is a word of at least 3 letters that
  already occurs earlier in the passage; the passage's final full stop is dropped, so the text
  ends with the target. Passages of one document do not overlap.
- ``hld_mc.jsonl`` (HellaSwag-shaped): a context of one sentence (two if the first is short)
  and 4 candidate next sentences: the true next sentence and 3 distractors, sentences of
  similar length drawn from *other source pages*; the candidates are shuffled, ``label`` is
  the true one's index. Similar length means in characters,
  within 10% (20%, 40% when too few): a model that knows nothing scores about every sentence by
  its token count, so matched lengths keep it near chance. The predictability filter: the
  true next sentence repeats a content word of the context (4+ characters, not one of the
  documentation's ubiquitous words such as "function" or "return"), and no distractor shares a
  content word with the context. Templated sentences ("New in version 3.2.",
  "Changed in version ...") are never an ending or a distractor.

Everything is seeded: rerunning gives byte-identical files (``--check`` verifies the shipped
ones). Usage::

    python scripts/build_eval_tasks.py             # rewrite src/hld/eval/tasks/*.jsonl
    python scripts/build_eval_tasks.py --check     # rebuild in memory, compare with the shipped files
    python scripts/build_eval_tasks.py --out DIR   # write elsewhere
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import random
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "src" / "hld" / "assets" / "sample_corpus" / "c4-validation.00000-of-00001.json.gz"
TASKS_DIR = ROOT / "src" / "hld" / "eval" / "tasks"

SEED = 1234
LAMBADA_WORDS = (40, 100)  # passage length, words
LAMBADA_ITEMS = 400  # at most; a seeded subset if more pass the filters
MC_CONTEXT_WORDS = (8, 30)
MC_ENDING_WORDS = (6, 20)
MC_ITEMS = 400
MC_CHOICES = 4

SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(\[])")
TARGET_WORD = re.compile(r"^[A-Za-z]{3,}$")
WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]{3,}")
STOPWORDS = frozenset(
    """
about above after again also although always another anything argument arguments available based
because been before being below between both built call called calling calls case cases cannot class
could default defined does doing done during each either else example except false first following
from function functions further given have here however instead into itself just last like made make
many method methods might module modules more most much must name names need needs never new none
note number object objects often only other otherwise over parameter parameters passed python rather
return returned returns same second several should since some specified still such supported than
that their them then there these they this those through true type types under unless until used
useful uses using usually value values version very when where whether which while will with within
without would your
""".split()
)
TEMPLATED = ("New in version", "Changed in version", "Deprecated since version", "Availability:")


def read_documents(path: Path = SOURCE) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def sentences(text: str) -> list[str]:
    """Sentences of a document (its lines are paragraphs), whitespace collapsed."""
    out = []
    for line in text.split("\n"):
        out += [" ".join(s.split()) for s in SENTENCE_END.split(line.strip()) if s.strip()]
    return out


def page_of(doc: dict) -> str:
    return doc["url"].split("#")[0]


# --------------------------------------------------------------------------- hld_lambada


def lambada_target(passage_words: list[str]) -> str | None:
    """The target word if the passage qualifies: ends with '<word>.', word >= 3 letters, seen before."""
    last = passage_words[-1]
    if not last.endswith(".") or not TARGET_WORD.match(last[:-1]):
        return None
    word = last[:-1]
    earlier = {w.strip(".,;:!?()[]\"'") for w in passage_words[:-1]}
    return word if word in earlier else None


def lambada_passages(sents: list[str]) -> list[str]:
    """Non-overlapping passages of one document: for each end sentence, the shortest run of whole
    sentences reaching the minimum length (ends scanned left to right, a kept passage blocks its span)."""
    lo, hi = LAMBADA_WORDS
    out, floor = [], 0
    for end in range(len(sents)):
        words: list[str] = []
        start = end
        while start >= floor:
            words = sents[start].split() + words
            if len(words) >= lo:
                break
            start -= 1
        if len(words) < lo or len(words) > hi or lambada_target(words) is None:
            continue
        out.append(" ".join(words)[:-1])  # drop the final full stop: the text ends with the target
        floor = end + 1
    return out


def build_lambada(docs: list[dict]) -> list[dict]:
    texts = [p for d in docs for p in lambada_passages(sentences(d["text"]))]
    items = [{"text": p} for p in dict.fromkeys(texts)]  # the docs repeat some passages: keep the first
    if len(items) > LAMBADA_ITEMS:
        keep = sorted(random.Random(SEED).sample(range(len(items)), LAMBADA_ITEMS))
        items = [items[i] for i in keep]
    return items


# --------------------------------------------------------------------------- hld_mc


def n_words(s: str) -> int:
    return len(s.split())


def is_ending(s: str) -> bool:
    lo, hi = MC_ENDING_WORDS
    return lo <= n_words(s) <= hi and s.endswith(".") and not s.startswith(TEMPLATED)


def content_words(s: str) -> set[str]:
    return {w.lower() for w in WORD.findall(s)} - STOPWORDS


def mc_candidates(doc: dict) -> list[tuple[str, str]]:
    """(context, true ending) pairs of one document, non-overlapping; the ending repeats a content
    word of the context."""
    lo, hi = MC_CONTEXT_WORDS
    sents, out, k = sentences(doc["text"]), [], 0
    while k + 1 < len(sents):
        ctx = sents[k]
        if n_words(ctx) < lo and k > 0:
            ctx = sents[k - 1] + " " + ctx
        if (
            lo <= n_words(ctx) <= hi
            and is_ending(sents[k + 1])
            and not ctx.startswith(TEMPLATED)
            and content_words(ctx) & content_words(sents[k + 1])
        ):
            out.append((ctx, sents[k + 1]))
            k += 2
        else:
            k += 1
    return out


def build_mc(docs: list[dict]) -> list[dict]:
    rng = random.Random(SEED)
    pool: dict[str, set[str]] = {}  # ending-like sentence -> pages it occurs in
    for d in docs:
        for s in sentences(d["text"]):
            if is_ending(s):
                pool.setdefault(s, set()).add(page_of(d))
    pool_sorted = sorted(pool)
    words = {s: content_words(s) for s in pool_sorted}
    pairs = list(dict.fromkeys((page_of(d), ctx, end) for d in docs for ctx, end in mc_candidates(d)))
    chosen = sorted(rng.sample(range(len(pairs)), min(MC_ITEMS, len(pairs))))
    items = []
    for i in chosen:
        page, ctx, true = pairs[i]
        context = content_words(ctx)
        distractors = None
        for slack in (0.1, 0.2, 0.4):
            near = [
                s
                for s in pool_sorted
                if page not in pool[s]
                and s != true
                and abs(len(s) - len(true)) <= slack * len(true)
                and not words[s] & context
            ]
            if len(near) >= MC_CHOICES - 1:
                distractors = rng.sample(near, MC_CHOICES - 1)
                break
        if distractors is None:
            continue
        endings = [true] + distractors
        rng.shuffle(endings)
        items.append({"ctx": ctx, "endings": endings, "label": endings.index(true)})
    return items


# --------------------------------------------------------------------------- files


def render(items: list[dict]) -> bytes:
    return "".join(json.dumps(x, ensure_ascii=False, sort_keys=True) + "\n" for x in items).encode("utf-8")


def build() -> dict[str, bytes]:
    docs = read_documents()
    lam, mc = build_lambada(docs), build_mc(docs)
    manifest = {
        "source": SOURCE.name,
        "source_sha256": hashlib.sha256(SOURCE.read_bytes()).hexdigest(),
        "seed": SEED,
        "hld_lambada": {"items": len(lam), "passage_words": list(LAMBADA_WORDS)},
        "hld_mc": {
            "items": len(mc),
            "choices": MC_CHOICES,
            "context_words": list(MC_CONTEXT_WORDS),
            "ending_words": list(MC_ENDING_WORDS),
        },
    }
    return {
        "hld_lambada.jsonl": render(lam),
        "hld_mc.jsonl": render(mc),
        "manifest.json": (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode("utf-8"),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=TASKS_DIR, help="directory to write (default: the shipped one)")
    ap.add_argument("--check", action="store_true", help="compare a fresh build with the files in --out")
    args = ap.parse_args(argv)
    files = build()
    if args.check:
        stale = [n for n, data in files.items() if not (args.out / n).is_file() or (args.out / n).read_bytes() != data]
        print("up to date" if not stale else f"differ from a fresh build: {', '.join(stale)}")
        return 1 if stale else 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (args.out / name).write_bytes(data)
    m = json.loads(files["manifest.json"])
    print(f"hld_lambada: {m['hld_lambada']['items']} items, hld_mc: {m['hld_mc']['items']} items -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
