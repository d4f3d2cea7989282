"""Where hld keeps what it can rebuild: tokenised corpora and de-quantised GGUF teachers."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """`$HLD_CACHE_DIR`, else ~/.cache/hld."""
    return Path(os.environ.get("HLD_CACHE_DIR", Path.home() / ".cache" / "hld"))
