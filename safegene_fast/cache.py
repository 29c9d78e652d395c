"""Where safegene_fast keeps what it generates or converts once (families, synthetic checkpoints,
converted models)."""

from __future__ import annotations

import os
from pathlib import Path

from safegene_fast.io.atomic import atomic_folder, remove, write_json


def cache_root() -> Path:
    """``$SAFEGENE_CACHE``, else ``$XDG_CACHE_HOME/safegene_fast`` or ``~/.cache/safegene_fast``."""
    return Path(os.environ.get("SAFEGENE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "safegene_fast"))


def build_once(root: Path, marker: str, build, *, rebuild: bool = False) -> Path:
    """``root``, built by ``build(tmp) -> dict`` unless ``root/marker`` already exists: into a
    temporary sibling folder, with one torch thread (the same bits on any core count; small
    models gain little from a second core, which stalls badly when another process is busy),
    then ``marker`` written with the returned record and the folder renamed into place, so a
    failed or interrupted build leaves nothing half-written."""
    import torch
    if rebuild:
        remove(root)
    if (root / marker).is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with atomic_folder(root, overwrite=True, markers=None) as tmp:  # the cache's own folder
            write_json(tmp / marker, build(tmp))
    finally:
        torch.set_num_threads(threads)
    return root


def version(dist: str) -> str | None:
    """An installed distribution's version, or None: recorded beside whatever is built."""
    import importlib.metadata
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None
