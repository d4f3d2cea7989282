"""What several test modules share (not fixtures: those are in conftest.py): the checked-in tiny
assets, the overrides that point a config at them, the trainable parameters of a built run by name,
and the report's verdict line as a pattern. Imported as `helpers` (pytest puts tests/ on sys.path for
its rootdir conftest.py; tests/dist_worker.py runs from tests/)."""

from __future__ import annotations

import csv
import gzip
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ASSETS = Path(__file__).resolve().parent / "assets"
TINY_TEACHER = ASSETS / "tiny_teacher"
C4_TRAIN = str(ASSETS / "c4" / "c4-train.*.json.gz")
C4_VALIDATION = str(ASSETS / "c4" / "c4-validation.*.json.gz")

# Student's t, 97.5% quantile, by degrees of freedom (scipy.stats.t.ppf(0.975, df))
T975 = {1: 12.706204736, 2: 4.302652730, 3: 3.182446305, 4: 2.776445105}

# one verdict line of report.md (and any verdict line)
VERDICT = re.compile(
    r"^- \*\*(?P<arm>[\w-]+) vs (?P<base>[\w-]+), (?P<acc>[\w ,-]+)\*\*(?: \((?P<conf>[^)]+)\))?"
    r"(?:; FLOPs ×(?P<fr>\d+\.\d+) of [\w-]+'s)?: \S+ better in (?P<wins>\d+) of (?P<n>\d+) (?P<unit>\w+); "
    r"mean Δ val loss (?P<mean>[+-]\d+\.\d+) nats \(unadjusted 95% CI \[(?P<lo>[+-]\d+\.\d+), "
    r"(?P<hi>[+-]\d+\.\d+)\] over \d+ (?P<over>\w+)(?:; configurations are not independent replicates)?; "
    r"Holm-adjusted p = (?P<p>[0-9.e+-]+)\), val ppl ratio (?P<ratio>\d+\.\d+)"
)
ANY_VERDICT = re.compile(r"^- \*\*[\w-]+ vs [\w-]+")


def tiny_overrides() -> list[str]:
    """Dotted overrides that turn any shipped config into a seconds-long CPU run on the fixtures
    (4 steps of 4 x 32 tokens). fp32 is pinned so results do not depend on the CPU's bf16 support."""
    return [
        f"teacher.model={TINY_TEACHER}",
        f"data.train={C4_TRAIN}",
        f"data.validation={C4_VALIDATION}",
        "student.preset=tiny-2l",
        "data.seq_len=32",
        "train.batch_size=4",
        "budget.tokens=512",
        "train.precision=float32",
        "teacher.dtype=float32",
    ]


def named_params(s) -> dict[str, torch.nn.Parameter]:
    """A built run's (`hld.train.loop.Setup`) trained parameters: `student.<name>`, `projectors.<name>`."""
    out = {f"student.{k}": p for k, p in s.student.named_parameters()}
    if s.projectors is not None:
        out.update({f"projectors.{k}": p for k, p in s.projectors.named_parameters()})
    return out


def holm_by_hand(p: list[float]) -> list[float]:
    """Holm's adjusted p-values by the closed testing principle, not by the step-down algorithm the code
    uses (Marcus, Peritz & Gabriel 1976; Holm's procedure is the closed test of Bonferroni tests): the
    adjusted p of hypothesis i is the largest, over every subset S of the hypotheses that contains i, of
    S's Bonferroni p-value min(1, |S| x min_{j in S} p_j). Brute force over the 2^m subsets."""
    from itertools import combinations

    m = len(p)
    out = []
    for i in range(m):
        others = [j for j in range(m) if j != i]
        worst = 0.0
        for k in range(m):
            for rest in combinations(others, k):
                subset = (i, *rest)
                worst = max(worst, min(1.0, len(subset) * min(p[j] for j in subset)))
        out.append(worst)
    return out


