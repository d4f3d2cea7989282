"""Offline teacher cache: KD from the cache equals KD online when k covers the vocabulary, and a
cache that does not match the run, or is damaged, is refused."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from hld.cache.build import ensure_cache
from hld.cache.reader import CachedTeacher
from hld.config import load_config
from hld.errors import HldError
from hld.train.loop import build, train_step
from hld.train.resources import Resources


def _grads_after_one_step(cfg, step: int = 0) -> dict[str, torch.Tensor]:
    s = build(cfg, Resources())
    grads = {}
    s.optimizer.step = lambda: grads.update(
        {n: p.grad.clone() for n, p in s.student.named_parameters() if p.grad is not None}
    )
    train_step(s, step)
    return grads


# the last case's budget (128 + 8 tokens) ends inside step 1, which reads a 2-position prefix of its windows
@pytest.mark.parametrize("method,budget,step", [("kd", 512, 0), ("hld-joint", 512, 0), ("kd", 136, 1)])
def test_kd_from_cache_equals_online_when_k_covers_the_vocabulary(tmp_path, overrides, method, budget, step):
    base = [
        *overrides,
        f"objective.method={method}",
        "teacher.cache_top_k=512",  # the tiny vocabulary
        f"budget.tokens={budget}",
        "teacher.cache_codec=exact",
        "teacher.cache_hidden_dtype=bfloat16",
    ]
    cfg = load_config("smoke", base)
    manifest = ensure_cache([cfg], tmp_path / "cache", Resources(), quiet=True)
    assert manifest["identity"]["top_k"] == 512
    online = _grads_after_one_step(cfg, step)
    cached = _grads_after_one_step(load_config("smoke", base + [f"teacher.cache={tmp_path / 'cache'}"]), step)
    assert online.keys() == cached.keys() and online
    for name in online:
        # the cache stores logits in fp16 and hidden states in bf16: equal up to that rounding
        torch.testing.assert_close(cached[name], online[name], rtol=2e-2, atol=2e-4, msg=name)


EXACT = ("teacher.cache_codec=exact", "teacher.cache_hidden_dtype=bfloat16")  # format 2's arrays, in format 3


def _cache(tmp_path, overrides, extra=()):
    cfg = load_config("smoke", [*overrides, "objective.method=hld-joint", *extra])
    ensure_cache([cfg], tmp_path / "cache", Resources(), quiet=True)
    return cfg


def _open(cfg, path):
    return build(load_config("smoke", [*_ov(cfg), f"teacher.cache={path}"]), Resources())


def _ov(cfg):
    return [
        f"teacher.model={cfg.teacher.model}",
        f"data.train={cfg.data.train}",
        f"data.validation={cfg.data.validation}",
        "student.preset=tiny-2l",
        f"data.seq_len={cfg.data.seq_len}",
        f"train.batch_size={cfg.train.batch_size}",
        f"budget.tokens={cfg.budget.tokens}",
        "objective.method=hld-joint",
        "train.precision=float32",
        "teacher.dtype=float32",
    ]


def test_cache_holds_the_exact_tokens_and_layers(tmp_path, overrides):
    cfg = _cache(tmp_path, overrides, EXACT)  # the compact codec: tests/unit/test_cache_codec.py
    s = _open(cfg, tmp_path / "cache")
    assert isinstance(s.teacher, CachedTeacher)
    batch = s.order.batch(1)
    sig = s.teacher(batch, s.plan.needs)
    assert set(sig.hidden) == {2, 3}  # uniform map of a 2-block student onto the 3-block teacher
    assert sig.source.values.shape == (batch.input_ids.numel(), 64)
    # the stored top-k really are the teacher's top-k logits
    with torch.no_grad():
        logits = s.teacher_lm(batch.input_ids).logits
    want = logits.topk(64, dim=-1)
    torch.testing.assert_close(sig.source.values.float(), want.values.reshape(-1, 64), rtol=1e-3, atol=1e-2)


def test_manifest_mismatch_is_refused(tmp_path, overrides):
    cfg = _cache(tmp_path, overrides)
    with pytest.raises(HldError, match="another seq_len"):
        build(load_config("smoke", [*_ov(cfg), "data.seq_len=16", f"teacher.cache={tmp_path / 'cache'}"]), Resources())
    with pytest.raises(HldError, match="top-64 logits, the run asks for top-100"):
        build(
            load_config("smoke", [*_ov(cfg), "objective.top_k=100", f"teacher.cache={tmp_path / 'cache'}"]), Resources()
        )
    with pytest.raises(HldError, match="lacks teacher layers"):
        build(
            load_config(
                "smoke",
                [
                    *_ov(cfg),
                    "objective.hidden.mapping=explicit",
                    "objective.hidden.pairs=[[1, 1]]",
                    f"teacher.cache={tmp_path / 'cache'}",
                ],
            ),
            Resources(),
        )


def _flip(path, at=-10):
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupt_or_truncated_shard_is_refused_before_its_first_use(tmp_path, overrides):
    cfg = _cache(tmp_path, overrides)
    part = tmp_path / "cache" / "parts" / "p00000of00001.topk_values.bin"
    _flip(part)
    s = _open(cfg, tmp_path / "cache")  # opening reads no data: the checksum is checked on first read
    with pytest.raises(HldError, match=r"cache shard 0 \(topk_values.*is corrupt \(checksum mismatch\)"):
        s.teacher(s.order.batch(0), s.plan.needs)
    part.write_bytes(part.read_bytes()[:-100])
    with pytest.raises(HldError, match="topk_values.bin is .* bytes, its manifest says"):
        _open(cfg, tmp_path / "cache")


def test_cached_tokens_must_match_the_batch(tmp_path, overrides):
    cfg = _cache(tmp_path, overrides)
    s = _open(cfg, tmp_path / "cache")
    batch = s.order.batch(0)
    batch.input_ids[0, 3] += 1
    with pytest.raises(HldError, match="other tokens"):
        s.teacher(batch, s.plan.needs)


def test_manifest_records_identity_and_checksums(tmp_path, overrides):
    _cache(tmp_path, overrides, EXACT)
    m = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert m["identity"]["teacher"].startswith("dir:") and m["identity"]["seq_len"] == 32
    assert m["tokens"] == m["n_windows"] * 32
    for rec in m["shards"]:
        assert all(len(f["sha256"]) == 64 for f in rec["fields"].values())
    f = m["shards"][0]["fields"]["topk_indices"]
    raw = (tmp_path / "cache" / "parts" / "p00000of00001.topk_indices.bin").read_bytes()
    arr = np.frombuffer(raw[f["offset"] : f["offset"] + f["nbytes"]], np.int32)
    assert arr.size == m["n_windows"] * 32 * 64 and (arr >= 0).all() and (arr < 512).all()
    assert hashlib.sha256(raw[f["offset"] : f["offset"] + f["nbytes"]]).hexdigest() == f["sha256"]


def test_cached_top_k_keeps_the_teachers_remaining_mass(tmp_path, overrides):
    """topk_rest = log of the teacher's mass off its stored top k, against HF's own logits (float64)."""
    from transformers import AutoModelForCausalLM

    from hld.distill.signals import Needs

    exact = [*overrides, "objective.method=kd", "teacher.cache_top_k=16", "teacher.cache_codec=exact"]
    cfg = load_config("smoke", exact)
    ensure_cache([cfg], tmp_path / "cache", Resources(), quiet=True)
    s = build(load_config("smoke", [*exact, f"teacher.cache={tmp_path / 'cache'}"]), Resources())
    batch = s.order.batch(0)
    sig = s.teacher(batch, Needs(logits=True))
    lm = AutoModelForCausalLM.from_pretrained(cfg.teacher.model, dtype=torch.float32).eval()
    with torch.no_grad():
        z = lm(input_ids=batch.input_ids).logits.double()  # (B, T, V)
    top = z.topk(16, dim=-1)
    np.testing.assert_array_equal(sig.source.indices.numpy(), top.indices.reshape(-1, 16).numpy())
    rest = torch.logsumexp(z.scatter(-1, top.indices, float("-inf")), dim=-1)  # (B, T)
    torch.testing.assert_close(sig.source.rest.double(), rest.reshape(-1), rtol=1e-5, atol=1e-5)
    # every window starts with BOS, and the teacher saw exactly the run's windows
    assert (batch.input_ids[:, 0] == 2).all()


def test_a_cache_of_the_first_format_is_refused_with_a_rebuild_message(tmp_path, overrides):
    cfg = _cache(tmp_path, overrides)
    path = tmp_path / "cache" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["format_version"] = 1
    manifest.pop("protocol")
    path.write_text(json.dumps(manifest))
    with pytest.raises(HldError, match="without a leading BOS.*rebuild it with `hld cache-teacher`"):
        _open(cfg, tmp_path / "cache")
