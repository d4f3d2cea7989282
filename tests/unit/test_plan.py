"""`hld plan`: the shipped Gemma 3 configs give the published sizes, the plan's numbers agree with what a
run does (steps, FLOPs, cache bytes) and with scripts/teacher_cost.py, and the memory estimate is
within a stated factor of a measured CPU peak."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hld.cache.build import ensure_cache
from hld.cli import main
from hld.config import load_config
from hld.models.loading import meta_causal_lm, model_config
from hld.models.student import count_params
from hld.plan import plan_run
from hld.train.loop import build
from hld.train.resources import Resources

ROOT = Path(__file__).resolve().parents[2]
# published sizes of the Gemma 3 checkpoints (text model): 270M, 1B, 4B (3.9B without the vision tower), 12B, 27B
PUBLISHED = {"270m": 268e6, "1b": 1.0e9, "4b": 3.9e9, "12b": 11.8e9, "27b": 27e9}


@pytest.mark.parametrize("size", list(PUBLISHED))
def test_shipped_gemma3_configs_give_the_published_sizes(size):
    for kind in ("pt", "it"):
        lm = meta_causal_lm(model_config(f"google/gemma-3-{size}-{kind}"))
        total = count_params(lm)["total"]
        assert abs(total / PUBLISHED[size] - 1) < 0.03, (size, total)
        assert next(lm.parameters()).device.type == "meta"


def test_plan_reads_no_weights_no_tokenizer_and_no_hub(monkeypatch):
    import transformers

    def refuse(*a, **k):
        raise AssertionError("hld plan must not load weights or a tokenizer")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)
    row = plan_run(load_config("paper-123m"))
    assert row["teacher_params"] == count_params(meta_causal_lm(model_config("google/gemma-3-4b-pt")))["total"]
    assert row["student_params_non_embedding"] == pytest.approx(121e6, rel=0.01)
    assert row["length"]["teacher_counted"]["steps"] == 2_000_000_000 // (256 * 2048) + 1


@pytest.mark.slow
def test_teacher_cost_script_agrees_with_plan():
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "teacher_cost.py")],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    ).stdout
    for preset in ("paper-123m", "paper-735m"):
        line = next(x for x in out.splitlines() if x.startswith(preset))
        student, teacher = (float(x) for x in re.findall(r"([\d.]+e[+-]\d+) FLOPs/token", line))
        c = plan_run(load_config(preset))["flops_per_token"]["kd"]
        assert f"{c['student']:.3e}" == f"{student:.3e}" and f"{c['teacher']:.3e}" == f"{teacher:.3e}", line


@pytest.mark.parametrize("method", ["kd", "hld-joint", "hld-first"])
def test_plan_steps_and_flops_equal_the_runs(overrides, method):
    cfg = load_config("smoke", [*overrides, f"objective.method={method}", "budget.tokens=null", "budget.flops=1.5e9"])
    s = build(cfg, Resources())
    row = plan_run(cfg)
    assert row["length"]["teacher_counted"]["steps"] == s.total_steps
    assert row["flops_per_token"][s.plan.phases[0].name]["teacher"] == s.costs[s.plan.phases[0].name].teacher
    free = build(
        load_config(
            "smoke",
            [
                *overrides,
                f"objective.method={method}",
                "budget.tokens=null",
                "budget.flops=1.5e9",
                "budget.count_teacher=false",
            ],
        ),
        Resources(),
    )
    assert row["length"]["teacher_not_counted"]["steps"] == free.total_steps > s.total_steps


@pytest.mark.parametrize("codec", ["exact", "compact"])
def test_plan_cache_size_matches_a_built_cache(tmp_path, overrides, codec):
    hidden = "bfloat16" if codec == "exact" else "fp8"
    cfg = load_config(
        "smoke",
        [
            *overrides,
            "objective.method=hld-joint",
            f"teacher.cache_codec={codec}",
            f"teacher.cache_hidden_dtype={hidden}",
        ],
    )
    m = ensure_cache([cfg], tmp_path / "cache", Resources(), quiet=True)
    plan = plan_run(cfg)["cache"]
    assert plan["tokens"] == m["tokens"] and plan["layers"] == m["identity"]["layers"]
    files = sum((tmp_path / "cache" / f).stat().st_size for f in m["files"])
    headers = 0  # raw part files: no per-file header
    if codec == "exact":  # the formula is exact
        assert plan["bytes"] == files - headers
    else:  # an estimate (gap widths measured on the Gemma vocabulary), never above the bound
        assert files - headers <= plan["bytes_bound"]
        assert plan["bytes"] == pytest.approx(files - headers, rel=0.25)


def test_cli_plan_json_for_a_run_and_a_study(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["plan", "--config", "paper-735m", "--json", "--world-size", "8", "train.parallel=fsdp2"]) == 0
    row = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert row["world_size"] == 8 and row["memory_bytes"]["params"] == pytest.approx(
        (row["student_params"] + row["projector_params"]) * 16 / 8
    )
    assert main(["plan", "--config", "scratch", "--json"]) == 0  # the from-scratch study (the demo until issue 33)
    study = json.loads(capsys.readouterr().out.splitlines()[-1])
    # 4 arms at equal tokens + ce at kd's FLOPs, x 4 seeds; seeds give the same numbers: merged
    assert sum(len(b["cells"]) for b in study["blocks"]) == 20 and len(study["blocks"]) == 5
    assert [c["layers"] for c in study["caches"]] == [[9, 18]] * 4  # a group per seed, every HLD layer of it
    kd = next(b for b in study["blocks"] if b["arm"] == "kd")
    eq = next(b for b in study["blocks"] if "eqflops" in b["cells"][0])
    # the equal-FLOPs ce cells are planned at the FLOPs their kd cell is planned to spend, teacher counted
    assert eq["budget"]["flops"] == pytest.approx(kd["length"]["teacher_counted"]["flops"])
    assert eq["length"]["teacher_counted"]["flops"] <= eq["budget"]["flops"]
    # every cell exports its student in float32: 20 tiny-2l students of Gemma 3's vocabulary, counted by hand
    import torch

    from hld.config import StudentConfig
    from hld.models.student import build_student

    with torch.device("meta"):
        tiny = build_student(StudentConfig(preset="tiny-2l"), vocab_size=262144, bos_id=2, eos_id=1, pad_id=0, seed=0)
    assert study["student_bytes"] == 20 * 4 * sum(p.numel() for p in tiny.parameters())  # (tied: once)
    assert main(["plan", "--config", "demo", "--run"]) == 0  # the run preset of that name
    assert "demo: kd, student tiny-2l" in capsys.readouterr().out


MEASURE = r"""
import json, sys
from hld.config import load_config
from hld.plan import plan_run
from hld.train.loop import build, train_step
from hld.train.resources import Resources
import hld.train.loop as loop

