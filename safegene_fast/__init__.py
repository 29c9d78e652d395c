"""safegene_fast: extract, compress and re-apply a low-rank safety gene to fine-tuned LLMs.

    import safegene_fast as sg
    gene = sg.extract("aligned/", ["degraded/"], rank=16)        # the streamed passes
    sg.apply("target/", gene, "protected/", {"12": 0.8})
    gene.selection = sg.select_layers(gene, aligned, [degraded], tokenizer, harmful, harmless)
    coefficients = sg.recalibrate(target, tokenizer, gene, shots).coefficients
    sg.evaluate("protected/", harmful_prompts)

The native engine (``safegene_fast._C``) registers the ops under ``torch.ops.safegene_fast``;
``safegene_fast.ops`` wraps them with typed signatures (re-exported here) and
``safegene_fast.reference`` holds the same ops in plain torch.
"""

from safegene_fast._version import __version__
from safegene_fast.eval.generate import evaluate_model as evaluate
from safegene_fast.gene import SafetyGene
from safegene_fast.method.recalibrate import FewShot, Recalibrated, recalibrate
from safegene_fast.method.selection import select_layers
from safegene_fast.ops import (
    build_info,
    delta,
    delta_out,
    lora_factors,
    merge_dense_,
    merge_diff,
    merge_lowrank_,
    rsvd,
    rsvd_lora,
)
from safegene_fast.pipeline import apply, apply_merged, extract, resta

__all__ = [
    "FewShot",
    "Recalibrated",
    "SafetyGene",
    "__version__",
    "apply",
    "apply_merged",
    "build_info",
    "delta",
    "delta_out",
    "evaluate",
    "extract",
    "lora_factors",
    "merge_dense_",
    "merge_diff",
    "merge_lowrank_",
    "recalibrate",
    "resta",
    "rsvd",
    "rsvd_lora",
    "select_layers",
]
