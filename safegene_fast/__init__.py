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

__all__ = [
    "__version__",
    "build_info",
    "delta",
    "delta_out",
    "lora_factors",
    "merge_dense_",
    "merge_lowrank_",
    "rsvd",
    "rsvd_lora",
]
