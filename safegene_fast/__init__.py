"""safegene_fast: extract, compress and re-apply a low-rank safety gene to fine-tuned LLMs.

The native engine (``safegene_fast._C``) registers the ops under ``torch.ops.safegene_fast``;
``safegene_fast.ops`` wraps them with typed signatures and ``safegene_fast.reference`` holds the
same ops in plain torch.
"""

__version__ = "0.1.0"

from safegene_fast.ops import (  # noqa: E402
    build_info,
    delta,
    delta_out,
    lora_factors,
    merge_dense_,
    merge_lowrank_,
    rsvd,
    rsvd_lora,
)
from safegene_fast.gene import SafetyGene  # noqa: E402
from safegene_fast.pipeline import apply, apply_merged, extract, resta  # noqa: E402

__all__ = [
    "SafetyGene",
    "__version__",
    "apply",
    "apply_merged",
    "extract",
    "resta",
    "build_info",
    "delta",
    "delta_out",
    "lora_factors",
    "merge_dense_",
    "merge_lowrank_",
    "rsvd",
    "rsvd_lora",
]
