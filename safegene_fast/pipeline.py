"""extract / apply / resta over checkpoints streamed from disk (Python API)."""

from __future__ import annotations

import hashlib
import math
import os
import re
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from safegene_fast import ops
from safegene_fast.ops import KERNEL_DTYPES  # tensors of any other dtype are copied, never merged
from safegene_fast._version import __version__
from safegene_fast.architecture import ROUTER, TOWERS, ModuleNames, is_router
from safegene_fast.card import CARD_NAME, model_card
from safegene_fast.gene import GeneModule, SafetyGene, layer_of
from safegene_fast.io import (
    Checkpoint,
    CheckpointError,
    Planned,
    ShardedWriter,
    check_same_layout,
)
from safegene_fast.io.writer import DEFAULT_MAX_SHARD_SIZE
from safegene_fast.lora import LoraCheckpoint, base_of, is_adapter, open_checkpoint
from safegene_fast.progress import Progress

# Default targets: every 2-D weight inside the transformer blocks (attention and MLP
# projections, MoE experts); embeddings, the LM head and norms are outside this pattern or 1-D.
# Without an explicit include, DEFAULT_EXCLUDE also leaves out MoE routers and the layers of a
# multimodal model's vision (or audio) tower: the gene is the language model's.
DEFAULT_INCLUDE = r"\.layers\.\d+\..*\.weight$"
DEFAULT_EXCLUDE = rf"{ROUTER}\.weight$|{TOWERS}"
MAX_POWER_ITERS = 20   # each is two passes over the delta; past a few the factors stop changing
MAX_OVERSAMPLE = 512
PIECE = 16 * 2**20  # elements apply and resta read, merge and write at a time


def _pattern(text: str) -> re.Pattern:
    try:
        return re.compile(text)
    except re.error as exc:
        raise ValueError(f"{text!r} is not a valid regular expression ({exc.msg} at position {exc.pos}).") from None


def select_modules(ckpt: Checkpoint, include: str | None = None, exclude: str | None = None) -> list[str]:
    """Weight names whose module gets a gene factor: the 2-D weights the selection matches (an
    explicit ``include`` is taken as is: it can bring in routers and towers, which the default
    leaves out). A matched weight the kernels cannot factor (float8 or integer: a quantized
    checkpoint; float64) is an error, not a module silently left out."""
    inc, exc = _pattern(include or DEFAULT_INCLUDE), _pattern(exclude) if exclude else None
    default_exc = _pattern(DEFAULT_EXCLUDE) if not include else None
    names = [n for n, info in ckpt.tensors.items()
             if len(info.shape) == 2 and inc.search(n) and not (exc and exc.search(n))
             and not (default_exc and default_exc.search(n))]
    other = [n for n in names if ckpt.tensors[n].dtype not in KERNEL_DTYPES]
    if other:
        dtype = str(ckpt.tensors[other[0]].dtype).removeprefix("torch.")
        raise CheckpointError(f"{ckpt.path}: {len(other)} of the selected weights, first {other[0]!r}, are not "
                              f"bfloat16, float16 or float32 ({dtype}: a quantized checkpoint?), and a gene is "
                              f"factored only from those; dequantize the checkpoint first, or leave them out with "
                              f"--exclude.")
    return names


class NonFiniteError(CheckpointError):
    """NaN or Inf values that ``allow_nonfinite`` lets through with a warning instead: in a delta
    (its entries are zeroed, so the merge keeps the target's value) or in the target's own
    weights (the output keeps them, bit for bit). ``allowing`` says which, for the flag's hint."""

    def __init__(self, source, tensor: str, count: int, in_target: bool = False):
        self.where = f"tensor {tensor!r}" if in_target else f"the delta of tensor {tensor!r}"
        super().__init__(f"{source}: {self.where} has {count} NaN or Inf values.")
        self.source, self.tensor, self.count, self.in_target = source, tensor, count, in_target
        self.allowing = "keep them" if in_target else "zero them"

    def warn(self) -> None:
        """The warning given in place of this error when NaN and Inf are allowed."""
        done = "kept" if self.in_target else "zeroed"
        warnings.warn(f"{self.source}: {done} {self.count} NaN or Inf values in {self.where}.", stacklevel=3)


