"""Config: every shipped YAML loads; unknown keys, wrong types and contradictions are HldErrors that
name the key; overrides are YAML scalars; the dump round-trips; student presets have the sizes the
paper names (counted on the meta device and by hand, never by instantiating 735M parameters)."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
import yaml

from hld.config import PRESET_DIR, RunConfig, dump_yaml, field_help, load_config
from hld.errors import HldError
from hld.models.student import PRESETS, StudentShape, build_student, count_params, resolve_shape, student_config

SHIPPED = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def test_presets_are_shipped():
    assert {"demo", "smoke"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_yaml_loads(name):
    cfg = load_config(name)
    assert isinstance(cfg, RunConfig)
    raw = yaml.safe_load((PRESET_DIR / f"{name}.yaml").read_text())

    # every value written in the YAML arrives in the config (nothing silently dropped)
    def check(section: dict, obj, where: str) -> None:
        for k, v in section.items():
            got = getattr(obj, k)
            if isinstance(v, dict):
                check(v, got, f"{where}{k}.")
            else:
                assert got == v, f"{where}{k}"

    check(raw, cfg, "")
    assert load_config(str(PRESET_DIR / f"{name}.yaml")) == cfg  # by path as well as by name


def test_missing_config_file():
    with pytest.raises(HldError, match="nope.yaml.*neither a file nor a shipped one"):
        load_config("nope.yaml")


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["bogus=1"], "unknown config key bogus"),
        (["train.lrr=1"], "unknown config key train.lrr"),
        (["objective.hidden.pears=[[1, 2]]"], "unknown config key objective.hidden.pears"),
    ],
)
def test_unknown_key_override(overrides, key):
    with pytest.raises(HldError, match=key.replace(".", r"\.")):
        load_config("smoke", overrides)


def test_unknown_key_in_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: x\ntrain:\n  batch_size: 4\n  warmup_steps: 10\n")
    with pytest.raises(HldError, match=r"train\.warmup_steps"):
        load_config(str(path))
    path.write_text("name: x\nstudnet:\n  preset: tiny-1l\n")
    with pytest.raises(HldError, match="unknown config key studnet"):
        load_config(str(path))


def test_unknown_key_hint():
    with pytest.raises(HldError, match=r"did you mean train\.warmup_share"):
        load_config(None, ["train.warmup=0.1"])


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.batch_size=abc", "train.batch_size"),
        ("train.batch_size=1.5", "train.batch_size"),
        ("train.batch_size=true", "train.batch_size"),  # a bool is not an int
        ("train.lr=fast", "train.lr"),
        ("train.lr=[1]", "train.lr"),
        ("train.betas=0.9", "train.betas"),
        ("data.max_train_docs=many", "data.max_train_docs"),
        ("data.seq_len=[128]", "data.seq_len"),
        ("train=3", "train"),  # a section given a scalar
    ],
)
def test_wrong_type(override, key):
    with pytest.raises(HldError, match=rf"config {key.replace('.', '[.]')}\b"):
        load_config(None, [override])


@pytest.mark.parametrize(
    "override, key",
    [
        ("objective.method=distill", "objective.method"),
        ("objective.divergence=kl", "objective.divergence"),
        ("objective.hidden.loss=l1", "objective.hidden.loss"),
        ("train.schedule=linear", "train.schedule"),
        ("teacher.dtype=float16", "teacher.dtype"),
    ],
)
def test_bad_literal(override, key):
    with pytest.raises(HldError, match=rf"config {key.replace('.', '[.]')}=.* is not one of"):
        load_config(None, [override])


def test_overrides_are_yaml_scalars():
    cfg = load_config(
        "smoke",
        [
            "train.lr=3e-4",
            "train.grad_clip=0",
            "data.max_train_docs=null",
            "train.betas=[0.8, 0.99]",
            "objective.hidden.pairs=[[1, 2], [2, 3]]",
            "objective.hidden.mapping=explicit",
            "objective.top_k=64",
            "name=my run",
            "train.micro_batch_size=2",
            "objective.method=hld-joint",
            "data.train=hf:allenai/c4:en:train",
        ],
    )
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    assert cfg.train.grad_clip == 0.0 and isinstance(cfg.train.grad_clip, float)  # int accepted for float
    assert cfg.data.max_train_docs is None
    assert cfg.train.betas == [0.8, 0.99]
    assert cfg.objective.hidden.pairs == [[1, 2], [2, 3]]
    assert cfg.objective.top_k == 64 and cfg.name == "my run" and cfg.train.micro_batch_size == 2
    assert cfg.data.train == "hf:allenai/c4:en:train"  # only the first '=' splits
    # untouched values still come from the YAML, then the dataclass defaults
    assert cfg.data.seq_len == 64 and cfg.data.val_tokens == 2048 and cfg.train.seed == 0


def test_later_override_wins_and_malformed_override():
    assert load_config(None, ["train.lr=1e-3", "train.lr=2e-3"]).train.lr == pytest.approx(2e-3)
    with pytest.raises(HldError, match="key=value"):
        load_config(None, ["train.lr"])
    with pytest.raises(HldError, match="non-section"):
        load_config("smoke", ["name.first=1"])


@pytest.mark.parametrize(
    "overrides, problem",
    [
        (["objective.method=hld-first", "objective.hidden.first_share=0"], "first_share"),
        (["objective.method=hld-first", "objective.hidden.first_share=1"], "first_share"),
        (["train.batch_size=8", "train.micro_batch_size=3"], "micro_batch_size=3 does not divide"),
        (["train.micro_batch_size=0"], "micro_batch_size"),
        (["objective.alpha=1.5"], r"alpha=1\.5 is outside \[0, 1\]"),
        (["objective.alpha=-0.1"], r"alpha=-0\.1 is outside"),
        (["budget.tokens=100", "train.batch_size=4", "data.seq_len=32"], "budget.tokens=100 is less than one step"),
        (["data.seq_len=1"], "seq_len"),
        (["train.lr=0"], "train.lr"),
        (["objective.temperature=0"], "temperature"),
        (["objective.hidden.mapping=explicit"], "needs objective.hidden.pairs"),
        (["objective.method=hld-joint", "objective.hidden.beta=0"], "plain kd"),
        (["train.schedule=wsd", "train.warmup_share=0.5", "train.decay_share=0.6"], "exceed 1"),
        (["train.betas=[0.9]"], "betas"),
        (["teacher.cache_signal=sampled", "objective.temperature=2"], "sampled with objective.temperature=2"),
        (["teacher.cache_signal=sampled", "objective.divergence=jsd"], "sampled with objective.divergence=jsd"),
        (["teacher.cache_signal=sampled", "objective.top_k=8"], "a sampled signal has no top-k"),
        (["teacher.cache_samples=0"], "teacher.cache_samples"),
        (["teacher.cache_proposal_temperature=0"], "teacher.cache_proposal_temperature"),
        (["teacher.cache_signal=dense"], "cache_signal"),
    ],
)
def test_contradictory_values(overrides, problem):
    with pytest.raises(HldError, match=problem):
        load_config("smoke", overrides)


def test_budget_of_exactly_one_step_is_fine():
    cfg = load_config("smoke", ["budget.tokens=128", "train.batch_size=4", "data.seq_len=32"])
    assert cfg.budget.tokens == 128


@pytest.mark.parametrize("name", SHIPPED)
def test_dump_yaml_round_trips(name):
    cfg = load_config(name)
    assert yaml.safe_load(dump_yaml(cfg)) == dataclasses.asdict(cfg)


def test_dump_yaml_round_trips_awkward_values(tmp_path):
    # strings YAML would read as other types ('yes', '123', 'null') must come back as strings
    base = {"name": "123", "data": {"text_field": "yes", "validation": "null"}}
    cfg = load_config(
        "smoke",
        [
            "name='run: #1 \\ \"double\"'",
            "data.train=/data dir/c4-train.*.json.gz",
            "objective.method=hld-joint",
            "objective.hidden.mapping=explicit",
            "objective.hidden.pairs=[[0, 0], [1, 3]]",
            "train.lr=1e-5",
            "student.d_model=96",
        ],
    )
    assert cfg.name == 'run: #1 \\ "double"'
    cfg2 = load_config(None, base=base)
    assert (cfg2.name, cfg2.data.text_field, cfg2.data.validation) == ("123", "yes", "null")
    assert yaml.safe_load(dump_yaml(cfg2)) == dataclasses.asdict(cfg2)
    text = dump_yaml(cfg)
    assert yaml.safe_load(text) == dataclasses.asdict(cfg)
    # the dump is itself a loadable config, equal to the original
    path = tmp_path / "resolved.yaml"
    path.write_text(text)
    assert load_config(str(path)) == cfg
    # every field's help is written as a comment
    for key, help_text, _ in field_help():
        assert f"# {help_text}" in text, key


# --------------------------------------------------------------------------- student sizes


def _hand_non_embedding(s: StudentShape) -> int:
    """Gemma 3 block: q, k, v, o projections; gated MLP (gate, up, down); four RMSNorms of width d;
    q/k norms of width head_dim. Plus the final norm. No biases."""
    attn = s.d_model * s.head_dim * (2 * s.n_heads + 2 * s.n_kv_heads)
    mlp = 3 * s.d_model * s.d_ff
    norms = 4 * s.d_model + 2 * s.head_dim
    return s.n_layers * (attn + mlp + norms) + s.d_model


@pytest.mark.parametrize("preset, target", [("paper-123m", 123e6), ("paper-735m", 735e6)])
def test_paper_presets_non_embedding_size(preset, target):
    shape = resolve_shape(load_config(None, [f"student.preset={preset}"]).student)
    hand = _hand_non_embedding(shape)
    assert abs(hand - target) / target < 0.03, (preset, hand)
    from transformers import Gemma3ForCausalLM

    vocab = 262_144  # Gemma 3's vocabulary
    with torch.device("meta"):  # shapes only, no memory
        model = Gemma3ForCausalLM(student_config(shape, vocab_size=vocab, bos_id=2, eos_id=1, pad_id=0))
    counts = count_params(model)
    assert counts["non_embedding"] == hand
    assert counts["total"] == hand + vocab * shape.d_model  # the tied head is not counted twice


def test_count_params_of_a_tiny_student():
    from hld.config import StudentConfig

    model = build_student(StudentConfig(preset="tiny-2l"), vocab_size=512, bos_id=2, eos_id=1, pad_id=0, seed=0)
    # tiny-2l: d 64, 2 heads, 1 kv head, head_dim 32, d_ff 256, 2 blocks
    per_block = (64 * 64 + 64 * 32 + 64 * 32 + 64 * 64) + 3 * 64 * 256 + 4 * 64 + 2 * 32
    non_emb = 2 * per_block + 64
    assert non_emb == 123_584
    assert count_params(model) == {"total": non_emb + 512 * 64, "non_embedding": non_emb}
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_student_overrides_and_bad_shapes():
    shape = resolve_shape(
        load_config(None, ["student.preset=tiny-2l", "student.n_layers=3", "student.d_ff=128"]).student
    )
    assert shape == StudentShape(n_layers=3, d_model=64, n_heads=2, n_kv_heads=1, head_dim=32, d_ff=128)
    with pytest.raises(HldError, match="unknown student preset"):
        resolve_shape(load_config(None, ["student.preset=huge"]).student)
    with pytest.raises(HldError, match="n_kv_heads"):
        resolve_shape(load_config(None, ["student.n_heads=3", "student.n_kv_heads=2"]).student)
    assert set(PRESETS) >= {"tiny-1l", "tiny-2l", "paper-123m", "paper-735m"}


def test_string_override_is_verbatim():
    # for a string field the override is the text as typed, not YAML's reading of it
    cfg = load_config(None, ["data.text_field=yes", "name=123", "data.train=[ab]*.jsonl"])
    assert (cfg.data.text_field, cfg.name, cfg.data.train) == ("yes", "123", "[ab]*.jsonl")
    assert load_config(None, ["teacher.cache=null"]).teacher.cache is None


@pytest.mark.parametrize(
    "spec, problem",
    [
        ("jsd(beta=1)", "jsd's beta=1 is outside (0, 1)"),
        ("jsd(beta=0)", "jsd's beta=0 is outside (0, 1)"),
        ("jsd(beta=x)", "jsd's beta='x' is not a number"),
        ("jsd(alpha=0.3)", "jsd has no parameter 'alpha'"),
        ("forward_kl(beta=0.3)", "forward_kl has no parameter 'beta'"),
        ("jsd(beta=0.3", "is not one of"),
    ],
)
def test_bad_divergence_parameters(spec, problem):
    with pytest.raises(HldError, match=re.escape(problem)):
        load_config(None, [f"objective.divergence={spec}"])


def test_a_divergence_spec_reaches_the_loss_with_its_parameters():
    from hld.distill.objectives import logit_spec

    cfg = load_config(None, ["objective.divergence=jsd( beta = 0.25 )"])
    div = logit_spec(cfg.objective, chunk_tokens=8, kd=True).divergence
    assert (div.name, div.beta, div.spec()) == ("jsd", 0.25, "jsd(beta=0.25)")
    assert (
        logit_spec(load_config(None, ["objective.divergence=jsd"]).objective, chunk_tokens=8, kd=True).divergence.beta
        == 0.5
    )


def test_a_config_of_an_earlier_release_still_loads(tmp_path):
    """objective.jsd_beta (before divergences took their parameters) in an old run's config.yaml."""
    from hld.train.rundir import read_run_config

    cfg = load_config(None, ["objective.divergence=jsd", "objective.jsd_beta=0.3"])
    assert cfg.objective.divergence == "jsd(beta=0.3)"
    assert load_config(None, ["objective.jsd_beta=0.3"]).objective.divergence == "forward_kl"
    old = yaml.safe_load(dump_yaml(load_config("smoke")))
    old["objective"]["jsd_beta"] = 0.5
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    assert read_run_config(tmp_path / "config.yaml")["objective"]["jsd_beta"] == 0.5
