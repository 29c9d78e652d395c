"""A PEFT LoRA adapter on its base model, read as the checkpoint its merge would be.

Fine-tunes are mostly shipped as LoRA adapters. ``open_checkpoint`` gives a folder holding one
(``adapter_config.json``) as a ``LoraCheckpoint``: the base's tensors, each adapted one with its
update ``s * B @ A`` added as it streams by (``merge_lowrank_``: one pass, one rounding), never a
whole merged model in memory. ``updates`` holds those factors (``s`` folded into B), so a pass
that adds its own low-rank term (apply) concatenates the two along the rank and merges once.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from safegene_fast import ops
from safegene_fast.architecture import ModuleNames
from safegene_fast.gene import PEFT_PREFIX
from safegene_fast.io import Checkpoint, CheckpointError
from safegene_fast.io.reader import from_hub_cache

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# PEFT saves an adapted embedding's whole base weight beside its factors (save_embedding_layers)
BASE_LAYER = ".base_layer.weight"
# key suffix -> (factor, is an embedding's)
FACTOR_KEYS = {".lora_A.weight": ("A", False), ".lora_B.weight": ("B", False),
               ".lora_embedding_A": ("A", True), ".lora_embedding_B": ("B", True)}


def is_adapter(path: str | os.PathLike) -> bool:
    """``path`` is a folder holding a PEFT adapter."""
    return isinstance(path, (str, os.PathLike)) and (Path(path) / ADAPTER_CONFIG).is_file()


def open_checkpoint(path: str | os.PathLike, base: str | os.PathLike | None = None) -> Checkpoint | LoraCheckpoint:
    """``path`` as a checkpoint: a model folder, file or Hub id as it is; a LoRA adapter folder as
    its base with the adapter merged in (base from ``base``, else from the adapter's config)."""
    return LoraCheckpoint(path, base) if is_adapter(path) else Checkpoint(path)


def _read_config(folder: Path) -> dict:
    file = folder / ADAPTER_CONFIG
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc).splitlines()[0]
        raise CheckpointError(f"{file}: cannot read the adapter's configuration ({reason}).") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{file}: not a JSON object.")
    return config


def base_of(adapter: str | os.PathLike, base: str | os.PathLike | None = None) -> Path:
    """The base model folder of LoRA adapter ``adapter``: ``base`` if given, else the one its
    config names (a folder, or a Hub id found in the local cache)."""
    adapter = Path(adapter)
    if _is_gene(adapter):
        raise CheckpointError(f"{adapter}: is a safety gene, not a fine-tune; give it as the gene (--gene).")
    if base is None:
        base = _read_config(adapter).get("base_model_name_or_path")
        if not (isinstance(base, str) and base):
            raise CheckpointError(f"{adapter}: the adapter names no base model (base_model_name_or_path); give "
                                  f"--base.")
        if not Path(base).exists():
            try:
                base = from_hub_cache(base)
            except CheckpointError:
                raise CheckpointError(f"{adapter}: its base model {base!r} is neither a folder nor a model in the "
                                      f"local Hub cache; give --base.") from None
    elif not isinstance(base, (str, os.PathLike)):
        raise TypeError(f"a base model is a path or a Hub model id, not {type(base).__name__} {base!r}.")
    elif not Path(base).exists():
        base = from_hub_cache(str(base))
    if is_adapter(base):
        raise CheckpointError(f"{adapter}: its base {base} is itself an adapter; merge that one first.")
    return Path(base)


