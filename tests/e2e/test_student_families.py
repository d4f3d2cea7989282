"""`student.family`: a student of another decoder family (Llama, Qwen 3, Mistral) trains through every
arm's path, is sized by hld plan from its own config, exports as an ordinary checkpoint of its family,
and reloads in plain transformers with the loss hld eval gives it."""

from __future__ import annotations

import json

import pytest

from helpers import SEQ_LEN, reference_ppl, train_argv
from hld.cli import main

VAL = str(__import__("helpers").VAL_FILE)


def _eval_ppl(capsys, model) -> float:
    rc = main(["eval", "--model", str(model), "--data", VAL, "--seq-len", str(SEQ_LEN), "--dtype", "float32", "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return json.loads(out.strip().splitlines()[-1])["ppl"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "family, method, architecture",
    [
        ("llama", "kd", "LlamaForCausalLM"),
        ("llama", "hld-joint", "LlamaForCausalLM"),
        ("qwen3", "kd", "Qwen3ForCausalLM"),
        ("mistral", "hld-first", "MistralForCausalLM"),
    ],
)
def test_a_student_of_another_family_trains_exports_and_reloads(tmp_path, capsys, family, method, architecture):
    run, out = tmp_path / "run", tmp_path / "export"
    assert main(train_argv(run, f"student.family={family}", f"objective.method={method}")) == 0, capsys.readouterr()
    capsys.readouterr()
    config = json.loads((run / "student" / "config.json").read_text())
    assert config["architectures"] == [architecture] and config["tie_word_embeddings"] is True
    assert main(["export", str(run), str(out), "--quiet"]) == 0, capsys.readouterr().err
    assert f"({architecture}," in (out / "README.md").read_text()
    want, _, _ = reference_ppl(out)  # plain transformers on the window protocol
    assert _eval_ppl(capsys, out) == pytest.approx(want, rel=1e-5)


def test_plan_sizes_a_llama_student_from_its_config(capsys):
    """Llama's blocks have no q/k norms and Gemma's do: the plan's parameter count follows the family."""
    from hld.config import load_config
    from hld.models.student import build_student, count_params

    counts = {}
    for family in ("gemma3", "llama"):
        cfg = load_config("smoke", [f"student.family={family}", "student.preset=tiny-2l"])
        model = build_student(cfg.student, vocab_size=512, bos_id=2, eos_id=1, pad_id=0, seed=0)
        counts[family] = count_params(model)["non_embedding"]
    # by hand, tiny-2l (d 64, 2 heads of 32, 1 kv head, d_ff 256): per block q 64x64, k and v 64x32 each,
    # o 64x64, MLP 3 x 64 x 256, two RMSNorms of 64 (Llama); Gemma 3 adds two more norms of 64 per block
    # and q/k norms of 32 each; both a final norm of 64
    llama_block = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 256 + 2 * 64
    assert counts["llama"] == 2 * llama_block + 64
    assert counts["gemma3"] == 2 * (llama_block + 2 * 64 + 2 * 32) + 64


def test_an_unknown_family_is_one_line(capsys):
    from helpers import one_line_error

    one_line_error(capsys, ["plan", "--config", "smoke", "student.family=gpt2"], "student.family")


def test_a_family_set_for_a_derived_student_is_one_line(capsys):
    """A depth-N student is built from its teacher's config: a student.family beside it is refused, not ignored."""
    from helpers import one_line_error

    one_line_error(
        capsys, ["plan", "--config", "smoke", "student.preset=depth-2", "student.family=llama"], "student.family=llama"
    )
