"""Teachers of other families, each a tiny random checkpoint saved by this test with the fixtures'
tokenizer: a multimodal `Gemma3ForConditionalGeneration` (vision tower in its files, an embedding
with more rows than the tokenizer, as Gemma 3 4B's 262,208 for 262,144 tokens), a Llama and a Qwen 3.
Each goes through kd, hld-joint, `hld cache-teacher`, `hld eval` and a two-cell study; the multimodal
one loads as its language model alone (no vision tensor is read) and `paper-123m` trains every arm
on it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import ASSETS, C4_VALIDATION, tiny_overrides
from hld.cli import main
from hld.flops import forward_flops_per_token

TOKENIZER = ASSETS / "tiny_tokenizer"
N_TOKENS = 512  # the tiny tokenizer's size
MM_ROWS = 520  # the multimodal teacher's embedding rows: 8 padded rows no token ever names


def _save(model, out: Path) -> Path:
    model.save_pretrained(out, safe_serialization=True)
    for f in TOKENIZER.iterdir():
        shutil.copy(f, out / f.name)
    return out


def _text(**extra) -> dict:
    return dict(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        intermediate_size=64,
        bos_token_id=2,
        eos_token_id=1,
        pad_token_id=0,
        **extra,
    )


def make_teacher(kind: str, out: Path) -> Path:
    import transformers as tf

    torch.manual_seed(0)
    if kind == "gemma3-multimodal":
        cfg = tf.Gemma3Config(
            text_config=_text(vocab_size=MM_ROWS, sliding_window=16),
            vision_config=dict(
                hidden_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=64,
                image_size=28,
                patch_size=14,
            ),
            mm_tokens_per_image=4,
            image_token_index=MM_ROWS - 1,
            boi_token_index=MM_ROWS - 2,
            eoi_token_index=MM_ROWS - 3,
        )
        model = tf.Gemma3ForConditionalGeneration(cfg)
    elif kind == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=N_TOKENS, **_text()))
    elif kind == "qwen3":
        model = tf.Qwen3ForCausalLM(tf.Qwen3Config(vocab_size=N_TOKENS, **_text()))
    else:
        raise ValueError(kind)
    return _save(model, out)


KINDS = ("gemma3-multimodal", "llama", "qwen3")


@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("teachers")
    return {k: make_teacher(k, root / k) for k in KINDS}


def _overrides(teacher: Path) -> list[str]:
    return [o for o in tiny_overrides() if not o.startswith("teacher.model=")] + [f"teacher.model={teacher}"]


def _run(capsys, argv: list[str]) -> dict:
    rc = main([*argv, "--json", "--quiet"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return json.loads(out.strip().splitlines()[-1])


def test_the_multimodal_checkpoint_really_holds_a_vision_tower(teachers):
    from safetensors import safe_open

    with safe_open(str(teachers["gemma3-multimodal"] / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("vision_tower.") for k in keys)
    assert any(k.startswith("language_model.model.") for k in keys)
    assert json.loads((teachers["gemma3-multimodal"] / "config.json").read_text())["architectures"] == [
        "Gemma3ForConditionalGeneration"
    ]


def test_multimodal_teacher_loads_its_language_model_alone(teachers, monkeypatch):
    """No vision tensor is materialised (every tensor read from the files is recorded), and the text
    model's logits equal those of the full multimodal model on text."""
    import safetensors
    import transformers as tf

    from hld.models import loading

    read: list[str] = []

    class Slice:
        def __init__(self, inner, key):
            self.inner, self.key = inner, key

        def __getitem__(self, item):
            read.append(self.key)
            return self.inner[item]

        def __getattr__(self, name):
            return getattr(self.inner, name)

    class Recording:
        def __init__(self, *a, **kw):
            self.f = real(*a, **kw)

        def __enter__(self):
            self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def get_tensor(self, key):
            read.append(key)
            return self.f.get_tensor(key)

        def get_slice(self, key):
            return Slice(self.f.get_slice(key), key)

        def __getattr__(self, name):
            return getattr(self.f, name)

    real = safetensors.safe_open
    import sys

    for mod in [m for m in list(sys.modules.values()) if m is not None]:
        # the module's own namespace: getattr on transformers' lazy modules imports their members (under
        # transformers 5.17 that reached an image processor needing torchvision, an optional package)
        if vars(mod).get("safe_open") is real and mod.__name__.startswith("transformers"):
            monkeypatch.setattr(mod, "safe_open", Recording)
    loaded = loading.load_causal_lm(str(teachers["gemma3-multimodal"]))
    assert type(loaded.model).__name__ == "Gemma3ForCausalLM"
    assert read and all(k.startswith("language_model.") for k in read), sorted(set(read))[:5]
    assert not any("vision" in n for n, _ in loaded.model.named_parameters())
    monkeypatch.undo()
    full = tf.Gemma3ForConditionalGeneration.from_pretrained(str(teachers["gemma3-multimodal"])).eval()
    x = torch.randint(3, N_TOKENS, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.eval()(x).logits, full(input_ids=x).logits, rtol=1e-5, atol=1e-5)
    assert loaded.model.get_input_embeddings().weight.shape[0] == MM_ROWS


