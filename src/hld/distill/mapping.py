"""Which student layer is matched to which teacher layer.

Layer index convention (both models): 0 = the embedding output (Gemma scales it by sqrt(d)),
i in 1..L = the output of decoder block i (before the final norm).
"""

from __future__ import annotations

from typing import Optional

from hld.config import HiddenConfig
from hld.errors import HldError


def layer_pairs(
    cfg: HiddenConfig, *, n_student: int, n_teacher: int, kept: Optional[tuple[int, ...]] = None
) -> list[tuple[int, int]]:
    """[(student_layer, teacher_layer), ...] in increasing student order. `kept`: a derived student's
    teacher blocks (0-based), which `mapping: kept` pairs each student block with (its state reaches the
    teacher's space unchanged, or through its residual basis P when narrowed: `hld.distill.projectors`)."""
    if cfg.mapping == "kept":
        if kept is None or len(kept) != n_student:
            raise HldError(
                "objective.hidden.mapping=kept needs a student made of its teacher's blocks",
                "use student.preset=depth-N, or another mapping (uniform)",
            )
        return [(k + 1, b + 1) for k, b in enumerate(kept)]  # layer i = output of block i (1-based)
    if cfg.mapping == "last":
        return [(n_student, n_teacher)]
    if cfg.mapping == "uniform":
        n = n_student if cfg.n_pairs is None else cfg.n_pairs  # 0 is an error, not "all blocks"
        if not 1 <= n <= n_student:
            raise HldError(
                f"objective.hidden.n_pairs={n} is outside 1..{n_student} (student blocks)",
                f"set n_pairs between 1 and {n_student}",
            )
        # pair k (1..n) sits at the same relative depth k/n in both models
        return [(round(k * n_student / n), round(k * n_teacher / n)) for k in range(1, n + 1)]
    pairs = []
    for item in cfg.pairs:
        if not (isinstance(item, (list, tuple)) and len(item) == 2 and all(isinstance(x, int) for x in item)):
            raise HldError(
                f"objective.hidden.pairs entry {item!r} is not [student_layer, teacher_layer]",
                "write pairs as [[1, 9], [2, 18]]",
            )
        s, t = item
        if not 0 <= s <= n_student:
            raise HldError(
                f"student layer {s} is out of range 0..{n_student}",
                f"the student has {n_student} blocks; use 0..{n_student}",
            )
        if not 0 <= t <= n_teacher:
            raise HldError(
                f"teacher layer {t} is out of range 0..{n_teacher}",
                f"the teacher has {n_teacher} blocks; use 0..{n_teacher}",
            )
        pairs.append((s, t))
    return pairs