# the head is sized by a 65,536-row vocabulary on purpose, the tiny tokenizer's 512 ids a subset of it:
# the refusal of a tokenizer far smaller than its model's vocabulary (a missing tokenizer) is lifted here
loop.check_tokenizer_size = lambda *a, **k: None

def status():
    lines = [x for x in open("/proc/self/status") if x.startswith(("VmRSS", "VmHWM"))]
    return {x.split(":")[0]: int(x.split()[1]) * 1024 for x in lines}

cfg = load_config("smoke", json.loads(sys.argv[1]))
res = Resources()
tok = res.tokenizer(cfg.teacher.model)  # what build() reads from disk, loaded first: not the run's memory
d = cfg.data
if cfg.student.tokenizer:  # paired windows
    import hld.models.loading as loading
    loading.check_tokenizer_size = loop.check_tokenizer_size
    student_tok = res.tokenizer(cfg.student.tokenizer, "student.tokenizer")
    res.paired_windows(d, tok, student_tok)
    res.paired_validation(d, tok, student_tok)
else:
    res.windows(d.train, tok, seq_len=d.seq_len, text_field=d.text_field, max_docs=d.max_train_docs)
    res.validation_windows(cfg.data, tok)
base = status()["VmRSS"]
open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
s = build(cfg, res)
for step in range(2):  # the second step holds the optimiser's states from the first
    train_step(s, step)
print(json.dumps({"measured": status()["VmHWM"] - base, "estimate": plan_run(cfg)["memory_bytes"]}))
"""
FACTOR = 1.5  # the estimate is within this factor of the measured peak (allocator slack, temporaries)


def _wide_teacher(tmp_path: Path, assets: Path) -> Path:
    """The tiny teacher's tokenizer with a 65,536-row vocabulary: a sizeable head."""
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(assets / "tiny_teacher" / f, teacher / f)
    config = json.loads((assets / "tiny_teacher" / "config.json").read_text())
    (teacher / "config.json").write_text(json.dumps({**config, "vocab_size": 65536}))
    return teacher


