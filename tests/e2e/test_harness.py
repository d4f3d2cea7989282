"""The lm-evaluation-harness adapter against direct computations with the tiny Gemma 3 teacher:
log-likelihoods the harness computes equal a plain forward + log_softmax over [BOS] + context +
continuation; accuracies equal hand counts; the CLI's errors are one line."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lm_eval")

from hld.cli import main  # noqa: E402
from hld.eval.harness import SHIPPED_TASKS, TASKS_DIR, evaluate_tasks, expand_tasks  # noqa: E402

ASSETS = Path(__file__).resolve().parents[1] / "assets"
TEACHER = ASSETS / "tiny_teacher"


@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TEACHER)
    model = AutoModelForCausalLM.from_pretrained(TEACHER, dtype=torch.float32).eval()
    return model, tok


def ids_of(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def direct(model, tok, context: str, continuation: str) -> tuple[float, bool]:
    """(log p(continuation | BOS + context), continuation is the greedy one), from one forward."""
    ctx, cont = ids_of(tok, context), ids_of(tok, continuation)
    assert ctx + cont == ids_of(tok, context + continuation)  # the split is unambiguous for these strings
    ids = torch.tensor([[tok.bos_token_id] + ctx + cont])
    logp = F.log_softmax(model(ids).logits[0].double(), dim=-1)  # (T, V)
    rows = logp[len(ctx) : len(ctx) + len(cont)]  # position i predicts token i + 1
    target = torch.tensor(cont)
    return float(rows.gather(1, target[:, None]).sum()), bool((rows.argmax(-1) == target).all())


def test_expand_tasks():
    assert expand_tasks("shipped,hellaswag") == ["hld_lambada", "hld_mc", "hellaswag"]
    assert expand_tasks("hld_mc, shipped,") == ["hld_mc", "hld_lambada"]
    assert expand_tasks("paper") == ["hellaswag", "winogrande", "lambada_openai", "piqa", "arc_easy", "wikitext"]
    assert set(SHIPPED_TASKS) == {p.stem for p in TASKS_DIR.glob("*.yaml")}


def test_loglikelihoods_equal_a_direct_forward(tiny):
    """Through lm-eval's HFLM request path (batching, padding, its continuation slicing, our
    continuation-only head): one BOS, then the text, never a second BOS or an EOS."""
    from lm_eval.api.instance import Instance

    from hld.eval.hld_lm import HldLM

    model, tok = tiny
    lm = HldLM(model=model, tokenizer=tok, batch_size=2, device="cpu", quiet=True, desc="t", stream=None)
    pairs = [
        ("The module provides a way of using the socket", " interface."),
        ("Return the name of the", " file"),
        ("A", " short one that is longer than its context"),
        ("", "An empty context is conditioned on BOS alone."),
    ]
    reqs = [Instance(request_type="loglikelihood", doc={}, arguments=p, idx=i) for i, p in enumerate(pairs)]
    got = lm.loglikelihood(reqs)
    for (ctx, cont), (logp, greedy) in zip(pairs, got):
        want_logp, want_greedy = direct(model, tok, ctx, cont)
        assert logp == pytest.approx(want_logp, rel=1e-5, abs=1e-4) and greedy == want_greedy
    # rolling (wikitext-style): every token of the text predicted after BOS; BOS itself never scored
    text = "Rolling windows score every token of a document once."
    (rolled,) = lm.loglikelihood_rolling(
        [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=0)]
    )
    first, rest = ids_of(tok, text)[0], text[len(tok.decode([ids_of(tok, text)[0]])) :]
    with torch.no_grad():
        ids = torch.tensor([[tok.bos_token_id] + ids_of(tok, text)])
        logp = F.log_softmax(model(ids).logits[0, :-1].double(), -1).gather(1, ids[0, 1:, None]).sum()
    assert rolled == pytest.approx(float(logp), rel=1e-5)
    assert first != tok.bos_token_id and rest


@pytest.mark.slow
def test_rolling_loglikelihood_uses_bos_led_windows(tiny):
    """A document longer than the window: chunks of rolling_len - 1 tokens, each scored after one BOS
    (the window protocol), every token predicted once; not the harness's overlapping windows."""
    from lm_eval.api.instance import Instance

    from hld.eval.hld_lm import HldLM

    model, tok = tiny
    W = 8
    lm = HldLM(model=model, tokenizer=tok, batch_size=3, device="cpu", quiet=True, desc="t", stream=None, rolling_len=W)
    texts = ["Rolling windows score every token of a document once, whatever the model's context length is.", "Short."]
    got = lm.loglikelihood_rolling(
        [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(t,), idx=i) for i, t in enumerate(texts)]
    )
    for text, rolled in zip(texts, got):
        ids = ids_of(tok, text)
        want = 0.0
        with torch.no_grad():
            for s in range(0, len(ids), W - 1):
                row = torch.tensor([[tok.bos_token_id] + ids[s : s + W - 1]])
                logp = F.log_softmax(model(row).logits[0, :-1].double(), -1)
                want += float(logp.gather(1, row[0, 1:, None]).sum())
        assert rolled == pytest.approx(want, rel=1e-5)
    assert len(ids_of(tok, texts[0])) > 2 * (W - 1)  # several windows


