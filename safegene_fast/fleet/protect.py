"""``protect``: one fine-tune protected by a gene, with a record of what was done.

Coefficients are given, or recalibrated on the target from a few shots; the protected model is
optionally evaluated before and after (after through the gene patched onto the loaded target, the
merged weights up to rounding); then ``apply`` writes the output and, inside it and atomically with
it, ``safegene-run.json``: inputs and their fingerprints, the gene's provenance, coefficients,
settings, versions, timings and evaluation.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from safegene_fast._version import __version__
from safegene_fast.gene import SafetyGene
from safegene_fast.lora import ADAPTER_WEIGHTS, LoraCheckpoint, is_adapter, open_checkpoint
from safegene_fast.pipeline import FORMATS, apply

RUN_RECORD = "safegene-run.json"


@dataclass(frozen=True)
class Shots:
    """What recalibration learns from: a few harmful prompts (their refusal made likely) and task
    prompts whose own answers are kept."""

    harmful: list[str]
    keep: list[str]
    refusal: str
    shots: int = 16
    steps: int = 40
    lr: float = 0.1
    alpha_max: float = 2.0


@dataclass(frozen=True)
class Settings:
    """Everything but the paths that decides a protected output: two runs with equal settings on
    unchanged inputs write the same bytes (``--resume`` compares them)."""

    format: str = "merged"
    coeffs: dict[str, float] | float | None = None  # given; None: recalibrated from ``recalibrate``
    recalibrate: Shots | None = None
    evaluate: list[str] | None = None               # harmful prompts to evaluate on, before and after
    max_new_tokens: int = 16

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ValueError(f"unknown output format {self.format!r}; use {', '.join(map(repr, FORMATS))}.")
        if (self.coeffs is None) == (self.recalibrate is None):
            raise ValueError("give the coefficients or the shots to recalibrate them from, not both and not neither.")

    def as_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))  # JSON's own types, as the record stores them


def fingerprint(path: str | os.PathLike, base: str | os.PathLike | None = None) -> str:
    """sha256 of a checkpoint's safetensors headers (every tensor's name, dtype, shape, offsets) and
    its files' sizes and modification times, plus a LoRA adapter's factor file whole: it changes
    when a file is replaced or rewritten, without reading the weights (tens of GB)."""
    digest = hashlib.sha256()
    with open_checkpoint(path, base) as ckpt:
        stored = ckpt.base if isinstance(ckpt, LoraCheckpoint) else ckpt
        for name, info in sorted(stored.tensors.items()):
            digest.update(f"{name}|{info.dtype}|{list(info.shape)}|{info.file.name}|{info.offset}\n".encode())
        for file in sorted({info.file for info in stored.tensors.values()}):
            stat = file.stat()
            digest.update(f"{file.name}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
        if isinstance(ckpt, LoraCheckpoint):
            digest.update(f"lora {ckpt.adapter.fingerprint}\n".encode())
    return digest.hexdigest()


def gene_fingerprint(folder: str | os.PathLike) -> str:
    """sha256 of a gene folder's factors and metadata, whole (they are small)."""
    digest = hashlib.sha256()
    for name in (ADAPTER_WEIGHTS, "safegene.json"):
        digest.update((Path(folder) / name).read_bytes())
    return digest.hexdigest()


@dataclass
class Protected:
    """What ``protect`` did: the record written beside the model, and the output's size."""

    record: dict
    out: Path
    nbytes: int = 0
    seconds: float = 0.0
    coefficients: dict[str, float] | float = 1.0


