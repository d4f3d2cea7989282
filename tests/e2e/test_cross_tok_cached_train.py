"""A per-chunk teacher cache through the whole tool (hld.cache.chunks): `hld cache-teacher` of a config with
`student.tokenizer` writes what its cross-tokenizer loss reads per chunk of the run's paired windows, `hld
train` with `teacher.cache` reads it, and the run matches the online run (the same config with the teacher in
the loop): alm exactly (float32 log-likelihoods), uld and the pooled hidden states within their storage's
rounding, gold within its top-k truncation. A cache built for one loss, pooling, top-k, temperature or student
tokenizer is refused by a run of another in one line, exit 2."""

from __future__ import annotations

import json

import pytest

from hld.cli import main


@pytest.fixture(scope="module")
def student_tokenizers(tmp_path_factory):
    from helpers import C4_TRAIN

    out = []
    for v in (600, 700):
        path = tmp_path_factory.mktemp("tok") / f"bpe{v}"
        assert main(["train-tokenizer", "--data", C4_TRAIN, "--vocab-size", str(v), "--out", str(path), "--quiet"]) == 0
        out.append(path)
    return out


def _args(overrides, tok, *extra) -> list[str]:
    return ["--config", "smoke", *overrides, f"student.tokenizer={tok}", *extra]


def _cache(tmp_path, overrides, tok, *extra):
    out = tmp_path / "cache"
    assert main(["cache-teacher", "--out", str(out), *_args(overrides, tok, *extra), "--quiet"]) == 0
    return out


def _train(out, overrides, tok, *extra) -> tuple[dict, list[dict]]:
    assert main(["train", "--out", str(out), *_args(overrides, tok, *extra), "--quiet"]) == 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return json.loads((out / "summary.json").read_text()), lines


# (arm, loss): relative tolerance of the cached run's val/loss and train/kd against the online run's
CASES = {
    ("kd", "alm"): 1e-5,  # float32 chunk log-likelihoods: the same numbers
    ("kd", "uld"): 1e-4,  # float16 probabilities: |dULD| <= 2^-11 a chunk, the gradient's signs kept
    ("hld-joint", "uld"): 1e-4,  # and bfloat16 pooled states (the teacher runs in float32 here)
    ("kd", "gold"): 1e-2,  # gold's exact part over the teacher's top-64 shared outcomes + the rest (a lower
}  # bound of forward KL, by the chain rule; the tiny teacher spreads its mass, so the cut is large here)


@pytest.mark.slow
@pytest.mark.parametrize("arm, loss", list(CASES))
def test_a_cached_run_matches_the_online_run(tmp_path, overrides, student_tokenizers, arm, loss, capsys):
    tok = student_tokenizers[0]
    keys = [f"objective.method={arm}", f"objective.cross_tokenizer.loss={loss}"]
    cache = _cache(tmp_path, overrides, tok, *keys)
    assert f"student tokens, per-chunk values for {loss}, layers" in capsys.readouterr().out  # not "top-64"
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["identity"]["cache_signal"] == "chunks" and manifest["identity"]["chunks"]["loss"] == loss
    online, on_lines = _train(tmp_path / "online", overrides, tok, *keys)
    cached, c_lines = _train(tmp_path / "cached", overrides, tok, *keys, f"teacher.cache={cache}")
    rel = CASES[(arm, loss)]
    assert cached["val/loss"] == pytest.approx(online["val/loss"], rel=rel)
    assert c_lines[0]["train/ce"] == on_lines[0]["train/ce"]  # the same first batch, the same student
    if loss == "gold":
        assert 0.5 * on_lines[0]["train/kd"] < c_lines[0]["train/kd"] < on_lines[0]["train/kd"]
    else:
        assert c_lines[0]["train/kd"] == pytest.approx(on_lines[0]["train/kd"], rel=rel * 10)
    if arm == "hld-joint":
        assert c_lines[0]["train/hidden"] == pytest.approx(on_lines[0]["train/hidden"], rel=1e-4)
        assert "layer_stats" in manifest and manifest["layer_stats"]["layers"]
        # the statistics the cached run standardised with are those the online run measured on the token states
        import torch

        a, b = (torch.load(tmp_path / r / "hidden_stats.pt") for r in ("online", "cached"))
        assert a.keys() == b.keys() == {int(t) for t in manifest["layer_stats"]["layers"]}
        for t in a:
            assert a[t]["count"] == b[t]["count"] > 0
            assert torch.equal(a[t]["mean"], b[t]["mean"]) and torch.equal(a[t]["std"], b[t]["std"])


