"""Module names as transformers loads them, for the names a checkpoint stores.

A checkpoint's tensor names and the modules transformers builds from them can differ: Gemma 3's
multimodal checkpoint stores ``language_model.model.layers.N...`` and loads it as
``model.language_model.layers.N...``; Mixtral and Qwen3-MoE store one 2-D weight per expert
(``...experts.E.w1``) and load all experts of a layer fused into 3-D parameters
(``mlp.experts.gate_up_proj`` [E, 2I, H] = cat(w1, w3) per expert, ``mlp.experts.down_proj``
[E, H, I]). Everything that names loaded modules (PEFT adapters, patches on a loaded model) goes
through ``ModuleNames``, which asks transformers' own conversion mapping on a model built on the
meta device (no weights read). A folder without a config transformers knows maps names unchanged.
"""

from __future__ import annotations

import json
import os
import re
import weakref
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from safegene_fast.io import CheckpointError

# Sub-models whose layers have their own numbering (a vision encoder beside the language model):
# their modules are out of the default gene and get coefficients under "<tower>.<layer>".
TOWERS = r"(?:^|\.)(vision_tower|vision_model|audio_tower|multi_modal_projector)\."
TOWERS_RE = re.compile(TOWERS)
TOWER_RE = re.compile(TOWERS + r"(?:.*?\.)?layers\.(\d+)\.")
# MoE routers: the last-level ".gate" of an MoE block (not the experts' gate_proj)
ROUTER = r"\.(?:block_sparse_moe|mlp)\.gate"
ROUTER_RE = re.compile(ROUTER + "$")


def tower_of(module: str) -> str | None:
    """The sub-model a module belongs to when it is not the language model (``vision_tower``), else None."""
    match = TOWERS_RE.search(f".{module}")
    return match[1] if match else None


def is_router(module: str) -> bool:
    return bool(ROUTER_RE.search(module))


@dataclass(frozen=True)
class Expert:
    """Where one checkpoint expert weight lives once loaded: ``parameter[index, part * out:(part + 1) * out]``."""
    parameter: str   # the loaded 3-D parameter, e.g. model.layers.0.mlp.experts.gate_up_proj
    index: int       # the expert
    part: int        # which of the weights fused along the rows (w1: 0, w3: 1; down_proj: 0)
    count: int       # experts in the parameter
    shape: tuple[int, int]  # (out, in) of one part of one expert
    template: tuple[str, ...]  # the checkpoint module name of every part, "{}" for the expert index

    def modules(self) -> list[str]:
        """The checkpoint names of every part of every expert fused into ``parameter``."""
        return [t.format(e) for e in range(self.count) for t in self.template]