def _hand_mc(model, tok, ctx: str, endings: list[str], label: int) -> tuple[bool, bool]:
    """(acc, acc_norm) of one multiple-choice item: argmax of log-likelihood, and of it per character."""
    lls = [direct(model, tok, ctx, " " + e)[0] for e in endings]
    best = max(range(len(lls)), key=lls.__getitem__)
    best_norm = max(range(len(lls)), key=lambda i: lls[i] / len(endings[i]))
    return best == label, best_norm == label


# three items in HellaSwag's own format (the hub dataset Rowan/hellaswag); labels set below
HELLASWAG_ITEMS = [
    (
        "Sockets",
        "The server accepts a connection and",
        ["reads the request.", "sings a song.", "sleeps for a year.", "returns a socket."],
    ),
    (
        "Files",
        "To read a file, open it and",
        ["call read on the file object.", "paint it blue.", "go home.", "close the window."],
    ),
    (
        "Lists",
        "A list can be sorted",
        ["in place with sort.", "by the moon.", "never ever.", "into a dictionary of sets."],
    ),
]


@pytest.fixture(scope="module")
def hellaswag_rows(tiny) -> list[dict]:
    """Labels chosen so that the tiny model gets some but not all right: item 1's label is the
    model's favourite, item 2's its least favourite, item 3's its favourite per character."""
    model, tok = tiny
    rows = []
    for i, (act, ctx, endings) in enumerate(HELLASWAG_ITEMS):
        lls = [direct(model, tok, f"{act}: {ctx}", " " + e)[0] for e in endings]
        per_char = [ll / len(e) for ll, e in zip(lls, endings)]
        label = [lls.index(max(lls)), lls.index(min(lls)), per_char.index(max(per_char))][i]
        rows.append(
            {
                "ind": i,
                "activity_label": act,
                "ctx_a": ctx,
                "ctx_b": "",
                "ctx": ctx,
                "endings": endings,
                "label": str(label),
                "source_id": "x",
                "split": "val",
                "split_type": "indomain",
            }
        )
    return rows


def _hellaswag_hand_acc(model, tok, rows) -> tuple[float, float]:
    hand = [_hand_mc(model, tok, f"{x['activity_label']}: {x['ctx_a']}", x["endings"], int(x["label"])) for x in rows]
    return sum(a for a, _ in hand) / 3, sum(b for _, b in hand) / 3


@pytest.mark.slow
def test_hub_task_from_a_local_copy_matches_a_hand_count(tiny, hellaswag_rows, tmp_path):
    """hellaswag (a hub dataset) read from a save_to_disk copy: 3 items, acc and acc_norm by hand."""
    import datasets

    model, tok = tiny
    rows = hellaswag_rows
    datasets.DatasetDict({"validation": datasets.Dataset.from_list(rows)}).save_to_disk(tmp_path / "hs")
    r = evaluate_tasks(model, tok, ["hellaswag"], dataset_paths={"hellaswag": str(tmp_path / "hs")}, quiet=True)
    acc, acc_norm = _hellaswag_hand_acc(model, tok, rows)
    row = r["hellaswag"]
    assert row["n"] == 3 and row["chance"] == pytest.approx(0.25) and row["metric"] == "acc"
    assert row["value"] == pytest.approx(acc) and row["metrics"]["acc_norm"] == pytest.approx(acc_norm)
    assert 0 < acc < 1  # the items separate the choices
    p = row["value"]
    assert row["stderr"] == pytest.approx(math.sqrt(p * (1 - p) / 2))  # sample stderr of a mean over 3