def test_flops_read_the_text_config_and_each_familys_attention(teachers):
    from hld.models.loading import load_causal_lm

    for kind in KINDS:
        lm = load_causal_lm(str(teachers[kind])).model
        cfg = lm.config
        linear = sum(m.weight.numel() for m in lm.model.layers.modules() if isinstance(m, torch.nn.Linear))
        T = 32
        types = getattr(cfg, "layer_types", None) or ["full_attention"] * 4
        ctx = [(T + 1) / 2 if t == "full_attention" else sum(min(t_, 16) for t_ in range(1, T + 1)) / T for t in types]
        want = 2 * linear + sum(4 * 2 * 16 * c for c in ctx) + 2 * cfg.vocab_size * 32
        assert forward_flops_per_token(lm, T) == pytest.approx(want, rel=1e-12), kind


def test_mistral_sliding_window_applies_to_every_block():
    import transformers as tf

    lm = tf.MistralForCausalLM(tf.MistralConfig(vocab_size=64, sliding_window=4, **_text()))
    linear = sum(m.weight.numel() for m in lm.model.layers.modules() if isinstance(m, torch.nn.Linear))
    T = 10
    ctx = sum(min(t, 4) for t in range(1, T + 1)) / T
    assert forward_flops_per_token(lm, T) == pytest.approx(2 * linear + 4 * 4 * 2 * 16 * ctx + 2 * 64 * 32)


def _hf_loss(kind: str, teacher: Path, seq_len: int) -> tuple[float, int]:
    """The teacher's mean next-token NLL computed by transformers itself (the full multimodal class for
    the Gemma 3 checkpoint) on the BOS-led windows `hld eval` reads: the independent value of its loss."""
    import torch.nn.functional as F
    import transformers as tf

    from hld.data.tokenize import open_windows

    cls = tf.Gemma3ForConditionalGeneration if kind == "gemma3-multimodal" else tf.AutoModelForCausalLM
    model = cls.from_pretrained(str(teacher), torch_dtype=torch.float32).eval()
    tok = tf.AutoTokenizer.from_pretrained(str(teacher))
    ids = torch.from_numpy(np.asarray(open_windows(C4_VALIDATION, tok, seq_len=seq_len)[:])).long()
    assert (ids[:, 0] == tok.bos_token_id).all()
    with torch.no_grad():
        logits = model(input_ids=ids[:, :-1]).logits.double()
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
    n = ids[:, 1:].numel()
    return float(nll) / n, n


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.slow
def test_every_command_runs_on_the_teacher(kind, teachers, tmp_path, capsys):
    teacher = teachers[kind]
    over = _overrides(teacher)
    for arm in ("kd", "hld-joint"):
        s = _run(capsys, ["train", "--config", "smoke", "--out", str(tmp_path / arm), *over, f"objective.method={arm}"])
        assert s["steps"] >= 1 and s["val/loss"] == s["val/loss"]  # finite
        student = json.loads((tmp_path / arm / "student" / "config.json").read_text())
        assert student["vocab_size"] == (MM_ROWS if kind == "gemma3-multimodal" else N_TOKENS)
    m = _run(
        capsys,
        ["cache-teacher", "--config", "smoke", "--out", str(tmp_path / "cache"), *over, "objective.method=hld-joint"],
    )
    assert m["tokens"] >= 32 and m["top_k"] == 64
    s = _run(
        capsys,
        [
            "train",
            "--config",
            "smoke",
            "--out",
            str(tmp_path / "cached"),
            *over,
            "objective.method=hld-joint",
            f"teacher.cache={tmp_path / 'cache'}",
        ],
    )
    assert s["steps"] >= 1
    e = _run(capsys, ["eval", "--model", str(teacher), "--data", C4_VALIDATION, "--seq-len", "32"])
    want_loss, want_tokens = _hf_loss(kind, teacher, 32)
    assert e["tokens"] == want_tokens and e["loss"] == pytest.approx(want_loss, rel=1e-5)
    study = tmp_path / "study.yaml"
    study.write_text(
        "name: two\nbase: smoke\narms: [ce, kd]\nstudents: [tiny-1l]\nbudgets: [{tokens: 256}]\nseeds: [0]\n"
    )
    cell_over = [o for o in over if not o.startswith(("student.preset=", "budget."))]
    _run(capsys, ["study", "--config", str(study), "--out", str(tmp_path / "two"), *cell_over, "data.val_tokens=128"])
    rows = (tmp_path / "two" / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + 2  # header + two cells


@pytest.mark.slow
def test_paper_123m_trains_every_arm_on_a_multimodal_teacher(teachers, tmp_path, capsys):
    teacher = teachers["gemma3-multimodal"]
    over = [o for o in _overrides(teacher) if not o.startswith("student.preset=")]
    over += ["train.micro_batch_size=null", "data.val_tokens=64"]  # the paper-123m student itself, 4 steps
    for arm in ("ce", "kd", "hld-joint", "hld-first"):
        s = _run(
            capsys, ["train", "--config", "paper-123m", "--out", str(tmp_path / arm), *over, f"objective.method={arm}"]
        )
        assert s["arm"] == arm and s["student"] == "paper-123m" and s["tokens"] == 512
        assert 115e6 < s["student_params_non_embedding"] < 130e6


def test_a_checkpoint_missing_weights_is_refused_not_randomly_filled(teachers, tmp_path, capsys):
    """transformers would initialise missing weights at random; a teacher must be complete."""
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "llama-broken"
    shutil.copytree(teachers["llama"], broken)
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    rc = main(["eval", "--model", str(broken), "--data", C4_VALIDATION, "--seq-len", "32"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "lacks 1 weights" in err and "up_proj" in err, err
