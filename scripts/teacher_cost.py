"""Per-token FLOPs of a Gemma 3 4B teacher's forward against the paper students' training step, by
`hld.flops` on meta-device models (no weights, no hub). The 4B text shape is the public
google/gemma-3-4b-pt config's text part (262,208 embedding rows, 34 blocks, 5 local : 1 global).

    python scripts/teacher_cost.py [--seq-len 2048]
"""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from hld.config import StudentConfig
    from hld.flops import step_cost
    from hld.models.student import build_student

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-len", type=int, default=2048)
    args = p.parse_args()
    t_cfg = Gemma3TextConfig(
        hidden_size=2560,
        num_hidden_layers=34,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=256,
        intermediate_size=10240,
        vocab_size=262208,
        query_pre_attn_scalar=256,
        sliding_window=1024,
        max_position_embeddings=131072,
    )
    with torch.device("meta"):
        teacher = Gemma3ForCausalLM(t_cfg)
        for preset in ("paper-123m", "paper-735m"):
            student = build_student(
                StudentConfig(preset=preset), vocab_size=t_cfg.vocab_size, bos_id=2, eos_id=1, pad_id=0, seed=0
            )
            c = step_cost(student, args.seq_len, teacher=teacher)
            print(
                f"{preset}: student training step {c.student:.3e} FLOPs/token, Gemma 3 4B forward "
                f"{c.teacher:.3e} FLOPs/token: teacher / student = {c.teacher / c.student:.2f}"
            )


if __name__ == "__main__":
    main()
