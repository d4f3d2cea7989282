"""A run fed from the teacher cache reads no teacher weights: its shapes come from the cache manifest
(or config.json) on the meta device, its identity from the weight files' names, sizes and mtimes. Its
results equal those of a cached run that holds the teacher (the layer diagnostics load it)."""

from __future__ import annotations

import json
import shutil

import pytest
import transformers

import hld.models.loading
import hld.train.resources
from hld.cache.build import ensure_cache
from hld.config import load_config
from hld.errors import HldError
from hld.train.loop import build, train
from hld.train.resources import Resources


def _cfg(overrides, method, *extra):
    return load_config("smoke", [*overrides, f"objective.method={method}", *extra])


def _no_weights(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a cached run read the teacher's weights")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(hld.models.loading, "load_causal_lm", refuse)
    monkeypatch.setattr(hld.train.resources, "load_causal_lm", refuse)


def _metrics(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [
        {k: v for k, v in r.items() if k.startswith("train/") or k in ("step", "val/loss", "grad_norm")} for r in rows
    ]


@pytest.mark.parametrize("method", ["kd", "hld-joint"])
def test_cached_run_reads_no_teacher_weights_and_trains_the_same(tmp_path, overrides, monkeypatch, method):
    cache = tmp_path / "cache"
    ensure_cache([_cfg(overrides, method)], cache, Resources(), quiet=True)
    # today's path: the diagnostics need the teacher's states, so this run loads its weights
    held = train(_cfg(overrides, method, f"teacher.cache={cache}"), tmp_path / "held", quiet=True)
    _no_weights(monkeypatch)
    cfg = _cfg(overrides, method, f"teacher.cache={cache}", "objective.hidden.diagnostics=false")
    s = build(cfg, Resources())
    assert s.teacher_lm is None and next(iter(s.costs.values())).teacher > 0  # FLOPs from the meta teacher
    free = train(cfg, tmp_path / "free", quiet=True)
    assert _metrics(tmp_path / "free") == _metrics(tmp_path / "held")  # bitwise: same floats
    assert free["flops"] == held["flops"] and free["val/loss"] == held["val/loss"]


def test_a_cache_without_teacher_config_reads_config_json(tmp_path, overrides, monkeypatch):
    cache = tmp_path / "cache"
    ensure_cache([_cfg(overrides, "kd")], cache, Resources(), quiet=True)
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["teacher_config"]["hidden_size"] == 48  # the tiny teacher's
    del manifest["teacher_config"]  # a cache built before the manifest carried it
    (cache / "manifest.json").write_text(json.dumps(manifest))
    _no_weights(monkeypatch)
    s = build(_cfg(overrides, "kd", f"teacher.cache={cache}", "objective.hidden.diagnostics=false"), Resources())
    assert s.teacher_lm is None and s.total_steps == 4


def test_a_cache_of_another_teacher_is_refused_without_loading_it(tmp_path, overrides, assets, monkeypatch):
    cache = tmp_path / "cache"
    ensure_cache([_cfg(overrides, "kd")], cache, Resources(), quiet=True)
    other = tmp_path / "other_teacher"  # the same files, other weights by identity (name, size, mtime)
    shutil.copytree(assets / "tiny_teacher", other)
    (other / "model.safetensors").touch()
    _no_weights(monkeypatch)
    with pytest.raises(HldError, match="another teacher"):
        build(
            _cfg(
                overrides,
                "kd",
                f"teacher.model={other}",
                f"teacher.cache={cache}",
                "objective.hidden.diagnostics=false",
            ),
            Resources(),
        )


def test_which_cached_runs_read_the_teacher_weights(overrides):
    import torch

    from hld.distributed import Dist
    from hld.train.loop import teacher_weights_needed

    one, two = Dist(device=torch.device("cpu")), Dist(world_size=2, mode="ddp", device=torch.device("cpu"))
    cached = [*overrides, "teacher.cache=/somewhere"]
    assert teacher_weights_needed(_cfg(overrides, "kd"), one)  # online
    assert teacher_weights_needed(_cfg(cached, "kd"), one)  # the diagnostics read the teacher's states
    assert not teacher_weights_needed(_cfg(cached, "kd", "objective.hidden.diagnostics=false"), one)
    assert not teacher_weights_needed(_cfg(cached, "hld-joint"), two)  # no diagnostics under torchrun
    assert teacher_weights_needed(
        _cfg(cached, "hld-joint", "objective.hidden.loss=lens", "objective.hidden.diagnostics=false"), two
    )  # the lens reads its head
    own = [*cached, "student.tokenizer=sample-bpe-8k", "student.preset=tiny-2l"]  # a per-chunk cache
    assert not teacher_weights_needed(_cfg(own, "hld-joint"), one)  # no diagnostics across tokenizers
