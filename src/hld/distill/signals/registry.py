"""The teacher-signal kinds by name. A new kind: one module with a `TeacherLogits` subclass (its rows,
its divergence against the student, its fused-head rows, its fidelity; and, for a cache, its logit
bytes, `from_teacher` and `from_cache`), registered here, and its test.

    online   hld.distill.signals.online.Dense     the teacher's full distribution, computed in the loop
    topk     hld.distill.signals.topk.TopK        k logits + the remaining mass (a cache: exact | compact)
    sampled  hld.distill.signals.sampled.Sampled  ids drawn from the teacher + importance weights
"""

from __future__ import annotations

from hld.distill.signals.base import TeacherLogits
from hld.distill.signals.online import Dense
from hld.distill.signals.sampled import Sampled
from hld.distill.signals.topk import TopK

CachedKind = type[TopK] | type[Sampled]

CACHED: tuple[CachedKind, ...] = (TopK, Sampled)  # the kinds a cache can hold
# by name (each class's `kind`), in the order a study lists its signals (hld.study.signals)
KINDS: dict[str, type[TeacherLogits]] = {k.kind: k for k in (*CACHED, Dense)}
# a cache's kind by `teacher.cache_signal`, and by the logits codec of its manifest
CACHE_SIGNALS: dict[str, CachedKind] = {k.kind: k for k in CACHED}
CACHE_CODECS: dict[str, CachedKind] = {"exact": TopK, "compact": TopK, "sampled": Sampled}
