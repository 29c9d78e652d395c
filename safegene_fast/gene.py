"""The safety gene: per-module LoRA factors of the safety discrepancy, saved as a PEFT adapter.

On disk a gene is a PEFT LoRA adapter folder (``adapter_config.json`` with per-module
``rank_pattern``/``alpha_pattern`` so every module's scaling is 1, and
``adapter_model.safetensors`` with PEFT's key names) plus ``safegene.json`` for what PEFT has no
field for: singular values, energy kept, layer indices, provenance and settings.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from safegene_fast.architecture import TOWER_RE, ModuleNames, tower_of
from safegene_fast.io import CheckpointError, atomic_folder, write_json

PEFT_PREFIX = "base_model.model."
LAYER_RE = re.compile(r"\.layers\.(\d+)\.")


def layer_of(module: str) -> int | None:
    """The language-model layer of a module; None outside the layers and in a vision (or other)
    tower, whose layers are numbered on their own (see ``layer_key``)."""
    if tower_of(module):
        return None
    match = LAYER_RE.search(f".{module}.")
    return int(match[1]) if match else None


def layer_key(module: str) -> str | None:
    """The coefficient key of a module's layer: ``"12"`` for language-model layer 12,
    ``"vision_tower.3"`` for layer 3 of the vision tower, None outside any layer."""
    tower = TOWER_RE.search(f".{module}.")
    if tower:
        return f"{tower[1]}.{tower[2]}"
    layer = layer_of(module)
    return None if layer is None else str(layer)


@dataclass
class GeneModule:
    B: torch.Tensor  # (out, r)
    A: torch.Tensor  # (r, in)
    S: torch.Tensor  # (r,) singular values kept
    energy: float    # fraction of ||delta||_F^2 the factors keep
    layer: int | None

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def scaled_B(self, alpha: float) -> torch.Tensor:
        """alpha * B in B's dtype: the B of a PEFT adapter with the coefficient folded in. The
        merged output uses the same product, so PEFT's merge_and_unload equals it bit for bit."""
        return (self.B * alpha).to(self.B.dtype)


