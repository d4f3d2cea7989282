"""Students: Gemma 3 text-family causal LMs built from a size preset, sharing the teacher's
tokenizer and vocabulary (the embedding and the tied head have `vocab_size` rows).

Parameter counts of the paper presets are **non-embedding** counts (the 262,144 x d embedding,
tied with the head, is excluded): with Gemma 3's vocabulary the embedding alone would be 201M
parameters at d=768, so "123M" can only sensibly name the transformer blocks. See
docs/decisions.md.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from hld.config import StudentConfig
from hld.errors import HldError


@dataclass(frozen=True)
class StudentShape:
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int


PRESETS: dict[str, StudentShape] = {
    # tiny students that train in minutes on a 2-core CPU
    "tiny-1l": StudentShape(n_layers=1, d_model=64, n_heads=2, n_kv_heads=1, head_dim=32, d_ff=256),
    "tiny-2l": StudentShape(n_layers=2, d_model=64, n_heads=2, n_kv_heads=1, head_dim=32, d_ff=256),
    "tiny-4l": StudentShape(n_layers=4, d_model=96, n_heads=3, n_kv_heads=1, head_dim=32, d_ff=384),
    "small-6l": StudentShape(n_layers=6, d_model=256, n_heads=4, n_kv_heads=2, head_dim=64, d_ff=1024),
    # the paper's sizes (non-embedding parameters)
    "paper-123m": StudentShape(n_layers=14, d_model=768, n_heads=12, n_kv_heads=4, head_dim=64, d_ff=3072),
    "paper-735m": StudentShape(n_layers=21, d_model=1536, n_heads=24, n_kv_heads=8, head_dim=64, d_ff=6144),
}


def resolve_shape(cfg: StudentConfig) -> StudentShape:
    if cfg.preset not in PRESETS:
        raise HldError(f"unknown student preset {cfg.preset!r}", f"use one of {', '.join(PRESETS)}")
    shape = PRESETS[cfg.preset]
    over = {
        k: getattr(cfg, k)
        for k in ("n_layers", "d_model", "n_heads", "n_kv_heads", "head_dim", "d_ff")
        if getattr(cfg, k) is not None
    }
    shape = replace(shape, **over)
    if shape.n_heads % shape.n_kv_heads:
        raise HldError(
            f"student n_heads={shape.n_heads} is not a multiple of n_kv_heads={shape.n_kv_heads}",
            "pick n_kv_heads dividing n_heads",
        )
    if shape.d_model % shape.n_heads:  # transformers' attention refuses it
        raise HldError(
            f"student d_model={shape.d_model} is not a multiple of n_heads={shape.n_heads}",
            "pick student.n_heads dividing student.d_model (or set student.d_model)",
        )
    if min(shape.n_layers, shape.d_model, shape.n_heads, shape.head_dim, shape.d_ff) < 1:
        raise HldError("student sizes must be positive", "check the student.* overrides")
    return shape


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