def protect(model: str | os.PathLike, gene: str | os.PathLike | SafetyGene, out: str | os.PathLike,
            coeffs: dict[str, float] | float | None = None, *, recalibrate: Shots | None = None,
            format: str = "merged", evaluate: list[str] | None = None, base: str | os.PathLike | None = None,
            overwrite: bool = False, progress: bool = False, settings: Settings | None = None) -> Protected:
    """Protects fine-tune ``model`` (a checkpoint or a LoRA adapter folder on ``base``) with
    ``gene`` and writes it to ``out`` (``format``) with its run record: at ``coeffs`` (default 1),
    or at coefficients recalibrated on ``model`` from the ``recalibrate`` shots; with ``evaluate``
    (harmful prompts), the harmful rate before and after is measured and recorded. ``settings``
    gives all of these at once instead."""
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"a checkpoint is a path or a Hub model id, not {type(model).__name__} {model!r}.")
    if settings is None:
        settings = Settings(format=format, coeffs=1.0 if coeffs is None and recalibrate is None else coeffs,
                            recalibrate=recalibrate, evaluate=evaluate)
    start = time.perf_counter()
    gene_folder = gene.folder if isinstance(gene, SafetyGene) else Path(gene)
    if not isinstance(gene, SafetyGene):
        gene = SafetyGene.load(gene)
    timings, evaluation = {}, None
    coeffs = settings.coeffs
    if settings.recalibrate is not None or settings.evaluate:
        coeffs, evaluation = _measure(model, gene, settings, base, timings, progress)
    record = {
        "safegene_fast": __version__,
        "python": platform.python_version(),
        "target": {"path": str(model), "base": str(base) if base is not None else None,
                   "adapter": is_adapter(model), "fingerprint": fingerprint(model, base)},
        "gene": {"path": str(gene_folder) if gene_folder else None,
                 "fingerprint": gene_fingerprint(gene_folder) if gene_folder else None,
                 "provenance": gene.provenance, "selected_layers": gene.selected_layers},
        "settings": settings.as_dict(),
        "coefficients": coeffs,
        "evaluation": evaluation,
        "timings": timings,
    }
    apply(model, gene, out, coeffs, format=settings.format, base=base, overwrite=overwrite,
          extra_files={RUN_RECORD: json.dumps(record, indent=2) + "\n"}, progress=progress)
    nbytes = sum(f.stat().st_size for f in Path(out).iterdir() if f.is_file())
    return Protected(record, Path(out), nbytes, round(time.perf_counter() - start, 3), coeffs)


def _measure(model, gene: SafetyGene, settings: Settings, base, timings: dict, progress: bool):
    """Loads the target once: recalibrates its coefficients, and evaluates it without and with the
    gene at them (patched through the low-rank path, no merged copy)."""
    from safegene_fast.eval.generate import chat, evaluate_loaded, load_model
    from safegene_fast.method import recalibrate as rc
    from safegene_fast.method.patch import GenePatch
    begin = time.perf_counter()
    target, tokenizer = load_model(model, base=base)
    coeffs = settings.coeffs
    if settings.recalibrate is not None:
        r = settings.recalibrate
        shots = rc.FewShot(chat(tokenizer, r.harmful[:r.shots]), r.refusal, chat(tokenizer, r.keep[:r.shots]))
        cal = rc.recalibrate(target, tokenizer, gene, shots, steps=r.steps, lr=r.lr, alpha_max=r.alpha_max,
                             progress=progress)
        coeffs = cal.coefficients
        timings["recalibrate_s"] = round(time.perf_counter() - begin, 3)
    evaluation = None
    if settings.evaluate:
        begin = time.perf_counter()
        before = evaluate_loaded(target, tokenizer, settings.evaluate, max_new_tokens=settings.max_new_tokens)
        with GenePatch(target, gene, per_module=True) as patch:
            patch.set({name: gene.coefficient_for(name, coeffs) for name in patch.keys})
            after = evaluate_loaded(target, tokenizer, settings.evaluate, max_new_tokens=settings.max_new_tokens)
        evaluation = {"harmful_n": before["harmful_n"], "before": before["harmful_rate"],
                      "after": after["harmful_rate"], "how": "greedy answers judged by the keyword refusal judge; "
                      "after: the gene patched onto the loaded target at these coefficients"}
        timings["evaluate_s"] = round(time.perf_counter() - begin, 3)
    return coeffs, evaluation