class MergeOverflowError(ValueError):
    """A merge that made NaN or Inf where the target's weight is finite: no flag allows it."""

    def __init__(self, source, tensor: str, count: int, alpha: float, dtype: torch.dtype):
        name = str(dtype).removeprefix("torch.")
        super().__init__(f"{source}: merging tensor {tensor!r} with coefficient {alpha:g} overflows {name} in "
                         f"{count} values: the coefficient is too large for this dtype.")
        self.source, self.tensor, self.count = source, tensor, count


def squared_frobenius(delta: torch.Tensor) -> float:
    """||delta||_F^2 from per-row fp32 norms summed in double: one fp32 reduction over a 28672 x
    8192 matrix came out 7% low (accumulated rounding); a row of a few thousand terms does not."""
    rows = delta.view(delta.shape[0], -1) if delta.dim() > 1 else delta.view(1, -1)
    return float(torch.linalg.vector_norm(rows, dim=1).double().square().sum())


def _check_finite(delta: torch.Tensor, inputs: list[tuple[object, torch.Tensor]], name: str,
                  allow: bool) -> tuple[int, float]:
    """A delta with NaN or Inf would poison every merge made from it: refuse it, naming the tensor
    and the input file that holds the bad values, or with ``allow`` zero those entries (the merged
    weight keeps the target's value there) and warn. Returns how many entries were zeroed and
    ``squared_frobenius`` of the delta as it now is (the same pass tells whether it is finite)."""
    total = squared_frobenius(delta)
    if math.isfinite(total):  # one cheap pass; isfinite() costs 2 bytes/element
        return 0, total
    bad = int((~torch.isfinite(delta)).sum())
    if not bad:  # finite values whose squares overflow
        return 0, total
    error = NonFiniteError(_nonfinite_source(inputs), name, bad)
    if not allow:
        raise error
    torch.nan_to_num_(delta, nan=0.0, posinf=0.0, neginf=0.0)
    error.warn()
    return bad, squared_frobenius(delta)


def _all_finite(piece: torch.Tensor) -> bool:
    """One cheap pass: the 2-norm is NaN or Inf when any entry is (on bfloat16 pieces it was the
    cheapest reduction measured; aminmax, sum and max cost more). Finite entries can make it Inf
    too (squares past float32, a float16 norm past 65504): then aminmax, exact, decides."""
    if math.isfinite(float(torch.linalg.vector_norm(piece))):
        return True
    smallest, largest = torch.aminmax(piece)
    return math.isfinite(float(smallest)) and math.isfinite(float(largest))


def _nonfinite_in_output(out: torch.Tensor, target: Callable[[], torch.Tensor] | None) -> tuple[int, int]:
    """(NaN and Inf the target already held, NaN and Inf the merge made) in one output piece.
    Where the target is NaN or Inf the output gets its value back, bit for bit. ``target()``
    gives the target's piece; it is called (a second read) only when the piece is not finite.
    ``target=None``: ``out`` is the target's piece itself, copied unmerged."""
    if _all_finite(out):
        return 0, 0
    bad = ~torch.isfinite(out)
    if target is None:
        return int(bad.sum()), 0
    original = target()
    theirs = ~torch.isfinite(original)
    out[theirs] = original[theirs]
    return int(theirs.sum()), int((bad & ~theirs).sum())


@dataclass
class _NonFiniteTally:
    """NaN and Inf met in one tensor's pieces, judged once the tensor is complete (so the counts
    are the tensor's, not its first bad piece's)."""

    zeroed: int = 0              # in A - D, zeroed (resta)
    delta_source: object = None  # the first input whose piece of A - D held them
    kept: int = 0                # the target's own
    made: int = 0                # made by the merge: an overflow

    def add_zeroed(self, count: int, inputs: list[tuple[object, torch.Tensor]]) -> None:
        self.delta_source = self.delta_source or _nonfinite_source(inputs)
        self.zeroed += count

    def add_output(self, out: torch.Tensor, target: Callable[[], torch.Tensor] | None) -> None:
        kept, made = _nonfinite_in_output(out, target)
        self.kept, self.made = self.kept + kept, self.made + made

    def judge(self, source, name: str, alpha: float, dtype: torch.dtype, allow: bool) -> None:
        """An overflow is an error whatever ``allow`` says (so it is reported first); the inputs'
        NaN and Inf are refused, or with ``allow`` warned about."""
        if self.made:
            raise MergeOverflowError(source, name, self.made, alpha, dtype)
        found = [NonFiniteError(self.delta_source, name, self.zeroed)] if self.zeroed else []
        if self.kept:
            found.append(NonFiniteError(source, name, self.kept, in_target=True))
        for error in found:
            if not allow:
                raise error
            error.warn()