class ModuleNames:
    """Checkpoint module name <-> loaded module name for one model (config) family.

    ``ModuleNames.of(folder)`` reads ``folder/config.json`` (cached per folder); ``of_model(model)``
    uses a loaded model. Without a config transformers knows, every name maps to itself."""

    def __init__(self, config=None, model=None, source: str = "the model"):
        self.config, self._model, self.source = config, model, source
        self._cache: dict[str, tuple[str, Expert | None]] = {}

    @classmethod
    def of(cls, folder: str | os.PathLike | None) -> ModuleNames:
        if folder is None:
            return cls()
        path = Path(folder)
        if path.is_file():  # one .safetensors file: its folder's config
            path = path.parent
        elif not path.exists():  # a Hub id, as Checkpoint reads it: from the local cache
            from safegene_fast.io.reader import from_hub_cache
            try:
                path = from_hub_cache(str(folder))
            except CheckpointError:
                return cls(source=str(folder))
        return _for_folder(str(path.resolve()))

    @classmethod
    def of_model(cls, model) -> ModuleNames:
        """The names of a loaded model (kept with it, so each patch does not map them again)."""
        if model not in _OF_MODEL:
            _OF_MODEL[model] = cls(getattr(model, "config", None), model, source=_model_name(model))
        return _OF_MODEL[model]

    @property
    def identity(self) -> bool:
        """Names map to themselves: no config, or one transformers builds no language model from."""
        self.model()
        return self.config is None

    def model(self):
        """The model itself, or one built from the config on the meta device (no weights)."""
        if self._model is None and self.config is not None:
            from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
            auto = AutoModelForImageTextToText if hasattr(self.config, "vision_config") else AutoModelForCausalLM
            try:
                with torch.device("meta"):
                    self._model = auto.from_config(self.config)
            except (ValueError, KeyError):  # not a language model transformers builds: names as stored
                self.config = None
        return self._model

    def _resolve(self, module: str) -> tuple[str, Expert | None]:
        if module in self._cache:
            return self._cache[module]
        if self.identity:
            return module, None
        model = self.model()
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
        mapping = get_model_conversion_mapping(model)  # fresh: some transforms keep state between keys
        renamings = [t for t in mapping if isinstance(t, WeightRenaming)]
        converters = [t for t in mapping if isinstance(t, WeightConverter)]
        key = f"{module}.weight"
        renamed, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix,
                                             _meta_state_dict(model))
        if pattern is None:
            result = (renamed.removesuffix(".weight"), None)
        else:
            converter = next(c for c in converters if pattern in c.source_patterns)
            regex = re.escape(pattern).replace(r"\*", r"(\d+)")
            index = re.search(regex + "$", key)
            if index is None:
                raise CheckpointError(f"{self.source}: cannot tell which expert checkpoint weight {key!r} is.")
            stem = key[:index.start()]
            template = tuple(stem + p.replace("*", "{}").removesuffix(".weight") for p in converter.source_patterns)
            fused = dict(model.named_parameters()).get(renamed)
            if fused is None or fused.dim() != 3:
                raise CheckpointError(f"{self.source}: checkpoint weight {key!r} loads into {renamed!r}, which is "
                                      f"not a parameter of fused experts in the model transformers builds.")
            count, rows, cols = fused.shape
            expert = Expert(renamed, int(index[1]), converter.source_patterns.index(pattern), count,
                            (rows // len(template), cols), template)
            result = (renamed, expert)
        self._cache[module] = result
        return result

    def loaded(self, module: str) -> str:
        """The name transformers gives the module stored as ``module`` in the checkpoint (for a
        fused MoE expert: the 3-D parameter holding it, see ``expert``)."""
        return self._resolve(module)[0]

    def expert(self, module: str) -> Expert | None:
        """Where a per-expert checkpoint weight is in the fused parameter, or None for other modules."""
        return self._resolve(module)[1]

    def fused_alike(self, expert: Expert) -> list[Expert]:
        """Every fused parameter PEFT targets along with ``expert.parameter`` (it matches them by
        their last name, so in every MoE layer), each as its expert 0."""
        leaf = expert.parameter.rsplit(".", 1)[-1]
        layer = re.compile(r"\.layers\.\d+\.")
        alike = []
        for name, param in self.model().named_parameters():
            found = layer.search(name)
            if name.endswith(f".{leaf}") and param.dim() == 3 and found:
                template = tuple(layer.sub(found[0], t, count=1) for t in expert.template)
                alike.append(Expert(name, 0, 0, expert.count, expert.shape, template))
        return alike

    def checkpoint(self, module: str) -> str:
        """The checkpoint name of the loaded module ``module``, one ``loaded`` has mapped (a fused
        expert parameter has one checkpoint name per expert, so it has none here)."""
        if self.identity:
            return module
        found = [c for c, (name, expert) in self._cache.items() if name == module and expert is None]
        if not found:
            raise KeyError(f"{self.source}: no checkpoint module mapped to loaded module {module!r} yet.")
        return found[0]

    def is_embedding(self, module: str) -> bool:
        """The checkpoint module loads as an embedding table (PEFT stores its factors transposed)."""
        if self.identity:
            return module.endswith("embed_tokens")
        return isinstance(dict(self.model().named_modules()).get(self.loaded(module)), torch.nn.Embedding)

    def tied_head(self) -> str | None:
        """The loaded name of the output embedding (LM head) when it is the input embedding's weight."""
        if self.identity:
            return None
        model = self.model()
        out = model.get_output_embeddings()
        if out is None or out.weight is not model.get_input_embeddings().weight:
            return None
        return next(name for name, module in model.named_modules() if module is out)

    def check_targets(self, targets) -> None:
        """Every adapter target (a loaded name) is a module PEFT wraps as a LoRA layer in this model,
        or a fused expert parameter; else a one-sentence error naming the module. Built on the meta
        device: no weights are read (shapes are checked against the checkpoint itself)."""
        if self.identity:
            return
        from torch import nn
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter
        model = self.model()
        modules, params = dict(model.named_modules()), dict(model.named_parameters())
        wrappable = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)
        # PEFT converts an adapter target to a fused expert parameter by its last name alone
        expert_leaves = {p.removesuffix(".weight").rsplit(".", 1)[-1] for t in get_model_conversion_mapping(model)
                         if isinstance(t, WeightConverter) for p in t.source_patterns if "*" in p}
        for name in targets:
            if name in params and params[name].dim() == 3:
                continue  # a fused expert parameter: PEFT converts the per-expert keys onto it
            if name.rsplit(".", 1)[-1] in expert_leaves:
                raise CheckpointError(f"{self.source}: the adapter targets module {name!r}, which PEFT would take for "
                                      f"fused MoE experts of the same name; leave it out of the gene or write a "
                                      f"merged checkpoint.")
            module = modules.get(name)
            if module is None:
                raise CheckpointError(f"{self.source}: the adapter targets module {name!r}, which the model "
                                      f"transformers loads does not have.")
            if is_router(name) or not isinstance(module, wrappable):
                raise CheckpointError(f"{self.source}: the adapter targets module {name!r}, a "
                                      f"{type(module).__name__} that PEFT does not wrap as a LoRA layer; leave it out "
                                      f"of the gene or write a merged checkpoint.")


def _meta_state_dict(model) -> dict:
    return {name: p for name, p in model.state_dict(keep_vars=True).items()}


def _model_name(model) -> str:
    return getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__


_OF_MODEL: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@lru_cache(maxsize=32)
def _for_folder(folder: str) -> ModuleNames:
    try:
        raw = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return ModuleNames(source=folder)
    if not (isinstance(raw, dict) and "model_type" in raw):
        return ModuleNames(source=folder)
    from transformers import AutoConfig
    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError, KeyError, TypeError):  # a model type this transformers does not know
        config = None
    return ModuleNames(config, source=folder)
