"""hld: knowledge distillation during LLM pre-training (CE vs logit KD vs hidden-layer distillation)."""

__version__ = "0.1.0"

import os as _os

_os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # our own progress lines say enough
try:  # transformers' per-load progress bars ("Loading weights", "Writing model shards")
    from transformers.utils import logging as _tlog

    _tlog.disable_progress_bar()
except ImportError:  # pragma: no cover
    pass