def extract(aligned: str | os.PathLike, degraded: list[str | os.PathLike], *, rank: int | None = None,
            energy: float | None = None, max_rank: int | None = None, oversample: int = 8,
            power_iters: int = 2, seed: int = 0, include: str | None = None, exclude: str | None = None,
            device: str = "cpu", factor_dtype: torch.dtype = torch.float32, allow_nonfinite: bool = False,
            base: str | os.PathLike | None = None, progress: bool = False) -> SafetyGene:
    """The safety gene of ``aligned - mean(degraded)``: LoRA factors per selected module. Any
    input may be a LoRA adapter folder, read merged on its base (``base``, else its config's)."""
    ops.require_device(device)
    if isinstance(degraded, (str, os.PathLike)):  # one path, not a list of its characters
        degraded = [degraded]
    if not degraded:
        raise CheckpointError("extract needs at least one degraded checkpoint.")
    if not (isinstance(power_iters, int) and 0 <= power_iters <= MAX_POWER_ITERS):
        raise ValueError(f"power iterations must be an integer from 0 to {MAX_POWER_ITERS}, not {power_iters!r}.")
    if not (isinstance(oversample, int) and 0 <= oversample <= MAX_OVERSAMPLE):
        raise ValueError(f"oversampling must be an integer from 0 to {MAX_OVERSAMPLE}, not {oversample!r}.")
    with ExitStack() as stack:
        a_ckpt = stack.enter_context(open_checkpoint(aligned, base))
        d_ckpts = [stack.enter_context(open_checkpoint(p, base)) for p in degraded]
        check_same_layout(a_ckpt, *d_ckpts, interchangeable=KERNEL_DTYPES)
        names = select_modules(a_ckpt, include, exclude)
        if not names:
            raise CheckpointError(f"{aligned}: no tensor matches the module selection.")
        modules, nonfinite = {}, 0
        # what the gene was made from: the content of the tensors read, hashed as they stream by
        digests = [hashlib.sha256() for _ in (a_ckpt, *d_ckpts)]
        readers = [c.iter_tensors(names, ring=2, digest=h) for c, h in zip((a_ckpt, *d_ckpts), digests)]
        total_bytes = sum(a_ckpt.tensors[n].nbytes for n in names)
        with Progress("extract", total_bytes, len(names), progress) as bar:
            for items in zip(*readers):
                name = items[0][0]
                a, bs = items[0][1].to(device), [t.to(device) for _, t in items[1:]]
                delta = ops.delta(a, bs)  # the one fp32 matrix; rsvd takes it without a copy
                zeroed, total = _check_finite(delta, list(zip([aligned, *degraded], [a, *bs])), name,
                                              allow_nonfinite)
                nonfinite += zeroed
                B, A, S = ops.rsvd_lora(delta, rank=rank, energy=energy, max_rank=max_rank,
                                        oversample=oversample, power_iters=power_iters, seed=seed,
                                        dtype=factor_dtype)
                kept = float(S.double().square().sum()) / total if total > 0 else 1.0
                module = name.removesuffix(".weight")
                modules[module] = GeneModule(B.cpu(), A.cpu(), S.cpu(), kept, layer_of(module))
                bar.advance(a_ckpt.tensors[name].nbytes)
        provenance = {
            "aligned": str(aligned), "degraded": [str(p) for p in degraded],
            "sha256": {str(p): h.hexdigest() for p, h in zip([aligned, *degraded], digests)},
            "settings": {"rank": rank, "energy": energy, "max_rank": max_rank, "oversample": oversample,
                         "power_iters": power_iters, "seed": seed, "include": include or DEFAULT_INCLUDE,
                         "exclude": exclude, "allow_nonfinite": allow_nonfinite},
            "nonfinite_zeroed": nonfinite,
            "safegene_fast": __version__,
        }
    return SafetyGene(modules, provenance)


