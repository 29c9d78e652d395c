"""Module names as transformers loads them, for the names a checkpoint stores.

A checkpoint's tensor names and the modules transformers builds from them can differ (a
multimodal model nests its language model differently once loaded; MoE experts are fused).
Everything that names loaded modules (PEFT adapters, forward hooks) goes through here.
"""

from __future__ import annotations

import os


class ModuleNames:
    """Checkpoint module name <-> loaded module name for one model folder."""

    def __init__(self, folder: str | os.PathLike | None = None):
        self.folder = folder

    def loaded(self, module: str) -> str:
        """The name transformers gives the module stored as ``module`` in the checkpoint."""
        return module

    def checkpoint(self, module: str) -> str:
        """The checkpoint name of the loaded module ``module``."""
        return module