def verdicts_from_csv(path) -> list[dict]:
    """The validation-loss verdict lines recomputed from results.csv alone (numpy, scipy's t, Holm by
    hand): per view (equal student tokens; equal FLOPs with the ce cell at kd's FLOPs), per
    comparison and per configuration over its seeds. Loss lines only: the Holm family of a report
    with task lines is larger, so pass only reports without them."""
    from scipy import stats

    rows = list(csv.DictReader(open(path)))
    budget = {(r["match"], r["seed"], r["arm"]): r for r in rows if r["accounting"] == "budget"}
    views = [("budget", budget)]
    if any(r["accounting"] == "flops" for r in rows):
        views.append(
            ("flops", {**budget, **{(r["match"], r["seed"], r["arm"]): r for r in rows if r["accounting"] == "flops"}})
        )
    out = []
    for view, cells in views:
        for arm, base in (("hld-joint", "kd"), ("hld-first", "kd"), ("kd", "ce")):
            if view == "flops" and "ce" not in (arm, base):
                continue
            for conf in sorted({m for m, _, a in cells if a == arm}):
                pairs = [
                    (cells[(m, s, arm)], cells[(m, s, base)])
                    for m, s, a in cells
                    if m == conf and a == arm and (m, s, base) in cells
                ]
                d = np.array([float(x["val_loss"]) - float(y["val_loss"]) for x, y in pairs])
                half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
                ratio = np.mean([float(x["flops"]) / float(y["flops"]) for x, y in pairs])
                out.append(
                    {
                        "arm": arm,
                        "base": base,
                        "view": view,
                        "wins": int((d < 0).sum()),
                        "n": len(d),
                        "mean": d.mean(),
                        "lo": d.mean() - half,
                        "hi": d.mean() + half,
                        "ratio": math.exp(d.mean()),
                        "fr": ratio,
                        "p": stats.ttest_1samp(d, 0.0).pvalue,
                    }
                )
    for v, p in zip(out, holm_by_hand([v["p"] for v in out])):
        v["p_holm"] = p
    return out


def check_verdicts(report: str, csv_path) -> None:
    said = [m.groupdict() for m in map(VERDICT.match, report.splitlines()) if m]
    want = verdicts_from_csv(csv_path)
    assert len(said) == len(want) == len([line for line in report.splitlines() if ANY_VERDICT.match(line)])
    for s, w in zip(said, want):
        assert (s["arm"], s["base"], int(s["wins"]), int(s["n"]), s["over"]) == (
            w["arm"],
            w["base"],
            w["wins"],
            w["n"],
            "seeds",
        ), s
        assert ("FLOPs, teacher counted" in s["acc"]) == (w["view"] == "flops")
        for name in ("mean", "lo", "hi", "ratio"):
            assert float(s[name]) == pytest.approx(w[name], abs=6e-5), (s, name)
        assert float(s["fr"]) == pytest.approx(w["fr"], abs=6e-4)
        assert float(s["p"]) == pytest.approx(w["p_holm"], rel=2e-3, abs=1e-6)


