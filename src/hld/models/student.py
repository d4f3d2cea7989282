"""Students: causal LMs of a decoder family (`student.family`: Gemma 3 text by default, Llama, Qwen 3,
Mistral) built from a size preset, sharing the teacher's tokenizer and vocabulary (the embedding and the
tied head have `vocab_size` rows). What the rest of hld needs of a student (FLOPs, memory, hooks, export)
is read from the model and its config, never from the family's name.

Parameter counts of the paper presets are **non-embedding** counts (the 262,144 x d embedding,
tied with the head, is excluded): with Gemma 3's vocabulary the embedding alone would be 201M
parameters at d=768, so "123M" can only sensibly name the transformer blocks. See
docs/decisions.md.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from hld.config import StudentConfig
from hld.config_checks import PRESETS, STUDENT_FAMILIES, StudentShape, resolve_shape

__all__ = ["PRESETS", "StudentShape", "resolve_shape", "build_student", "count_params", "shape_of", "student_config"]


def _gemma3(shape: StudentShape, common: dict) -> Any:
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(query_pre_attn_scalar=shape.head_dim, sliding_window=512, **common)


def _llama(shape: StudentShape, common: dict) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(**common)


def _qwen3(shape: StudentShape, common: dict) -> Any:
    from transformers import Qwen3Config

    return Qwen3Config(**common)


def _mistral(shape: StudentShape, common: dict) -> Any:
    from transformers import MistralConfig

    return MistralConfig(sliding_window=4096, **common)


# student.family -> its HF config from the shape and the fields every family shares
FAMILIES: dict[str, Callable[[StudentShape, dict], Any]] = {
    "gemma3": _gemma3,
    "llama": _llama,
    "qwen3": _qwen3,
    "mistral": _mistral,
}
if list(FAMILIES) != list(STUDENT_FAMILIES):
    raise ImportError(f"student families {list(FAMILIES)} != config_checks.STUDENT_FAMILIES {list(STUDENT_FAMILIES)}")


def student_config(
    shape: StudentShape,
    *,
    vocab_size: int,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    max_positions: int = 4096,
    family: str = "gemma3",
):
    common = dict(
        vocab_size=vocab_size,
        hidden_size=shape.d_model,
        num_hidden_layers=shape.n_layers,
        num_attention_heads=shape.n_heads,
        num_key_value_heads=shape.n_kv_heads,
        head_dim=shape.head_dim,
        intermediate_size=shape.d_ff,
        max_position_embeddings=max_positions,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        tie_word_embeddings=True,
        attn_implementation="sdpa",
        use_cache=False,
    )
    return FAMILIES[family](shape, common)


def build_student(
    cfg: StudentConfig, *, vocab_size: int, bos_id: int, eos_id: int, pad_id: int, seed: int
) -> torch.nn.Module:
    """A freshly initialised student (deterministic in `seed`)."""
    from transformers import AutoModelForCausalLM

    shape = resolve_shape(cfg)
    hf_cfg = student_config(
        shape, vocab_size=vocab_size, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id, family=cfg.family
    )
    model_class: Any = AutoModelForCausalLM._model_mapping[type(hf_cfg)]  # e.g. Gemma3ForCausalLM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(hf_cfg)
    return model


def count_params(model: torch.nn.Module) -> dict[str, int]:
    """Total and non-embedding parameters (tied head counted once, inside the embedding)."""
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    emb = model.get_input_embeddings().weight.numel()  # type: ignore[operator]
    return {"total": total, "non_embedding": total - emb}


def shape_of(model: torch.nn.Module) -> StudentShape:
    """A built model's sizes (a scratch student's preset, or a derived student's teacher sizes), from its config."""
    from hld.models.hooks import text_config

    c = text_config(model.config)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    n_kv = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    return StudentShape(
        n_layers=c.num_hidden_layers,
        d_model=c.hidden_size,
        n_heads=c.num_attention_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        d_ff=c.intermediate_size,
    )
