"""Where safegene_fast keeps what it generates or converts once (families, synthetic checkpoints,
converted models)."""

from __future__ import annotations

import os
from pathlib import Path


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
    import json
    import shutil

    import torch
    if rebuild:
        shutil.rmtree(root, ignore_errors=True)
    if (root / marker).is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        record = build(tmp)
        (tmp / marker).write_text(json.dumps(record, indent=2))
        shutil.rmtree(root, ignore_errors=True)
        tmp.rename(root)
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(tmp, ignore_errors=True)
    return root
