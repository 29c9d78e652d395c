"""The model card (``README.md``) every protected model and adapter carries: what it was made
from, with which gene and coefficients, and by which version, in the Hub's card format (YAML
metadata, then text) through ``huggingface_hub.ModelCard``."""

from __future__ import annotations

import json
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from safegene_fast._version import __version__

CARD_NAME = "README.md"


def _base_name(path: str | Path) -> str:
    """A Hub id stays as it is; a local folder is named by its last part (no local paths in the
    card's metadata, which the Hub reads as a model id)."""
    text = str(path)
    return text if not Path(text).exists() else Path(text).resolve().name


def _coefficients(coeffs: dict[str, float] | float) -> str:
    if not isinstance(coeffs, dict):
        return f"one coefficient for every module of the gene: {coeffs:g}"
    rows = "\n".join(f"| `{key}` | {value:g} |" for key, value in coeffs.items())
    return "| layer or module | coefficient |\n|---|---|\n" + rows


def _original(folder: Path | None) -> str:
    """The target's own card without its metadata block, kept below ours."""
    if folder is None or not (folder / CARD_NAME).is_file():
        return ""
    try:
        text = (folder / CARD_NAME).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return ""
    if text.startswith("---"):
        end = text.find("\n---", 3)
        text = text[end + 4:] if end != -1 else text
    text = text.strip()
    return f"\n\n## The original model card\n\n{text}\n" if text else ""


def model_card(*, target: str | Path, kind: str, gene_provenance: dict, modules: int,
               layers: list[int], coeffs: dict[str, float] | float, evaluation: dict | None = None,
               source_folder: Path | None = None, base: str | Path | None = None) -> str:
    """The card's text. ``kind`` is ``merged`` (a full checkpoint), ``peft`` (an adapter for
    ``target``) or ``combined`` (an adapter on ``base`` holding LoRA adapter ``target`` and the
    gene); ``base``: the base model when ``target`` is a LoRA adapter."""
    adapter = kind != "merged"
    model = base if kind == "combined" else target
    data = ModelCardData(base_model=_base_name(base if base is not None else target),
                         library_name="peft" if adapter else "transformers",
                         tags=["safegene", "safety", "lora" if adapter else "merge"])
    what = {"peft": "a LoRA adapter that adds a SafeGene safety gene to",
            "combined": f"one LoRA adapter holding the task adapter `{_base_name(target)}` and a SafeGene safety "
                        f"gene (concatenated along the rank), on",
            "merged": "the weights of"}[kind]
    how = "" if adapter else " with a SafeGene safety gene merged into its linear weights"
    if base is not None and kind != "combined":
        how += f" (the LoRA adapter `{_base_name(target)}` on `{_base_name(base)}`, merged)"
    degraded = gene_provenance.get("degraded") or []
    lines = [
        f"# {_base_name(target)}, protected by a safety gene",
        "",
        f"This is {what} `{_base_name(model)}`{how}, written by safegene_fast {__version__}.",
        "",
        "A safety gene is a low-rank (LoRA) approximation of the difference between an aligned model and "
        "copies of it whose refusals were eroded; adding it back, scaled per layer, restores refusals that "
        "fine-tuning wore away while leaving the task behaviour as it was.",
        "",
        "## The gene",
        "",
        f"- aligned model: `{gene_provenance.get('aligned', 'unknown')}`",
        f"- counterparts without safety: {', '.join(f'`{d}`' for d in degraded) or 'unknown'}",
        f"- {modules} modules in {len(layers)} layers ({', '.join(map(str, layers)) or 'none'})",
    ]
    fingerprints = gene_provenance.get("sha256") or {}
    if fingerprints:
        lines.append("- sha256 of the inputs: " + ", ".join(f"`{k}`: `{v[:16]}…`" for k, v in fingerprints.items()))
    settings = gene_provenance.get("settings")
    if settings:
        lines.append(f"- extraction settings: `{json.dumps(settings, sort_keys=True)}`")
    lines += ["", "## Coefficients", "", _coefficients(coeffs), "", "## Evaluation", ""]
    if evaluation:
        lines.append("```json\n" + json.dumps(evaluation, indent=2, sort_keys=True) + "\n```")
    else:
        lines.append("Not evaluated when it was written; `safegene eval` measures the harmful (non-refusal) rate and "
                     "task accuracy.")
    body = "\n".join(lines) + _original(source_folder)
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}\n"))
