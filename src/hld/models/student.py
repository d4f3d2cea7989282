"""Students: Gemma 3 text-family causal LMs built from a size preset, sharing the teacher's
tokenizer and vocabulary (the embedding and the tied head have `vocab_size` rows).

Parameter counts of the paper presets are **non-embedding** counts (the 262,144 x d embedding,
tied with the head, is excluded): with Gemma 3's vocabulary the embedding alone would be 201M
parameters at d=768, so "123M" can only sensibly name the transformer blocks. See
docs/decisions.md.
"""

from __future__ import annotations

import torch

from hld.config import StudentConfig
from hld.config_checks import PRESETS, StudentShape, resolve_shape

__all__ = ["PRESETS", "StudentShape", "resolve_shape", "build_student", "count_params", "student_config"]


def student_config(
    shape: StudentShape, *, vocab_size: int, bos_id: int, eos_id: int, pad_id: int, max_positions: int = 4096
):
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(  # type: ignore[call-arg]  # attn_implementation: a PretrainedConfig kwarg
        vocab_size=vocab_size,
        hidden_size=shape.d_model,
        num_hidden_layers=shape.n_layers,
        num_attention_heads=shape.n_heads,
        num_key_value_heads=shape.n_kv_heads,
        head_dim=shape.head_dim,
        intermediate_size=shape.d_ff,
        query_pre_attn_scalar=shape.head_dim,
        sliding_window=512,
        max_position_embeddings=max_positions,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        tie_word_embeddings=True,
        attn_implementation="sdpa",
        use_cache=False,
    )


def build_student(
    cfg: StudentConfig, *, vocab_size: int, bos_id: int, eos_id: int, pad_id: int, seed: int
) -> torch.nn.Module:
    """A freshly initialised student (deterministic in `seed`)."""
    from transformers import Gemma3ForCausalLM

    shape = resolve_shape(cfg)
    hf_cfg = student_config(shape, vocab_size=vocab_size, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Gemma3ForCausalLM(hf_cfg)
    return model


def count_params(model: torch.nn.Module) -> dict[str, int]:
    """Total and non-embedding parameters (tied head counted once, inside the embedding)."""
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    emb = model.get_input_embeddings().weight.numel()  # type: ignore[operator]
    return {"total": total, "non_embedding": total - emb}