def _estimate_over_measured(ov: list[str]) -> float:
    """`MEASURE` of the config `ov` in a fresh process: plan_run's estimate over the measured peak RSS."""
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, json.dumps(ov)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.splitlines()[-1])
    ratio = r["estimate"]["total"] / r["measured"]
    print(
        f"estimate {r['estimate']['total'] / 2**20:.0f} MiB, measured {r['measured'] / 2**20:.0f} MiB, "
        f"ratio {ratio:.2f}; terms { ({k: round(v / 2**20) for k, v in r['estimate'].items()}) }"
    )
    return ratio


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to reset the peak RSS")
@pytest.mark.slow
def test_memory_estimate_is_within_a_factor_of_the_measured_cpu_peak(tmp_path, overrides, assets):
    teacher = _wide_teacher(tmp_path, assets)
    ov = [
        *overrides,
        f"teacher.model={teacher}",
        "objective.method=ce",
        "student.preset=small-6l",
        "data.seq_len=128",
        "train.batch_size=8",
        "budget.tokens=2048",
        "train.loss_chunk_tokens=256",
    ]
    assert 1 / FACTOR <= _estimate_over_measured(ov) <= FACTOR


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to reset the peak RSS")
@pytest.mark.slow
@pytest.mark.parametrize("method", ["kd", "hld-joint"])
def test_a_paired_runs_memory_estimate_is_within_a_factor_of_the_measured_cpu_peak(tmp_path, overrides, assets, method):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    teacher = _wide_teacher(tmp_path, assets)  # with random weights: a teacher of 65,536 ids
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(teacher)).save_pretrained(teacher)
    ov = [
        *overrides,
        f"teacher.model={teacher}",
        "student.tokenizer=sample-bpe-8k",
        f"objective.method={method}",
        "objective.cross_tokenizer.loss=uld",
        "student.preset=small-6l",
        "data.seq_len=256",
        "train.batch_size=16",
        "budget.tokens=100000",
        "train.loss_chunk_tokens=256",
    ]
    assert 1 / FACTOR <= _estimate_over_measured(ov) <= FACTOR


def test_plan_refuses_a_world_size_that_does_not_split_the_batch(capsys):
    for n, says in (("3", "not a multiple of the world size 3"), ("0", "--world-size 0 is not a positive")):
        assert main(["plan", "--config", "paper-123m", "--world-size", n]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("hld: error: ") and says in err[0], err


def test_plan_sizes_the_paired_store_a_student_with_its_own_tokenizer_builds(tmp_path, overrides):
    from hld.data.paired import open_paired
    from hld.plan import format_run

    stores = tmp_path / "stores"
    cfg = load_config("smoke", [*overrides, "student.tokenizer=sample-bpe-8k", f"data.store_dir={stores}"])
    row = plan_run(cfg)
    d, ratio = row["data"], row["vocabulary"]["token_ratio"]
    per = 4 + 4 * ratio + 3 * 4  # uint32 student token + ratio uint32 teacher tokens + a (3,) uint32 chunk row
    assert d["paired"]["bytes_per_student_token"] == pytest.approx(per)
    assert d["train"]["paired_store"] is None and d["paired"]["train"]["bytes"] is None  # a local corpus: whole
    assert d["paired"]["validation"]["bytes"] == pytest.approx(d["validation"]["reads"] * per)
    assert "paired store" in "\n".join(format_run(row)) and "token store" not in "\n".join(format_run(row))

    res = Resources()
    teacher, student = res.tokenizer(cfg.teacher.model), res.tokenizer("sample-bpe-8k", "student.tokenizer")
    store = open_paired(cfg.data.train, teacher, student, store_dir=str(stores))  # the whole fixture corpus
    d = plan_run(cfg)["data"]
    built = d["train"]["paired_store"]
    shards = store.path / "shards"
    size = {k: sum(f.stat().st_size for f in shards.glob(f"*.{k}.bin")) for k in ("student", "teacher", "chunks")}
    assert built["bytes"] == sum(size.values()) == d["paired"]["train"]["bytes"]
    assert (built["student_tokens"], built["teacher_tokens"], built["chunks"]) == (
        size["student"] // 4,
        size["teacher"] // 4,
        size["chunks"] // 12,
    )
    assert d["train"]["stored"] == built["student_tokens"] and d["paired"]["train"]["built"]
    # the estimate per student token is a bound: a chunk holds at least one student token
    teacher_per_student = built["teacher_tokens"] / built["student_tokens"]
    assert built["bytes"] <= built["student_tokens"] * (4 + 4 * teacher_per_student + 12)
    line = next(x for x in format_run(plan_run(cfg)) if x.startswith("  data:"))
    assert f"{built['chunks'] / 1e3:.3g}K chunks" in line, line