def apply_merged(model: str | os.PathLike, gene: SafetyGene, out: str | os.PathLike,
                 coeffs: dict[str, float] | float = 1.0, *, max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
                 device: str = "cpu", overwrite: bool = False, allow_nonfinite: bool = False,
                 base: str | os.PathLike | None = None, extra_files: dict[str, str] | None = None,
                 progress: bool = False) -> Path:
    """Streams ``model`` and writes ``W + alpha[l(m)] * B @ A`` for every gene module; for a LoRA
    adapter ``model``, its base's ``W + s * B_t @ A_t + alpha * B @ A`` (one merge of the two
    updates concatenated along the rank, so one rounding).

    In pieces of about PIECE elements (whole rows): each is read into one of two reused buffers,
    merged in place there (``merge_lowrank_`` on its rows of B) and written behind while the
    next piece is read and merged, so memory stays at two pieces whatever the tensor sizes.
    Pieces no merge touches (any dtype) are seen in place in the page cache and written from
    there, byte for byte: one copy instead of two, which pays for the check below.
    Every bfloat16, float16 and float32 piece written is checked for NaN and Inf (one cheap
    reduction): a merge that made them is an error, the model's own are refused unless
    ``allow_nonfinite`` (then kept, with a warning)."""
    ops.require_device(device)
    gene.check_coefficients(coeffs)
    with open_checkpoint(model, base) as ckpt:
        _check_gene_fits(model, ckpt, gene)
        source = ckpt.base if isinstance(ckpt, LoraCheckpoint) else ckpt  # the bytes on disk
        plan = [Planned(n, i.dtype, i.shape) for n, i in ckpt.tensors.items()]
        ring = _PieceRing()
        written_view = None  # (name, start, count) of a mapped piece being written: released after
        card = protected_card(model, gene, coeffs, "merged", ckpt)
        with ShardedWriter(out, plan, max_shard_size, copy_from=companion_folders(ckpt), overwrite=overwrite,
                           inputs=[model, *gene_inputs(gene)], extra_files={CARD_NAME: card, **(extra_files or {})}) as writer, \
                Progress("apply", sum(p.nbytes for p in plan), len(plan), progress) as bar:
            for p in plan:
                info = ckpt.tensors[p.name]
                update = merged_update(ckpt, gene, coeffs, p.name)
                alpha = gene.coefficient_for(p.name.removesuffix(".weight"), coeffs) if update else 0.0
                numel = info.nbytes // info.dtype.itemsize
                nonfinite = _NonFiniteTally()
                if update is not None:
                    B, A = (f.to(device) for f in update)
                    row = info.shape[1]
                    step = max(1, PIECE // row) * row  # whole rows
                else:
                    step = PIECE
                for lo in range(0, numel, step):
                    n = min(step, numel - lo)
                    if update is not None:
                        w = source.read(p.name, into=ring.next(n * info.dtype.itemsize, torch.uint8), start=lo, count=n)
                        rows = slice(lo // row, (lo + n) // row)
                        w_dev = w.view(-1, row).to(device)
                        ops.merge_lowrank_(w_dev, B[rows], A, 1.0)
                        if w_dev.data_ptr() != w.data_ptr():
                            w.copy_(w_dev.view(-1))
                        nonfinite.add_output(w, partial(ckpt.read, p.name, start=lo, count=n))
                    else:
                        w = source.view(p.name, lo, n)  # never written to: the writer only reads it
                        if info.dtype in KERNEL_DTYPES:
                            nonfinite.add_output(w, None)
                    writer.write_part(p.name, w)  # returns once the write before it is done
                    if written_view is not None:
                        source.release(*written_view)
                    written_view = None if update is not None else (p.name, lo, n)
                nonfinite.judge(model, p.name, alpha, info.dtype, allow_nonfinite)
                if not numel:
                    writer.write(p.name, torch.empty(info.shape, dtype=info.dtype))
                bar.advance(info.nbytes)
    return Path(out)


def merged_update(ckpt: Checkpoint | LoraCheckpoint, gene: SafetyGene, coeffs: dict[str, float] | float,
                  name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(B, A) whose product is what apply adds to tensor ``name``: the gene's ``alpha * B`` and A
    (B's dtype kept, so PEFT's merge of the adapter equals it), after a LoRA target's own update
    along the rank when it has one (in float32); None when nothing is added."""
    module = name.removesuffix(".weight")
    alpha = gene.coefficient_for(module, coeffs) if module in gene.modules else 0.0
    own = ckpt.updates.get(name) if isinstance(ckpt, LoraCheckpoint) else None
    if alpha == 0.0:
        return own
    B, A = gene.modules[module].scaled_B(alpha), gene.modules[module].A
    if own is None:
        return B, A
    return torch.cat([own[0], B.float()], dim=1), torch.cat([own[1], A.float()], dim=0)


def companion_folders(ckpt: Checkpoint | LoraCheckpoint) -> list[Path]:
    """Where an output of ``ckpt`` gets its companion files (config, tokenizer, license ...)."""
    return ckpt.companion_folders() if isinstance(ckpt, LoraCheckpoint) else [ckpt.folder]


FORMATS = ("merged", "peft", "combined")


def apply(model: str | os.PathLike, gene: SafetyGene | str | os.PathLike, out: str | os.PathLike,
          coeffs: dict[str, float] | float = 1.0, *, format: str = "merged", max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
          device: str = "cpu", overwrite: bool = False, allow_nonfinite: bool = False,
          base: str | os.PathLike | None = None, extra_files: dict[str, str] | None = None,
          progress: bool = False) -> Path:
    """Re-applies a gene to ``model`` (a model, or a LoRA adapter folder on ``base`` or the base its
    config names). ``merged`` writes the merged checkpoint; ``peft`` writes an adapter for
    ``model`` (merged, if it is an adapter) with the coefficients folded into B (PEFT's merge
    equals ``merged``); ``combined``, for an adapter ``model`` only, writes one adapter on its base
    holding the adapter's update and the gene's along the rank (PEFT's merge equals ``merged``).
    ``allow_nonfinite``: a merged checkpoint keeps NaN or Inf weights of ``model`` (with a
    warning) instead of refusing them; the adapter formats read no weights, so they do not look.
    ``extra_files``: name -> text, written into the output with it (a run record)."""
    if format not in FORMATS:
        raise ValueError(f"unknown output format {format!r}; use {', '.join(map(repr, FORMATS))}.")
    if not isinstance(gene, SafetyGene):
        gene = SafetyGene.load(gene)
    if format == "merged":
        return apply_merged(model, gene, out, coeffs, max_shard_size=max_shard_size, device=device,
                            overwrite=overwrite, allow_nonfinite=allow_nonfinite, base=base, extra_files=extra_files,
                            progress=progress)
    if format == "combined":
        return apply_combined(model, gene, out, coeffs, overwrite=overwrite, base=base, extra_files=extra_files)
    gene.check_coefficients(coeffs)
    with open_checkpoint(model, base) as ckpt:
        _check_gene_fits(model, ckpt, gene)
        card = protected_card(model, gene, coeffs, "peft", ckpt)
    return gene.save(out, overwrite=overwrite, base_model=model_reference(model), coeffs=coeffs,
                     inputs=[model, *gene_inputs(gene)], card=card, names=ModuleNames.of(ckpt.folder),
                     extra_files=extra_files)


def apply_combined(model: str | os.PathLike, gene: SafetyGene, out: str | os.PathLike,
                   coeffs: dict[str, float] | float = 1.0, *, overwrite: bool = False,
                   base: str | os.PathLike | None = None, extra_files: dict[str, str] | None = None) -> Path:
    """One PEFT adapter on the base of LoRA adapter ``model``: per module, the adapter's update
    and the gene's (coefficients folded in) concatenated along the rank (r_task + r_gene), so
    one adapter per fine-tune serves the protected model (multi-LoRA engines load it as any)."""
    if not is_adapter(model):
        raise CheckpointError(f"{model}: the combined format is for a LoRA adapter target (it holds the adapter's "
                              f"update and the gene together), and this is a full model; use merged or peft.")
    gene.check_coefficients(coeffs)
    with LoraCheckpoint(model, base) as ckpt:
        _check_gene_fits(model, ckpt, gene)
        router = next((n for n in ckpt.updates if is_router(n.removesuffix(".weight"))), None)
        if router is not None:
            raise CheckpointError(f"{model}: the adapter updates the MoE router {router!r}, which a PEFT adapter holds "
                                  f"only as a wrapped parameter, not beside a gene; use the merged format.")
        modules = {}
        for name in [n for n in ckpt.tensors if n in ckpt.updates or n.removesuffix(".weight") in gene.modules]:
            update = merged_update(ckpt, gene, coeffs, name)
            if update is not None:
                module = name.removesuffix(".weight")
                modules[module] = GeneModule(update[0].contiguous(), update[1].contiguous(), torch.empty(0),
                                             1.0, layer_of(module))  # energy: the whole update, nothing cut
        card = protected_card(model, gene, coeffs, "combined", ckpt)
        base_folder = ckpt.base.folder
        base_name = model_reference(base if base is not None else ckpt.adapter.config["base_model_name_or_path"])
    combined = SafetyGene(modules, {**gene.provenance, "task_adapter": model_reference(model)})
    return combined.save(out, overwrite=overwrite, base_model=base_name, folded={"gene": coeffs, "task_adapter": 1.0},
                         inputs=[model, base_folder, *gene_inputs(gene)], card=card,
                         names=ModuleNames.of(base_folder), extra_files=extra_files)


def protected_card(model, gene: SafetyGene, coeffs: dict[str, float] | float, kind: str,
                   ckpt: Checkpoint | LoraCheckpoint) -> str:
    """The model card of ``model`` protected by ``gene`` at ``coeffs`` (the modules a coefficient
    of 0 leaves out are not counted)."""
    applied = [name for name in gene.modules if gene.coefficient_for(name, coeffs) != 0]
    layers = sorted({gene.modules[name].layer for name in applied if gene.modules[name].layer is not None})
    lora = isinstance(ckpt, LoraCheckpoint)
    return model_card(target=model, kind=kind, gene_provenance=gene.provenance, modules=len(applied),
                      layers=layers, coeffs=coeffs, source_folder=ckpt.path if lora else ckpt.folder,
                      base=ckpt.base.path if lora else None)


def model_reference(model: str | os.PathLike) -> str:
    """How an adapter names its base model: a local folder by its absolute path, a Hub id as it is."""
    return str(Path(model).resolve()) if Path(model).exists() else str(model)


def gene_inputs(gene: SafetyGene) -> list[Path]:
    """The folder a gene was read from, if any: an input an output may not touch."""
    return [gene.folder] if gene.folder is not None else []


def _check_gene_fits(model, ckpt: Checkpoint, gene: SafetyGene) -> None:
    """Every gene module names a weight of ``model`` with the factors' shape, in a dtype the
    kernels merge into."""
    for m, g in gene.modules.items():
        info = ckpt.tensors.get(f"{m}.weight")
        if info is None:
            raise CheckpointError(f"{model}: has no tensor {m + '.weight'!r}, which the gene targets.")
        if info.shape != (g.B.shape[0], g.A.shape[1]):
            raise CheckpointError(f"{model}: tensor {m + '.weight'!r} has shape {list(info.shape)} but the "
                                  f"gene's factors make {[g.B.shape[0], g.A.shape[1]]}.")
        if info.dtype not in KERNEL_DTYPES:
            raise CheckpointError(f"{model}: tensor {m + '.weight'!r}, which the gene targets, is "
                                  f"{str(info.dtype).removeprefix('torch.')}, and a gene merges only into "
                                  f"bfloat16, float16 or float32 weights.")


def resta(model: str | os.PathLike, aligned: str | os.PathLike, degraded: str | os.PathLike,
          alpha: float, out: str | os.PathLike, *, max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
          device: str = "cpu", overwrite: bool = False, allow_nonfinite: bool = False,
          base: str | os.PathLike | None = None, progress: bool = False) -> Path:
    """The dense RESTA baseline: every bfloat16, float16 and float32 tensor becomes
    ``T + alpha * (A - D)``; tensors of other dtypes are T's, copied byte for byte. Any of the
    three may be a LoRA adapter folder (read merged on ``base``, else on its config's base).

    Streams in pieces of PIECE elements: T, A and D are seen in place in the page cache
    (``Checkpoint.view``, nothing copied on the way in) and ``merge_diff`` writes each result
    piece straight into one of two reused buffers, which the writer writes behind while the
    next piece is merged (no float32 delta, no reader threads). Each piece's mapped pages are
    released once merged, so memory stays at a few pieces whatever the tensor sizes. The next
    tensor is requested from the kernel (``prefetch``) in the background.

    NaN or Inf in A - D are refused, or with ``allow_nonfinite`` zeroed (T kept there); in T
    itself refused, or kept; made by the merge (an overflow): always an error. Each is judged
    once its tensor is complete, so the counts are the tensor's.
    """
    ops.require_device(device)
    with open_checkpoint(model, base) as t_ckpt, open_checkpoint(aligned, base) as a_ckpt, \
            open_checkpoint(degraded, base) as d_ckpt, \
            ThreadPoolExecutor(max_workers=1) as prefetcher:
        ckpts = (t_ckpt, a_ckpt, d_ckpt)
        check_same_layout(t_ckpt, a_ckpt, d_ckpt, interchangeable=KERNEL_DTYPES)
        plan = [Planned(n, i.dtype, i.shape) for n, i in t_ckpt.tensors.items()]
        names = [p.name for p in plan]
        ring = _PieceRing()
        with ShardedWriter(out, plan, max_shard_size, copy_from=companion_folders(t_ckpt), overwrite=overwrite,
                           inputs=[model, aligned, degraded]) as writer, \
                Progress("resta", sum(p.nbytes for p in plan), len(plan), progress) as bar:
            pending = prefetcher.submit(_prefetch, ckpts, names[:1])
            for i, name in enumerate(names):
                pending.result()
                pending = prefetcher.submit(_prefetch, ckpts, names[i + 1:i + 2])
                info = t_ckpt.tensors[name]
                numel = info.nbytes // info.dtype.itemsize
                merged_dtype = info.dtype in KERNEL_DTYPES
                nonfinite = _NonFiniteTally()
                for lo in range(0, numel, PIECE):
                    n = min(PIECE, numel - lo)
                    w = ring.next(n, info.dtype)  # the piece written two pieces ago is on disk
                    if merged_dtype:
                        t, a, d = (c.view(name, lo, n) for c in ckpts)
                        if device == "cpu":
                            _, piece_zeroed = ops.merge_diff(t, a, d, alpha, w)
                        else:
                            merged, piece_zeroed = ops.merge_diff(t.to(device), a.to(device), d.to(device), alpha)
                            w.copy_(merged)
                        if piece_zeroed:  # merge_diff kept T where A - D is NaN or Inf
                            nonfinite.add_zeroed(piece_zeroed, [(aligned, a), (degraded, d)])
                        nonfinite.add_output(w, lambda: t)
                        del t, a, d
                        for c in ckpts:
                            c.release(name, lo, n)
                    else:  # integer, float64, float8 and other tensors: the target's bytes, unchanged
                        w.view(torch.uint8).copy_(t_ckpt.view(name, lo, n).view(torch.uint8))
                        t_ckpt.release(name, lo, n)
                    writer.write_part(name, w)
                nonfinite.judge(model, name, alpha, info.dtype, allow_nonfinite)
                if not numel:
                    writer.write(name, torch.empty(info.shape, dtype=info.dtype))
                bar.advance(info.nbytes)
            pending.result()
    return Path(out)


class _PieceRing:
    """Two reused piece buffers taking turns: one being filled, one being written behind
    (``ShardedWriter.write_part`` waits for the write before it, so a buffer handed out is free)."""

    def __init__(self):
        self.buffers, self.turn = [torch.empty(0, dtype=torch.uint8) for _ in range(2)], 0

    def next(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        self.turn ^= 1
        nbytes = numel * dtype.itemsize
        if self.buffers[self.turn].numel() < nbytes:
            self.buffers[self.turn] = torch.empty(0, dtype=torch.uint8)  # free the small one first
            self.buffers[self.turn] = torch.empty(nbytes, dtype=torch.uint8)
        return self.buffers[self.turn][:nbytes].view(dtype)


def _prefetch(ckpts: tuple[Checkpoint, ...], names: list[str]) -> None:
    for name in names:
        for c in ckpts:
            c.prefetch(name)


def _nonfinite_source(inputs: list[tuple[object, torch.Tensor]]) -> object:
    """The first input file whose piece holds a NaN or Inf (the first input when only their
    difference overflows)."""
    return next((path for path, t in inputs if not bool(torch.isfinite(t).all())), inputs[0][0])