def test_a_cache_for_another_loss_pooling_k_temperature_or_tokenizer_is_refused_in_one_line(
    tmp_path, overrides, student_tokenizers, capsys
):
    tok = student_tokenizers[0]
    base = ["objective.method=hld-joint", "objective.cross_tokenizer.loss=uld"]
    cache = _cache(tmp_path, overrides, tok, *base)
    capsys.readouterr()
    refused = [
        (tok, ["objective.cross_tokenizer.loss=alm"], "chunks.loss ('uld', this run needs 'alm')"),
        (tok, ["objective.cross_tokenizer.pooling=mean"], "chunks.pooling ('last', this run needs 'mean')"),
        (tok, ["objective.cross_tokenizer.uld_top_k=32"], "chunks.uld_top_k (64, this run needs 32)"),
        (tok, ["objective.temperature=2.0"], "chunks.temperature (1.0, this run needs 2.0)"),
        (student_tokenizers[1], [], "built with another data"),  # another student tokenizer: other windows
    ]
    for i, (t, extra, words) in enumerate(refused):
        argv = ["train", "--out", str(tmp_path / f"r{i}"), *_args(overrides, t, *base, *extra)]
        assert main([*argv, f"teacher.cache={cache}", "--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and "\n" not in err and "rebuild the cache" in err, err
    # a kd run reads the hld-joint cache (its pooled layers unused); a same-tokenizer run does not
    assert (
        main(["train", "--out", str(tmp_path / "kd"), *_args(overrides, tok, base[1]), f"teacher.cache={cache}"]) == 0
    )
    argv = ["train", "--out", str(tmp_path / "same"), "--config", "smoke", *overrides, f"teacher.cache={cache}"]
    assert main([*argv, "--quiet"]) == 2
    assert "built with another" in capsys.readouterr().err


def test_a_dry_run_of_a_per_chunk_cache_says_so_and_writes_nothing(tmp_path, overrides, student_tokenizers, capsys):
    dry = tmp_path / "dry"
    assert main(["cache-teacher", "--out", str(dry), *_args(overrides, student_tokenizers[0]), "--dry-run"]) == 0
    assert "a per-chunk cache (student.tokenizer)" in capsys.readouterr().out and not dry.exists()


@pytest.mark.slow
def test_micro_batches_read_their_own_windows_of_the_cache(tmp_path, overrides, student_tokenizers):
    """Each micro-batch asks the cache for its own windows (and chunks): two micro-batches a step log what the
    whole batch does, from the same cache."""
    tok = student_tokenizers[0]
    keys = ["objective.method=hld-joint", "objective.cross_tokenizer.loss=gold"]
    cache = _cache(tmp_path, overrides, tok, *keys)
    whole, lines = _train(tmp_path / "whole", overrides, tok, *keys, f"teacher.cache={cache}")
    parts, part_lines = _train(
        tmp_path / "parts", overrides, tok, *keys, f"teacher.cache={cache}", "train.micro_batch_size=2"
    )
    assert len(lines) == len(part_lines) > 1
    for a, b in zip(lines, part_lines):
        for key in ("train/loss", "train/ce", "train/kd", "train/hidden"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), key
    assert parts["val/loss"] == pytest.approx(whole["val/loss"], rel=1e-4)


@pytest.mark.slow
def test_a_study_builds_one_per_chunk_cache_for_its_cached_cells_and_they_match_the_online_cells(
    tmp_path, overrides, student_tokenizers
):
    """`hld study` with signals [topk, online] across tokenizers: kd and hld-joint on the cached signal share one
    cache group (a per-chunk cache holding the pooled layers kd leaves unread), and each scores what its online
    twin scores (uld: within its float16 rounding)."""
    import csv

    out = tmp_path / "study"
    keep = [o for o in overrides if not o.startswith(("student.preset", "train.batch_size", "budget.tokens"))]
    argv = ["study", "--config", "cross-tok", "--out", str(out), *keep, f"student.tokenizer={student_tokenizers[0]}"]
    argv += ["data.val_tokens=256", "seeds=[0]", "grid={objective.cross_tokenizer.loss: [uld]}"]
    assert main([*argv, "budgets=[{tokens: 512}]", "signals=[topk, online]", "--quiet"]) == 0
    (group,) = [p for p in (out / "caches").iterdir() if not p.name.startswith(".")]
    identity = json.loads((group / "manifest.json").read_text())["identity"]
    assert identity["cache_signal"] == "chunks" and identity["chunks"]["pooling"] == "last" and identity["layers"]
    rows = {r["cell"]: r for r in csv.DictReader((out / "results.csv").open())}
    for arm in ("kd", "hld-joint"):
        cached = rows[f"tiny-2l__tok512__lossuld__topk__s0__{arm}"]
        online = rows[f"tiny-2l__tok512__lossuld__online__s0__{arm}"]
        assert float(cached["val_loss"]) == pytest.approx(float(online["val_loss"]), rel=1e-4)
