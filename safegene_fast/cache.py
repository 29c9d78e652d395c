"""Where safegene_fast keeps what it generates or converts once (families, synthetic checkpoints,
converted models)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$SAFEGENE_CACHE``, else ``$XDG_CACHE_HOME/safegene_fast`` or ``~/.cache/safegene_fast``."""
    return Path(os.environ.get("SAFEGENE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "safegene_fast"))