@pytest.mark.slow
def test_shipped_tasks_via_cli_match_hand_counts(tiny, capsys):
    model, tok = tiny
    rc = main(
        [
            "eval",
            "--model",
            str(TEACHER),
            "--tasks",
            "shipped",
            "--limit",
            "3",
            "--json",
            "--data",
            str(ASSETS / "c4" / "c4-validation.*.json.gz"),
            "--seq-len",
            "32",
            "--dtype",
            "float32",
        ]
    )
    out, err = capsys.readouterr()
    assert rc == 0, err
    row = json.loads(out.strip().splitlines()[-1])
    assert row["ppl"] > 1 and row["windows"] > 0  # --data and --tasks together
    lines = (TASKS_DIR / "hld_mc.jsonl").read_text().splitlines()[:3]
    mc = [_hand_mc(model, tok, x["ctx"], x["endings"], x["label"]) for x in map(json.loads, lines)]
    got = row["tasks"]["hld_mc"]
    assert got["n"] == 3 and got["chance"] == 0.25
    assert got["value"] == pytest.approx(sum(a for a, _ in mc) / 3)
    assert got["metrics"]["acc_norm"] == pytest.approx(sum(b for _, b in mc) / 3)
    texts = [json.loads(x)["text"] for x in (TASKS_DIR / "hld_lambada.jsonl").read_text().splitlines()[:3]]
    lam = [direct(model, tok, t.rsplit(" ", 1)[0], " " + t.rsplit(" ", 1)[1]) for t in texts]
    got = row["tasks"]["hld_lambada"]
    assert got["metric"] == "acc" and got["chance"] is None and got["n"] == 3
    assert got["value"] == pytest.approx(sum(g for _, g in lam) / 3)
    assert got["metrics"]["perplexity"] == pytest.approx(math.exp(-sum(lp for lp, _ in lam) / 3), rel=1e-4)


@pytest.mark.slow
def test_quiet_eval_outside_a_git_checkout_prints_nothing_on_stderr(tmp_path):
    """The harness runs `git describe` for its results' provenance; outside a checkout git's "fatal: not
    a git repository" reached the terminal past every redirect. With --quiet stderr stays empty."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "hld",
            "eval",
            "--model",
            str(TEACHER),
            "--tasks",
            "hld_mc",
            "--limit",
            "2",
            "--dtype",
            "float32",
            "--quiet",
            "--json",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    assert p.stderr == "", p.stderr
    assert json.loads(p.stdout.strip().splitlines()[-1])["tasks"]["hld_mc"]["n"] == 2


@pytest.mark.slow
def test_unknown_task_is_one_line(capsys):
    rc = main(["eval", "--model", str(TEACHER), "--tasks", "hellaswg"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert "unknown lm-eval task 'hellaswg'" in err[0] and "hellaswag" in err[0] and "lm-eval ls tasks" in err[0]


def test_eval_needs_data_or_tasks(capsys):
    assert main(["eval", "--model", str(TEACHER)]) == 2
    assert "needs --data" in capsys.readouterr().err


@pytest.mark.slow
def test_hub_task_without_its_data_fails_fast_with_one_line(tiny, hellaswag_rows, tmp_path):
    """No network, an empty HF cache, offline mode: one line naming the task and the ways out; then
    the way out: the same command with --task-data pointing at a folder of split files."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HLD_"))}
    env.update(
        HF_DATASETS_OFFLINE="1",
        HF_HUB_OFFLINE="1",
        HF_HOME=str(tmp_path / "hf"),
        HF_DATASETS_CACHE=str(tmp_path / "hf" / "datasets"),
        HLD_CACHE_DIR=str(tmp_path / "hld"),
    )
    t0 = time.time()
    p = subprocess.run(
        [sys.executable, "-m", "hld", "eval", "--model", str(TEACHER), "--tasks", "hellaswag"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1, p.stderr
    line = lines[0]
    assert line.startswith("hld: error: the data of task hellaswag (Rowan/hellaswag) cannot be loaded")
    assert "HF_DATASETS_OFFLINE=1" in line and "--task-data hellaswag=DIR" in line
    assert time.time() - t0 < 120  # no network retries

    local = tmp_path / "hellaswag"
    local.mkdir()
    (local / "validation.jsonl").write_text("".join(json.dumps(x) + "\n" for x in hellaswag_rows))
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "hld",
            "eval",
            "--model",
            str(TEACHER),
            "--tasks",
            "hellaswag",
            "--task-data",
            f"hellaswag={local}",
            "--json",
            "--quiet",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    row = json.loads(p.stdout.strip().splitlines()[-1])["tasks"]["hellaswag"]
    acc, acc_norm = _hellaswag_hand_acc(*tiny, hellaswag_rows)
    assert row["n"] == 3 and row["value"] == pytest.approx(acc)
    assert row["metrics"]["acc_norm"] == pytest.approx(acc_norm)


@pytest.mark.parametrize(
    "extra, problem",
    [
        (["--task-data", "hellaswag"], "is not TASK=DIR"),
        (["--task-data", "hellaswag=/no/such/dir"], "--task-data hellaswag=/no/such/dir: no such directory"),
        (["--task-data", "piqa=/tmp"], "a local dataset is given for piqa, which is not among the tasks"),
    ],
)
def test_task_data_errors_are_one_line(capsys, extra, problem):
    rc = main(["eval", "--model", str(TEACHER), "--tasks", "hellaswag", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and problem in err[0], err
