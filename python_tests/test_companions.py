"""What travels with a protected model: every file of the target but its weights (license, notice,
use policy, processor, chat template ...), a model card of ours that keeps the target's own below
it, and in an adapter only the modules a coefficient reaches."""

import json
import shutil

import pytest
from huggingface_hub import ModelCard
from safetensors import safe_open
from test_cli import family, gene  # noqa: F401  (fixtures)

from safegene_fast.cli import main

COMPANIONS = {
    "LICENSE": "Apache License 2.0 ...", "NOTICE": "Portions (c) ...", "USE_POLICY.md": "# Acceptable use",
    "preprocessor_config.json": '{"image_size": 8}', "chat_template.json": '{"chat_template": "{{ x }}"}',
    "generation_config.json": '{"do_sample": false}',
}
LEFT_BEHIND = {"pytorch_model.bin": "pickle", "pytorch_model.bin.index.json": "{}", ".hidden": "x",
               "model.gguf": "gguf"}
ORIGINAL_CARD = "---\nlicense: apache-2.0\n---\n# support-bot\n\nAnswers support tickets.\n"


@pytest.fixture
def target(family, tmp_path):  # noqa: F811
    folder = tmp_path / "support-bot"
    shutil.copytree(family["target"], folder)
    for name, text in {**COMPANIONS, **LEFT_BEHIND, "README.md": ORIGINAL_CARD}.items():
        (folder / name).write_text(text)
    return folder


def test_a_merged_model_carries_the_targets_files_and_a_card(target, gene, tmp_path):  # noqa: F811
    out = tmp_path / "protected"
    assert main(["apply", "--model", str(target), "--gene", str(gene), "--coeffs", write_coeffs(tmp_path),
                 "--out", str(out), "--quiet"]) == 0
    for name, text in COMPANIONS.items():
        assert (out / name).read_text() == text
    assert not any((out / name).exists() for name in LEFT_BEHIND)
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == "support-bot" and card.data.library_name == "transformers"
    assert "safegene" in card.data.tags
    assert "protected by a safety gene" in card.text and "`1` | 0.8" in card.text
    assert "## The original model card" in card.text and "Answers support tickets." in card.text
    assert "license: apache-2.0" not in card.text  # the original's metadata is not repeated in the text


def test_an_adapter_leaves_out_modules_no_coefficient_reaches(target, gene, tmp_path):  # noqa: F811
    out = tmp_path / "adapter"
    assert main(["apply", "--model", str(target), "--gene", str(gene), "--coeffs", write_coeffs(tmp_path),
                 "--format", "peft", "--out", str(out), "--quiet"]) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["target_modules"] and all(".layers.1." in m for m in config["target_modules"])
    with safe_open(out / "adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert len(keys) == 2 * len(config["target_modules"]) and all(".layers.1." in k for k in keys)
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "peft" and "lora" in card.data.tags
    assert f"{len(config['target_modules'])} modules in 1 layers (1)" in card.text


def test_resta_carries_the_targets_files(target, family, tmp_path):  # noqa: F811
    out = tmp_path / "resta"
    assert main(["resta", "--model", str(target), "--aligned", str(family["aligned"]), "--degraded",
                 str(family["degraded"]), "--alpha", "0.5", "--out", str(out), "--quiet"]) == 0
    for name, text in COMPANIONS.items():
        assert (out / name).read_text() == text
    assert not any((out / name).exists() for name in LEFT_BEHIND)


def write_coeffs(tmp_path) -> str:
    path = tmp_path / "coeffs.json"
    path.write_text('{"1": 0.8}')
    return str(path)
