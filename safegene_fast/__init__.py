"""safegene_fast: extract, compress and re-apply a low-rank safety gene to fine-tuned LLMs.

    import safegene_fast as sg
    gene = sg.extract("aligned/", ["degraded/"], rank=16)        # the streamed passes
    sg.apply("target/", gene, "protected/", {"12": 0.8})
    gene.selection = sg.select_layers(gene, aligned, [degraded], tokenizer, harmful, harmless)
    coefficients = sg.recalibrate(target, tokenizer, gene, shots).coefficients
    sg.evaluate("protected/", harmful_prompts)
    sg.protect("target/", "gene/", "protected/", 0.8)           # one fine-tune, with its run record
    sg.run_batch("recipe.yaml", executor="local", workers=2)    # a fleet of them

The native engine (``safegene_fast._C``) registers the ops under ``torch.ops.safegene_fast`` when
``safegene_fast.ops`` is imported (names here load on first use, so ``import safegene_fast`` alone
stays light); ``safegene_fast.ops`` wraps them with typed signatures (re-exported here) and
``safegene_fast.reference`` holds the same ops in plain torch.
"""

import importlib

from safegene_fast._version import __version__

# Public name -> (module, attribute), imported on first use (PEP 562), not here: torch and the
# native engine take seconds to load, and the ``safegene`` command imports this package before its
# main() can handle a Ctrl-C.
_EXPORTS = {
    "FewShot": ("safegene_fast.method.recalibrate", "FewShot"),
    "Recalibrated": ("safegene_fast.method.recalibrate", "Recalibrated"),
    "SafetyGene": ("safegene_fast.gene", "SafetyGene"),
    "Shots": ("safegene_fast.fleet.protect", "Shots"),
    "apply": ("safegene_fast.pipeline", "apply"),
    "apply_merged": ("safegene_fast.pipeline", "apply_merged"),
    "build_info": ("safegene_fast.ops", "build_info"),
    "delta": ("safegene_fast.ops", "delta"),
    "delta_out": ("safegene_fast.ops", "delta_out"),
    "evaluate": ("safegene_fast.eval.generate", "evaluate_model"),
    "extract": ("safegene_fast.pipeline", "extract"),
    "lora_factors": ("safegene_fast.ops", "lora_factors"),
    "merge_dense_": ("safegene_fast.ops", "merge_dense_"),
    "merge_diff": ("safegene_fast.ops", "merge_diff"),
    "merge_lowrank_": ("safegene_fast.ops", "merge_lowrank_"),
    "protect": ("safegene_fast.fleet.protect", "protect"),
    "recalibrate": ("safegene_fast.method.recalibrate", "recalibrate"),
    "resta": ("safegene_fast.pipeline", "resta"),
    "rsvd": ("safegene_fast.ops", "rsvd"),
    "rsvd_lora": ("safegene_fast.ops", "rsvd_lora"),
    "run_batch": ("safegene_fast.fleet.batch", "run_batch"),
    "select_layers": ("safegene_fast.method.selection", "select_layers"),
}

__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str):
    if name in _EXPORTS:
        module, attribute = _EXPORTS[name]
        value = getattr(importlib.import_module(module), attribute)
        globals()[name] = value  # later look-ups skip this function
        return value
    if not name.startswith("__"):  # a submodule not imported yet (``sg.ops``); never runs __main__
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":  # the submodule exists but needs something missing
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