def _is_gene(folder: Path) -> bool:
    """A gene folder is an adapter too (aligned + gene), but given where a model goes it is a
    mix-up; adapters written by apply (coefficients or a task update folded in) are models."""
    try:
        meta = json.loads((folder / "safegene.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return False
    return isinstance(meta, dict) and meta.get("coefficients_folded", 1.0) == 1.0


def _scaling(config: dict, module: str, rank: int) -> float:
    """PEFT's ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA) for one module, its alpha from
    ``alpha_pattern`` where a pattern matches the module's name (as PEFT matches them)."""
    alpha = config.get("lora_alpha", 8)
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            alpha = value
            break
    if not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and math.isfinite(alpha)):
        raise CheckpointError(f"lora_alpha {alpha!r} for module {module!r} is not a finite number.")
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


class LoraAdapter:
    """A PEFT LoRA adapter's updates, as ``tensor name of the base -> (B, A)`` in float32 with the
    scaling folded into B, every one checked to land on a weight of the base with its shape."""

    def __init__(self, folder: str | os.PathLike, base: Checkpoint):
        self.folder = Path(folder)
        config = self.config = _read_config(self.folder)
        where = self.folder / ADAPTER_CONFIG
        kind = config.get("peft_type", "LORA")
        if kind != "LORA":
            raise CheckpointError(f"{where}: is a {kind} adapter; only LoRA adapters are read.")
        for flag, what in (("use_dora", "DoRA rescales whole weights"), ("fan_in_fan_out", "its weights are stored "
                           "transposed (GPT-2 style Conv1D)"), ("lora_bias", "it trains biases")):
            if config.get(flag):
                raise CheckpointError(f"{where}: sets {flag}, which is not read ({what}); merge it with PEFT's "
                                      f"merge_and_unload and give the merged model.")
        if config.get("bias", "none") != "none" or config.get("modules_to_save"):
            raise CheckpointError(f"{where}: the adapter also replaces whole weights or biases (bias / "
                                  f"modules_to_save), which is not read; merge it with PEFT's merge_and_unload and "
                                  f"give the merged model.")
        file = self.folder / ADAPTER_WEIGHTS
        if not file.is_file():
            other = "adapter_model.bin, pickle, which can run code when loaded" if (
                self.folder / "adapter_model.bin").is_file() else "nothing"
            raise CheckpointError(f"{self.folder}: has no {ADAPTER_WEIGHTS} ({other}).")
        factors: dict[str, dict[str, torch.Tensor]] = {}
        embedding: dict[str, bool] = {}
        copies: dict[str, torch.Tensor] = {}  # whole weights PEFT saves beside embedding factors
        digest = hashlib.sha256()
        try:
            with safe_open(str(file), "pt") as f:
                for key in f.keys():
                    suffix = next((s for s in FACTOR_KEYS if key.endswith(s)), None)
                    if suffix is None and key.startswith(PEFT_PREFIX) and key.endswith(BASE_LAYER):
                        copies[key[len(PEFT_PREFIX):-len(BASE_LAYER)] + ".weight"] = f.get_tensor(key)
                        continue
                    if suffix is None or not key.startswith(PEFT_PREFIX):
                        raise CheckpointError(f"{file}: key {key!r} is not a LoRA factor (PEFT names them "
                                              f"base_model.model.<module>.lora_A.weight / lora_B.weight).")
                    module = key[len(PEFT_PREFIX):-len(suffix)]
                    which, is_embedding = FACTOR_KEYS[suffix]
                    tensor = f.get_tensor(key)
                    digest.update(f"{key}|{tensor.dtype}|{list(tensor.shape)}\n".encode())
                    digest.update(memoryview(tensor.contiguous().view(torch.uint8).reshape(-1).numpy()))
                    factors.setdefault(module, {})[which] = tensor
                    embedding[module] = is_embedding
        except SafetensorError as exc:
            raise CheckpointError(f"{file}: cannot read the adapter's factors ({str(exc).splitlines()[0]}).") from None
        if not factors:
            raise CheckpointError(f"{file}: holds no LoRA factors.")
        digest.update(json.dumps(config, sort_keys=True).encode())
        self.fingerprint = digest.hexdigest()
        # The adapter names loaded modules; the base stores checkpoint names. Where every module
        # is a weight of the base (most architectures), they are the same and transformers (seconds
        # to import) is not asked. Fused MoE experts (one 3-D parameter per layer, one 2-D weight
        # per expert in the checkpoint) are targeted as parameters (``target_parameters``):
        # ``fused`` lists each one's checkpoint weights.
        direct = not config.get("target_parameters") and all(
            f"{m}.weight" in base.tensors for m in [*factors, *(c.removesuffix(".weight") for c in copies)])
        names = ModuleNames() if direct else ModuleNames.of(base.folder)
        stored, fused = {}, {}
        for n, info in ([] if names.identity else base.tensors.items()):
            if n.endswith(".weight") and len(info.shape) == 2:
                module = n.removesuffix(".weight")
                expert = names.expert(module)
                if expert is None:
                    stored[names.loaded(module)] = module
                else:
                    fused.setdefault(expert.parameter, []).append((n, expert))
        for module, copy in copies.items():
            name = stored.get(module.removesuffix(".weight"), module.removesuffix(".weight")) + ".weight"
            if name not in base.tensors or not torch.equal(copy, base.read(name).to(copy.dtype)):
                raise CheckpointError(f"{file}: replaces the base's weight {name!r} whole (a resized vocabulary?), "
                                      f"which is not read; merge it with PEFT's merge_and_unload and give the merged "
                                      f"model.")
        self.updates: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._fused_taken: set[str] = set()  # fused parameters a factor pair was assigned to
        for module, pair in factors.items():
            owner = re.sub(r"(\.base_layer)+$", "", module)  # PEFT nests a wrapper per targeted parameter
            candidates = {p: members for p, members in fused.items() if p.rsplit(".", 1)[0] == owner}
            if candidates:
                updates = self._expert_updates(module, pair, candidates, file)
            else:
                name = self._land(module, pair, embedding[module], stored.get(module, module), base, file)
                updates = {name: self._factors(module, pair, embedding[module], file)}
            twice = next((name for name in updates if name in self.updates), None)
            if twice is not None:
                raise CheckpointError(f"{file}: two of its modules update the base's weight {twice!r}.")
            self.updates.update(updates)

    def _expert_updates(self, module: str, pair: dict, candidates: dict, file: Path) -> dict:
        """Per checkpoint expert weight, its share of a LoRA on a fused expert parameter [E, out, in]:
        PEFT's A is [E * r, in] (expert-major) and B is [out, r * E] (expert-minor), so expert e's
        update is B.view(out, r, E)[:, :, e] @ A.view(E, r, in)[e]; its rows split among the weights
        fused along them (w1 and w3 in gate_up_proj)."""
        self._check_pair(module, pair, file)
        A, B = pair["A"].float(), pair["B"].float()
        fits = []
        for parameter, members in candidates.items():
            expert = members[0][1]
            rows = expert.shape[0] * len(expert.template)
            if A.shape[0] % expert.count == 0 and A.shape[1] == expert.shape[1] and B.shape[0] == rows:
                fits.append(parameter)
        fits = [p for p in fits if p not in self._fused_taken]
        if len(fits) != 1:
            what = "none" if not fits else "more than one"
            raise CheckpointError(f"{file}: the factors of module {module!r} ({list(B.shape)} and {list(A.shape)}) fit "
                                  f"{what} of the fused expert parameters of the base ({', '.join(sorted(candidates))}).")
        parameter = fits[0]
        self._fused_taken.add(parameter)
        members = candidates[parameter]
        count, out = members[0][1].count, members[0][1].shape[0]
        rank = A.shape[0] // count
        B = B * _scaling(self.config, parameter, rank)
        if not (bool(torch.isfinite(A).all()) and bool(torch.isfinite(B).all())):
            raise CheckpointError(f"{file}: the factors of module {module!r} hold NaN or Inf values (or overflow once "
                                  f"scaled).")
        A3, B3 = A.view(count, rank, -1), B.view(B.shape[0], rank, count)
        return {name: (B3[e.part * out:(e.part + 1) * out, :, e.index].contiguous(), A3[e.index].contiguous())
                for name, e in members}

    @staticmethod
    def _check_pair(module: str, pair: dict, file: Path) -> None:
        if set(pair) != {"A", "B"}:
            missing = "lora_B" if "A" in pair else "lora_A"
            raise CheckpointError(f"{file}: module {module!r} has no {missing} factor.")
        A, B = pair["A"], pair["B"]
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise CheckpointError(f"{file}: the factors of module {module!r} have shapes {list(B.shape)} and "
                                  f"{list(A.shape)}, which do not multiply.")

    def _land(self, module: str, pair: dict, is_embedding: bool, stored_as: str, base: Checkpoint,
              file: Path) -> str:
        """The base's weight the factors of ``module`` update; an error unless it exists, is 2-D,
        has their shape and a dtype the kernels merge into."""
        self._check_pair(module, pair, file)
        A, B = pair["A"], pair["B"]
        name = f"{stored_as}.weight"
        info = base.tensors.get(name)
        if info is None:
            raise CheckpointError(f"{file}: module {module!r} lands on no weight of the base {base.path} (no tensor "
                                  f"{name!r}); the adapter must be for this base.")
        shape = (A.shape[1], B.shape[0]) if is_embedding else (B.shape[0], A.shape[1])
        if info.shape != shape:
            raise CheckpointError(f"{file}: the factors of module {module!r} make a {list(shape)} update but the "
                                  f"base's tensor {name!r} is {list(info.shape)}.")
        if info.dtype not in ops.KERNEL_DTYPES:
            raise CheckpointError(f"{file}: module {module!r} updates tensor {name!r}, which is "
                                  f"{str(info.dtype).removeprefix('torch.')}; updates merge only into bfloat16, "
                                  f"float16 or float32 weights.")
        return name

    def _factors(self, module: str, pair: dict, is_embedding: bool, file: Path) -> tuple[torch.Tensor, torch.Tensor]:
        """(s * B, A) in float32, for the weight as the base stores it: an embedding's update is
        (B_e @ A_e).T, so its B is A_e.T and its A is B_e.T."""
        A, B = pair["A"].float(), pair["B"].float()
        if not (bool(torch.isfinite(A).all()) and bool(torch.isfinite(B).all())):
            raise CheckpointError(f"{file}: the factors of module {module!r} hold NaN or Inf values.")
        s = _scaling(self.config, module, A.shape[0])
        if is_embedding:
            A, B = B.T, A.T
        scaled = (B * s).contiguous()
        if not bool(torch.isfinite(scaled).all()):
            raise CheckpointError(f"{file}: scaling the factors of module {module!r} by {s:g} overflows float32.")
        return scaled, A.contiguous()


class LoraCheckpoint:
    """The base checkpoint with a LoRA adapter merged in as tensors are read: the reading half
    of ``Checkpoint``'s interface (``tensors``, ``read``, ``view``, ``iter_tensors`` ...)."""

    def __init__(self, adapter: str | os.PathLike, base: str | os.PathLike | None = None):
        self.path = Path(adapter)
        self.base = Checkpoint(base_of(adapter, base))
        try:
            self.adapter = LoraAdapter(adapter, self.base)
        except BaseException:
            self.base.close()
            raise
        self.updates = self.adapter.updates
        self.tensors = self.base.tensors
        self.folder = self.base.folder  # the model's companion files (config, tokenizer) are the base's

    def companion_folders(self) -> list[Path]:
        """Where a merged output's companion files come from: the base's, then the adapter's
        (a fine-tune may ship its own tokenizer or chat template), later ones winning."""
        return [self.base.folder, self.path]

    def _merged_rows(self, name: str, first: int, last: int, into: torch.Tensor | None) -> torch.Tensor:
        """Rows [first, last) of tensor ``name`` with the update added."""
        info = self.tensors[name]
        width = info.shape[1]
        rows = self.base.read(name, into=into, start=first * width, count=(last - first) * width).view(-1, width)
        B, A = self.updates[name]
        return ops.merge_lowrank_(rows, B[first:last], A, 1.0)

    def read(self, name: str, into: torch.Tensor | None = None, start: int = 0,
             count: int | None = None) -> torch.Tensor:
        """As ``Checkpoint.read``, the update added (an adapted tensor is read in whole rows)."""
        if name not in self.updates:
            return self.base.read(name, into=into, start=start, count=count)
        info = self.tensors[name]
        numel, width = math.prod(info.shape), info.shape[1]
        whole = start == 0 and count is None
        count = numel - start if count is None else count
        if not count:
            return self.base.read(name, into=into, start=start, count=count)
        first, last = start // width, -(-(start + count) // width)
        aligned = first * width == start and last * width == start + count
        rows = self._merged_rows(name, first, last, into if aligned else None)
        if whole:
            return rows.view(info.shape)
        piece = rows.view(-1)[start - first * width:start - first * width + count]
        if aligned or into is None:
            return piece
        out = into[:count * info.dtype.itemsize].view(info.dtype)
        out.copy_(piece)
        return out

    def view(self, name: str, start: int = 0, count: int | None = None) -> torch.Tensor:
        """A page-cache view for tensors the adapter leaves alone; the merged piece, in fresh
        memory, for those it updates."""
        if name not in self.updates:
            return self.base.view(name, start, count)
        return self.read(name, start=start, count=count)

    def release(self, name: str, start: int = 0, count: int | None = None) -> None:
        self.base.release(name, start, count)

    def prefetch(self, name: str) -> None:
        self.base.prefetch(name)

    def iter_tensors(self, names: Iterable[str], ring: int = 0,
                     digest=None) -> Iterator[tuple[str, torch.Tensor]]:
        """As ``Checkpoint.iter_tensors``; ``digest`` gets the adapter's fingerprint first, then
        the base's tensors as they are read."""
        if digest is not None:
            digest.update(f"lora {self.adapter.fingerprint}\n".encode())
        for name, tensor in self.base.iter_tensors(names, ring=ring, digest=digest):
            if name in self.updates:
                B, A = self.updates[name]
                ops.merge_lowrank_(tensor, B, A, 1.0)
            yield name, tensor

    def close(self) -> None:
        self.base.close()

    def __enter__(self) -> LoraCheckpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
