"""eval / select / recalibrate on inputs that do not fit: a gene, adapter or degraded model of
another family, model folders without a tokenizer, a config or weights, prompts past the context.
Each ends with one sentence naming the file and the mismatch, and writes nothing."""

import json
import shutil

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from safegene_fast.cli import main
from safegene_fast.eval.generate import load_tokenizer
from safegene_fast.gene import SafetyGene

TOKENIZER = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def error_line(capsys, argv) -> str:
    """Runs a command that must fail: exit status 1 and one line on stderr, which is returned."""
    assert main(argv + ["--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("safegene: error: "), err
    return err[0]


def llama(folder, tiny_family, *, hidden: int, layers: int, seed: int):
    """A random Llama with the tiny family's tokenizer and vocabulary, of another shape or depth."""
    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(vocab_size=948, hidden_size=hidden, intermediate_size=176, num_hidden_layers=layers,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                 tie_word_embeddings=False, pad_token_id=0, eos_token_id=2,
                                 bos_token_id=None)).save_pretrained(folder)
    for name in TOKENIZER:
        shutil.copy(tiny_family.member("target") / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def other(tiny_family, tmp_path_factory):
    """Models, genes and an adapter of two other families: narrower (hidden 32) and deeper (6 layers)."""
    root = tmp_path_factory.mktemp("other")
    out = {}
    for name, hidden, layers in (("narrow", 32, 4), ("deep", 64, 6)):
        aligned = llama(root / f"{name}-aligned", tiny_family, hidden=hidden, layers=layers, seed=1)
        degraded = llama(root / f"{name}-degraded", tiny_family, hidden=hidden, layers=layers, seed=2)
        assert main(["extract", "--aligned", str(aligned), "--degraded", str(degraded), "--rank", "2",
                     "--out", str(root / f"{name}-gene"), "--quiet"]) == 0
        out[name], out[f"{name}-gene"] = aligned, root / f"{name}-gene"
    assert main(["apply", "--model", str(out["narrow"]), "--gene", str(out["narrow-gene"]), "--alpha", "1",
                 "--format", "peft", "--out", str(root / "narrow-adapter"), "--quiet"]) == 0
    out["narrow-adapter"] = root / "narrow-adapter"
    return out


@pytest.fixture(scope="module")
def gene(tiny_family, tmp_path_factory):
    out = tmp_path_factory.mktemp("gene") / "g"
    assert main(["extract", "--aligned", str(tiny_family.member("aligned")), "--degraded",
                 str(tiny_family.member("dealigned")), "--rank", "2", "--out", str(out), "--quiet"]) == 0
    return out


def variant(tiny_family, folder, drop=(), config=None, member="target"):
    """A copy of a family member without the files in ``drop``, or with another config.json."""
    shutil.copytree(tiny_family.member(member), folder)
    for name in drop:
        (folder / name).unlink()
    if config is not None:
        (folder / "config.json").write_text(config)
    return folder


def recalibrate(model, gene, out, *extra):
    return ["recalibrate", "--model", str(model), "--gene", str(gene), "--family", "tiny", "--out", str(out),
            "--shots", "2", "--steps", "1", *extra]


def select(gene, aligned, degraded, out):
    return ["select", "--gene", str(gene), "--aligned", str(aligned), "--degraded", str(degraded), "--family", "tiny",
            "--layers", "1", "--shots", "2", "--out", str(out)]


def test_a_gene_of_another_family_is_refused_before_any_pass(tiny_family, other, capsys, tmp_path):
    """Its factors do not multiply the model's activations: named up front, not as a matmul error."""
    for argv, model in ((recalibrate(tiny_family.member("target"), other["narrow-gene"], tmp_path / "c.json"), "target"),
                        (select(other["narrow-gene"], tiny_family.member("aligned"), tiny_family.member("dealigned"),
                                tmp_path / "g"), "aligned")):
        line = error_line(capsys, argv)
        assert f"{other['narrow-gene']}: the gene's factors for module 'model.layers.0." in line
        assert "make a [32, " in line and f"{tiny_family.member(model)} has a [64, " in line
        assert "must come from this model's family" in line
    assert list(tmp_path.iterdir()) == []


def test_a_gene_with_layers_the_model_lacks(tiny_family, other, gene, capsys, tmp_path):
    deep = other["deep-gene"]
    for argv in (recalibrate(tiny_family.member("target"), deep, tmp_path / "c.json"),
                 select(deep, tiny_family.member("aligned"), tiny_family.member("dealigned"), tmp_path / "g")):
        line = error_line(capsys, argv)
        assert f"{deep}: the gene targets module 'model.layers.4." in line and "does not have" in line
    # a selection naming a layer the gene has no factors for (a hand-edited safegene.json)
    edited = tmp_path / "edited"
    shutil.copytree(gene, edited)
    meta = json.loads((edited / "safegene.json").read_text())
    meta["selection"] = {"layers": [7]}
    (edited / "safegene.json").write_text(json.dumps(meta))
    assert SafetyGene.load(edited).selected_layers == [7]
    line = error_line(capsys, recalibrate(tiny_family.member("target"), edited, tmp_path / "c.json"))
    assert f"{edited}: layer 7 is not one of the gene's layers (0, 1, 2, 3)." in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edited"]


def test_a_degraded_model_of_another_family(tiny_family, other, gene, capsys, tmp_path):
    for name, problem in (("narrow", "parameter 'model.embed_tokens.weight' is [948, 32] here but [948, 64] in "
                                     f"the aligned model {tiny_family.member('aligned')}"),
                          ("deep", "has parameter 'model.layers.4.")):
        line = error_line(capsys, select(gene, tiny_family.member("aligned"), other[name], tmp_path / "g"))
        assert line.startswith(f"safegene: error: {other[name]}: {problem}") and "aligned model's family" in line
    assert list(tmp_path.iterdir()) == []


def test_an_adapter_of_another_family(tiny_family, other, capsys):
    line = error_line(capsys, ["eval", "--model", str(tiny_family.member("target")), "--adapter",
                               str(other["narrow-adapter"]), "--family", "tiny", "--limit", "2"])
    assert f"{other['narrow-adapter']}: the adapter's factors for module 'model.layers.0." in line
    assert "make a [32, " in line and f"{tiny_family.member('target')} has a [64, " in line


def test_model_folders_that_cannot_be_loaded(tiny_family, capsys, tmp_path):
    config = json.loads((tiny_family.member("target") / "config.json").read_text())
    cases = {
        "no-tokenizer": (dict(drop=TOKENIZER), "{}: has no tokenizer (tokenizer.json, "),
        "no-weights": (dict(drop=["model.safetensors"]), "{}: has no weights (model.safetensors, "),
        "not-json": (dict(config="{oops"), "{}/config.json: cannot read the model's configuration ("),
        "unknown": (dict(config=json.dumps({**config, "model_type": "frobnicator"})),
                    "{}/config.json: model type 'frobnicator' is not one transformers "),
        "no-type": (dict(config=json.dumps({k: v for k, v in config.items() if k != "model_type"})),
                    "{}/config.json: names no model_type"),
    }
    for name, (change, expected) in cases.items():
        folder = variant(tiny_family, tmp_path / name, **change)
        line = error_line(capsys, ["eval", "--model", str(folder), "--family", "tiny", "--limit", "2"])
        assert line.startswith("safegene: error: " + expected.format(folder)), line


def test_a_truncated_weights_file(tiny_family, gene, capsys, tmp_path):
    folder = variant(tiny_family, tmp_path / "m")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    line = error_line(capsys, recalibrate(folder, gene, tmp_path / "c.json"))
    assert line.startswith(f"safegene: error: {folder}: transformers cannot load the model (")
    assert not (tmp_path / "c.json").exists()


def test_a_tokenizer_without_a_padding_token_pads_with_end_of_sequence(tiny_family, tmp_path):
    folder = variant(tiny_family, tmp_path / "m")
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    del settings["pad_token"]
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    serialized = json.loads((folder / "tokenizer.json").read_text())
    serialized["padding"] = None
    (folder / "tokenizer.json").write_text(json.dumps(serialized))
    tokenizer = load_tokenizer(folder)
    assert tokenizer.pad_token == tokenizer.eos_token == "<eos>"


def test_a_degraded_model_needs_no_tokenizer(tiny_family, gene, capsys, tmp_path):
    """select reads every prompt with the aligned model's tokenizer."""
    degraded = variant(tiny_family, tmp_path / "d", drop=TOKENIZER, member="dealigned")
    assert main(select(gene, tiny_family.member("aligned"), degraded, tmp_path / "g") + ["--quiet"]) == 0
    assert SafetyGene.load(tmp_path / "g").selected_layers


def test_prompts_longer_than_the_context(tiny_family, gene, capsys, tmp_path):
    """The family's models have 128 positions; a model with learned positions fails past them."""
    prompts = tmp_path / "long.txt"
    prompts.write_text("how to pick a lock\n" + " ".join(["how to pick a lock"] * 40) + "\n")
    target, aligned = tiny_family.member("target"), tiny_family.member("aligned")
    for argv, model in ((["eval", "--model", str(target), "--harmful", str(prompts)], target),
                        (recalibrate(target, gene, tmp_path / "c.json", "--harmful", str(prompts)), target),
                        (select(gene, aligned, tiny_family.member("dealigned"), tmp_path / "g")
                         + ["--harmful", str(prompts), "--refusal", "i am sorry"], aligned)):
        line = error_line(capsys, argv)
        assert line.startswith(f"safegene: error: {prompts}: prompt 2 is ")
        assert line.endswith(f"exceeds the context of {model} (128 tokens).")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["long.txt"]