def bos_led_windows(n: int = 4, seq_len: int = 32, vocab: int = 512, seed: int = 0) -> np.ndarray:
    """Random token windows (ids 3..vocab-1) each led by the BOS (id 2), as the training store cuts them."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, seq_len), generator=g)
    ids[:, 0] = 2
    return ids.numpy()


class KeptLines:
    """A RunLogger stand-in that keeps the metric lines it is given."""

    def __init__(self) -> None:
        self.lines: list[dict] = []

    def log(self, line: dict) -> None:
        self.lines.append(dict(line))

    def close(self) -> None:
        pass


def weights_to_inf_after_each_step(monkeypatch) -> None:
    """Every AdamW step fills the weights with inf after updating them: the first update blows the weights
    up (as lr=1e30 did, which the config now refuses) and every later loss is non-finite."""
    real_step = torch.optim.AdamW.step

    def step_to_inf(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        with torch.no_grad():
            for g in self.param_groups:
                for p in g["params"]:
                    p.fill_(float("inf"))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", step_to_inf)


def train_argv(run: Path, *extra: str) -> list[str]:
    """`hld train` of the smoke preset on the fixtures into `run`, quiet."""
    return ["train", "--config", "smoke", "--out", str(run), *tiny_overrides(), "--quiet", *extra]


def one_line_error(capsys, argv: list[str], problem: str) -> str:
    """Run the CLI on `argv`: exit code 2, exactly one stderr line `hld: error: <problem> — <fix>` that
    contains `problem`, and no traceback. Returns the line."""
    from hld.cli import main

    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("hld: error: ") and problem in lines[0] and " — " in lines[0], lines[0]
    assert "Traceback" not in err
    return lines[0]


def cache_arrays(d: Path) -> dict:
    """Every (shard, field) array of the teacher cache at d, as bytes, by value (offsets and part names aside)."""
    import json

    m = json.loads((d / "manifest.json").read_text())
    out = {}
    for rec in m["shards"]:
        for key, f in rec["fields"].items():
            raw = (d / "parts" / f"{rec['part']}.{key}.bin").read_bytes()
            out[(rec["shard"], key)] = raw[f["offset"] : f["offset"] + f["nbytes"]]
    return out


SEQ_LEN = 32  # the window length of the protocol references below
VAL_FILE = Path(__file__).resolve().parent / "assets" / "c4" / "c4-validation.00000-of-00001.json.gz"


def reference_ppl(model_dir: Path, *, seq_len: int = SEQ_LEN, max_docs: int | None = None) -> tuple[float, int, int]:
    """(ppl, predictions, windows) of a Hugging Face checkpoint on the fixtures' validation file, in plain
    transformers, written from the window protocol alone: ids + EOS per document, concatenated, cut into
    chunks of seq_len - 1 (last partial one dropped), each window BOS + chunk."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    bos, eos = tok.bos_token_id, tok.eos_token_id
    with gzip.open(VAL_FILE, "rt", encoding="utf-8") as fh:
        texts = [json.loads(line)["text"] for line in fh if line.strip()]
    texts = [t for t in texts if t.strip()][:max_docs]
    stream: list[int] = []
    for text in texts:
        stream += tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] + [eos]
    n = len(stream) // (seq_len - 1)
    chunks = torch.tensor(stream[: n * (seq_len - 1)]).view(n, seq_len - 1)
    ids = torch.cat([torch.full((n, 1), bos), chunks], dim=1)  # (N, T): BOS + chunk
    with torch.no_grad():
        logits = model(input_ids=ids).logits.double()  # (N, T, V)
    pred, target = logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
    nll = F.cross_entropy(pred, target, reduction="sum")
    count = target.numel()
    return math.exp(float(nll) / count), count, n


# --------------------------------------------------------------------------- tokenizers trained in tests
# two layouts a teacher's and a student's tokenizers differ by (test_align, test_cross_tok_*)

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]


def corpus(n_docs: int = 400) -> list[str]:
    """The first `n_docs` documents of the checked-in C4 training shard."""
    import itertools

    with gzip.open(ASSETS / "c4" / "c4-train.00000-of-00002.json.gz", "rt") as fh:
        return [json.loads(line)["text"] for line in itertools.islice(fh, n_docs)]


def wrap(tok, name: str):
    """A `tokenizers.Tokenizer` as a Hugging Face fast tokenizer with <bos> and <eos>."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", name_or_path=name)


def sentencepiece_bpe(vocab_size: int = 3000, n_docs: int = 400):
    """Gemma's conventions: " " → "▁" by the normaliser, "▁" kept at the start of the next token, byte
    fallback for characters outside the vocabulary."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    byte_pieces = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS + byte_pieces, show_progress=False)
    tok.train_from_iterator(corpus(n_docs), trainer)
    return wrap(tok, "test-sentencepiece-bpe")


def gpt2_bpe(vocab_size: int = 3000, n_docs: int = 400):
    """GPT-2's layout: byte-level pre-tokenizer and decoder, a post-processor that trims offsets."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(corpus(n_docs), trainer)
    return wrap(tok, "test-gpt2-bpe")


def bounds_alignment(teacher_bounds, student_bounds):
    """An `hld.data.align.Alignment` with the given chunk bounds and made-up ids and text bounds, for the
    tests of what reads only an alignment's bounds (adversarial shapes no two tokenizers need produce)."""
    from hld.data.align import Alignment

    tb, sb = np.asarray(teacher_bounds, np.int32), np.asarray(student_bounds, np.int32)
    ids_t, ids_s = np.arange(tb[-1], dtype=np.int32) + 100, np.arange(sb[-1], dtype=np.int32) + 200
    return Alignment(ids_t, ids_s, tb, sb, char_bounds=np.arange(len(tb), dtype=np.int32))
