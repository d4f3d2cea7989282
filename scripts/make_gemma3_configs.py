"""Write src/hld/assets/gemma3_configs/<name>/config.json: the shape values of the public Gemma 3
pretrained checkpoints' config.json (no weights), saved by transformers so that `AutoConfig` reads
them back as it reads the hub's. `hld plan` (and any command that only needs a teacher's config)
falls back to them when the hub is unreachable (hld.models.loading.model_config).

    python scripts/make_gemma3_configs.py
"""

from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "src" / "hld" / "assets" / "gemma3_configs"

# the public text configs: hidden, intermediate, layers, heads, kv heads, head_dim, vocab, sliding window,
# query_pre_attn_scalar, max positions
TEXT = {
    "270m": (640, 2048, 18, 4, 1, 256, 262144, 512, 256, 32768),
    "1b": (1152, 6912, 26, 4, 1, 256, 262144, 512, 256, 32768),
    "4b": (2560, 10240, 34, 8, 4, 256, 262208, 1024, 256, 131072),
    "12b": (3840, 15360, 48, 16, 8, 256, 262208, 1024, 256, 131072),
    "27b": (5376, 21504, 62, 32, 16, 128, 262208, 1024, 168, 131072),
}
MULTIMODAL = ("4b", "12b", "27b")  # Gemma3ForConditionalGeneration: a text_config and a SigLIP vision_config
SLIDING_WINDOW_PATTERN = 6  # 5 local : 1 global


def text_config(size: str):
    from transformers import Gemma3TextConfig

    d, ff, n, h, kv, hd, vocab, window, qpas, max_pos = TEXT[size]
    types = ["full_attention" if (i + 1) % SLIDING_WINDOW_PATTERN == 0 else "sliding_attention" for i in range(n)]
    return Gemma3TextConfig(
        vocab_size=vocab,
        hidden_size=d,
        intermediate_size=ff,
        num_hidden_layers=n,
        num_attention_heads=h,
        num_key_value_heads=kv,
        head_dim=hd,
        sliding_window=window,
        query_pre_attn_scalar=qpas,
        max_position_embeddings=max_pos,
        layer_types=types,
        rms_norm_eps=1e-6,
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        },
        final_logit_softcapping=None,
        attn_logit_softcapping=None,
        bos_token_id=2,
        eos_token_id=1,
        pad_token_id=0,
        tie_word_embeddings=True,
        hidden_activation="gelu_pytorch_tanh",
        attention_bias=False,
        attention_dropout=0.0,
        initializer_range=0.02,
        dtype="bfloat16",
    )


def full_config(size: str):
    from transformers import Gemma3Config, SiglipVisionConfig

    text = text_config(size)
    if size not in MULTIMODAL:
        text.architectures = ["Gemma3ForCausalLM"]
        return text
    vision = SiglipVisionConfig(
        hidden_size=1152,
        intermediate_size=4304,
        num_hidden_layers=27,
        num_attention_heads=16,
        image_size=896,
        patch_size=14,
        vision_use_head=False,
    )
    cfg = Gemma3Config(
        text_config=text.to_dict(),
        vision_config=vision.to_dict(),
        mm_tokens_per_image=256,
        boi_token_index=255999,
        eoi_token_index=256000,
        image_token_index=262144,
        initializer_range=0.02,
        bos_token_id=2,
        eos_token_id=1,
        pad_token_id=0,
        dtype="bfloat16",
    )
    cfg.architectures = ["Gemma3ForConditionalGeneration"]
    return cfg


def main() -> None:
    for size in TEXT:
        d = OUT / f"gemma-3-{size}-pt"
        d.mkdir(parents=True, exist_ok=True)
        full_config(size).save_pretrained(d)
        # what the values mean is in the README beside them; check the saved file reads back
        json.loads((d / "config.json").read_text())
        print(d / "config.json")


if __name__ == "__main__":
    main()