@dataclass
class SafetyGene:
    modules: dict[str, GeneModule]          # module name (weight name without ".weight")
    provenance: dict = field(default_factory=dict)
    selection: dict | None = None           # layer selection record (safegene_fast.method.selection)
    folder: Path | None = field(default=None, compare=False)  # where it was loaded from, if it was

    @property
    def layers(self) -> list[int]:
        """Every layer the gene has factors for."""
        return sorted({m.layer for m in self.modules.values() if m.layer is not None})

    @property
    def selected_layers(self) -> list[int]:
        """The layers kept by layer selection, or every layer when none was made."""
        return list(self.selection["layers"]) if self.selection else self.layers

    def coefficient_for(self, module: str, coeffs: dict[str, float] | float) -> float:
        """A module's alpha: by module name, else by its layer index; absent means 0."""
        if not isinstance(coeffs, dict):
            return float(coeffs)
        if module in coeffs:
            return float(coeffs[module])
        key = layer_key(module)
        return float(coeffs.get(key, 0.0)) if key is not None else 0.0

    def check_coefficients(self, coeffs: dict[str, float] | float) -> None:
        """Coefficients must land on the gene and do something: every key a layer index or module
        name of the gene, every value finite, not all zero, and no product ``alpha * B`` that
        overflows its dtype (it would write Inf weights)."""
        values = list(coeffs.values()) if isinstance(coeffs, dict) else [coeffs]
        if isinstance(coeffs, dict):
            layers = [str(layer) for layer in self.layers]
            towers = sorted({layer_key(m) for m in self.modules if tower_of(m) and layer_key(m)})
            unknown = [k for k in coeffs if k not in self.modules and k not in layers and k not in towers]
            if unknown:
                raise ValueError(f"coefficient key {unknown[0]!r} is neither a layer index ({', '.join([*layers, *towers])}) "
                                 f"nor a module of the gene.")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
            raise ValueError("every coefficient must be a finite number.")
        if not any(self.coefficient_for(m, coeffs) for m in self.modules):
            raise ValueError("the coefficients are zero for every module of the gene: the output would be the "
                             "unprotected model.")
        for name, m in self.modules.items():
            alpha = self.coefficient_for(name, coeffs)
            if alpha and not bool(torch.isfinite(m.scaled_B(alpha)).all()):
                raise ValueError(f"coefficient {alpha:g} makes the factors of module {name!r} overflow "
                                 f"{str(m.B.dtype).removeprefix('torch.')}.")

    def save(self, folder: str | os.PathLike, overwrite: bool = False,
             base_model: str = "", coeffs: dict[str, float] | float = 1.0, inputs=(),
             card: str | None = None, names: ModuleNames | None = None, folded=None,
             extra_files: dict[str, str] | None = None) -> Path:
        """Writes the PEFT adapter (alpha folded into B; modules whose coefficient is 0 left out,
        since they would add nothing) and safegene.json, and ``card`` as its README.md, atomically;
        ``folder`` may not be or touch one of ``inputs`` (``io.check_output``). ``folded``: what
        safegene.json records as folded into B, when more than ``coeffs`` is (an adapter's update).

        ``names`` maps the gene's checkpoint module names to the modules transformers loads (default:
        those of the aligned model the gene was extracted from): the adapter's keys use loaded
        names, embeddings PEFT's transposed embedding factors, and fused MoE experts the
        per-expert keys PEFT converts on load (every expert of a fused parameter present, all at
        one rank: zero-padded, zero for experts the gene leaves out). A target that is not a module
        PEFT wraps in that model is an error here, before anything is written."""
        folder = Path(folder)
        names = names if names is not None else ModuleNames.of(self.provenance.get("aligned"))
        kept = {name: m for name, m in self.modules.items() if self.coefficient_for(name, coeffs) != 0}
        if not kept:
            raise ValueError("the coefficients are zero for every module of the gene: the adapter would do nothing.")
        factors = {name: (m.scaled_B(self.coefficient_for(name, coeffs)), m.A) for name, m in kept.items()}
        experts = {name: e for name in kept if (e := names.expert(name)) is not None}
        expert_rank = max((kept[name].rank for name in experts), default=0)
        fused = {a.parameter: a for e in experts.values() for a in names.fused_alike(e)}
        dtype = next((kept[name].A.dtype for name in experts), None)
        for e in fused.values():  # every expert and part of every fused parameter PEFT targets, one rank
            for name in e.modules():
                B, A = factors.get(name, (None, None))
                if B is None:
                    B, A = torch.zeros(e.shape[0], 0, dtype=dtype), torch.zeros(0, e.shape[1], dtype=dtype)
                pad = expert_rank - A.shape[0]
                factors[name] = (torch.nn.functional.pad(B, (0, pad)), torch.nn.functional.pad(A, (0, 0, 0, pad)))
        keys = {name: name if names.expert(name) else names.loaded(name) for name in factors}
        names.check_targets(sorted({names.loaded(name) for name in factors}))
        head = names.tied_head() if any(names.is_embedding(n) for n in factors) else None
        with atomic_folder(folder, overwrite=overwrite, inputs=inputs) as tmp:
            tensors, ranks = {}, {}
            for name, (B, A) in factors.items():
                key = f"{PEFT_PREFIX}{keys[name]}"
                if names.is_embedding(name):  # PEFT: delta = (lora_embedding_B @ lora_embedding_A).T
                    tensors[f"{key}.lora_embedding_A"] = B.T.contiguous()
                    tensors[f"{key}.lora_embedding_B"] = A.T.contiguous()
                    if head is not None:  # the tied LM head: PEFT ties its factors to these
                        tensors[f"{PEFT_PREFIX}{head}.lora_A.weight"] = A.contiguous()
                        tensors[f"{PEFT_PREFIX}{head}.lora_B.weight"] = B.contiguous()
                else:
                    tensors[f"{key}.lora_A.weight"] = A.contiguous()
                    tensors[f"{key}.lora_B.weight"] = B.contiguous()
                if name not in experts:
                    ranks[keys[name]] = A.shape[0]
            save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
            default_r = expert_rank or max(ranks.values(), default=1)
            config = {
                "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
                "r": default_r, "lora_alpha": default_r, "rank_pattern": ranks, "alpha_pattern": ranks,
                "target_modules": sorted(set(keys.values())), "lora_dropout": 0.0, "bias": "none",
                "fan_in_fan_out": False, "inference_mode": True,
            }
            if head is not None:
                config["ensure_weight_tying"] = True  # the LM head is the embedding: it gets the factors too
            write_json(tmp / "adapter_config.json", config)
            meta = {
                "provenance": self.provenance,
                "coefficients_folded": coeffs if folded is None else folded,
                "selection": self.selection,
                "modules": {name: {"rank": m.rank, "layer": m.layer, "energy": m.energy,
                                   "singular_values": m.S.tolist(), "adapter_key": keys[name]}
                            for name, m in kept.items()},
            }
            write_json(tmp / "safegene.json", meta)
            if card is not None:
                (tmp / "README.md").write_text(card, encoding="utf-8")
            for name, text in (extra_files or {}).items():  # a run record, written with the adapter
                (tmp / name).write_text(text, encoding="utf-8")
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike, allow_folded: bool = False) -> SafetyGene:
        """Reads a gene saved by ``save`` back, factor for factor. An adapter written with
        coefficients other than 1 folded into B (``apply --format peft``) is refused unless
        ``allow_folded``: used as a gene, its coefficients would be applied twice."""
        folder = Path(folder)
        try:
            meta = json.loads((folder / "safegene.json").read_text())
            tensors = load_file(str(folder / "adapter_model.safetensors"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError, SafetensorError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc).splitlines()[0]
            raise CheckpointError(f"{folder}: not a safety gene folder ({reason}).") from None
        if not (isinstance(meta, dict) and isinstance(meta.get("modules"), dict) and meta["modules"]):
            raise CheckpointError(f"{folder}: its safegene.json lists no modules.")
        if meta.get("coefficients_folded", 1.0) != 1.0 and not allow_folded:
            raise CheckpointError(f"{folder}: is an adapter with coefficients folded in (written by apply as a "
                                  f"PEFT adapter), not a gene; use the folder extract wrote.")
        modules = {}
        for name, info in meta["modules"].items():
            try:
                S, energy, layer = torch.tensor(info["singular_values"]), info["energy"], info["layer"]
                key, rank = PEFT_PREFIX + info.get("adapter_key", name), info.get("rank")
                if not (isinstance(energy, (int, float)) and (layer is None or type(layer) is int)
                        and isinstance(key, str) and (rank is None or type(rank) is int)):
                    raise TypeError
            except (KeyError, TypeError, ValueError, RuntimeError, AttributeError):
                raise CheckpointError(f"{folder}: safegene.json has a malformed entry for module {name!r}.") from None
            if f"{key}.lora_embedding_A" in tensors:  # PEFT's embedding factors are B.T and A.T
                B, A = tensors[f"{key}.lora_embedding_A"].T.contiguous(), tensors.get(f"{key}.lora_embedding_B")
                A = A.T.contiguous() if A is not None else None
            else:
                A, B = tensors.get(f"{key}.lora_A.weight"), tensors.get(f"{key}.lora_B.weight")
            if A is None or B is None:
                raise CheckpointError(f"{folder}: adapter has no factors for module {name!r}.")
            if rank is not None and A.dim() == 2 and B.dim() == 2 and A.shape[0] == B.shape[1] > rank:
                A, B = A[:rank].contiguous(), B[:, :rank].contiguous()  # zero padding to the experts' common rank
            if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
                raise CheckpointError(f"{folder}: the factors of module {name!r} have shapes {list(B.shape)} and "
                                      f"{list(A.shape)}, which do not multiply.")
            if not (bool(torch.isfinite(A).all()) and bool(torch.isfinite(B).all())):
                raise CheckpointError(f"{folder}: the factors of module {name!r} hold NaN or Inf values.")
            modules[name] = GeneModule(B, A, S, energy, layer)
        return cls(modules, meta.get("provenance", {}), meta.get("selection"), folder)
