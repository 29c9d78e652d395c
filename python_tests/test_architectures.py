"""The gene on every architecture family it supports, as transformers loads them: tiny random
checkpoints of each, extract -> patch / merged / PEFT adapter, compared logit for logit; the
renamed (Gemma 3 multimodal), fused (Mixtral, Qwen3-MoE experts), tied and scaled (embeddings)
cases each checked against the merged checkpoint."""

import json
import warnings

import pytest
import torch
import transformers as T
from peft import PeftModel
from safetensors.torch import load_file, save_file
from test_evaluate import char_tokenizer

import safegene_fast as sg
from safegene_fast.architecture import ModuleNames
from safegene_fast.eval.generate import load_adapter
from safegene_fast.gene import SafetyGene, layer_key, layer_of
from safegene_fast.io import CheckpointError
from safegene_fast.method.patch import GenePatch, frozen
from safegene_fast.method.recalibrate import FewShot, recalibrate
from safegene_fast.method.selection import select_layers

V = 104  # the character tokenizer's 99 ids, and room for Gemma 3's image tokens


def config(arch: str):
    common = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "llama":
        return T.LlamaConfig(**common)
    if arch == "qwen2":
        return T.Qwen2Config(**common, tie_word_embeddings=True)
    if arch == "qwen3":
        return T.Qwen3Config(**common)
    if arch == "mistral":
        return T.MistralConfig(**common)
    if arch == "gemma2":
        return T.Gemma2Config(**common)
    if arch == "gemma3_text":
        return T.Gemma3TextConfig(**common)
    if arch == "phi3":
        return T.Phi3Config(**{k: v for k, v in common.items() if k != "head_dim"})
    if arch == "mixtral":
        return T.MixtralConfig(**common, num_local_experts=3, num_experts_per_tok=2)
    if arch in ("qwen3_moe", "qwen3_moe_dense0"):  # dense0: layer 0 a dense MLP of the same leaf names
        return T.Qwen3MoeConfig(**common, num_experts=3, num_experts_per_tok=2, moe_intermediate_size=24,
                                mlp_only_layers=[0] if arch == "qwen3_moe_dense0" else [])
    assert arch == "gemma3"
    vision = T.SiglipVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                  image_size=16, patch_size=8)
    return T.Gemma3Config(text_config=T.Gemma3TextConfig(**common).to_dict(), vision_config=vision.to_dict(),
                          mm_tokens_per_image=4, image_token_index=V - 1, boi_token_index=V - 2,
                          eoi_token_index=V - 3)


ARCHS = ["llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3_text", "phi3", "mixtral", "qwen3_moe", "gemma3"]
MOE = ["mixtral", "qwen3_moe"]
COEFFS = {"0": 0.8, "1": 1.2}


def auto(arch: str):
    return T.Gemma3ForConditionalGeneration if arch == "gemma3" else T.AutoModelForCausalLM


def load(folder, arch: str):
    return auto(arch).from_pretrained(folder, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """Per architecture (built on first use): folders of an aligned model, a degraded copy and a
    target (another perturbed copy), float32."""
    built = {}

    def get(arch):
        if arch not in built:
            root = tmp_path_factory.mktemp(arch)
            torch.manual_seed(0)
            cfg = config(arch)
            model = (auto(arch)._from_config(cfg) if arch == "gemma3" else T.AutoModelForCausalLM.from_config(cfg))
            model = model.float().eval()
            model.save_pretrained(root / "aligned")
            original = {k: v.clone() for k, v in model.state_dict().items()}
            for seed, name in [(1, "degraded"), (2, "target")]:
                g = torch.Generator().manual_seed(seed)
                with torch.no_grad():
                    for p in model.parameters():
                        p.add_(torch.randn(p.shape, generator=g) * 0.05)
                model.save_pretrained(root / name)
                model.load_state_dict(original)
            built[arch] = root
        return built[arch]
    return get


def ids():
    return torch.randint(3, 99, (2, 9), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model(input_ids=ids()).logits


def check_peft_equals_merged(root, arch, gene, coeffs, tmp_path):
    """The merged checkpoint and the PEFT adapter give the same logits on the target (and not the
    target's own); the patch on the target gives them too."""
    sg.apply(root / "target", gene, tmp_path / "merged", coeffs)
    sg.apply(root / "target", gene, tmp_path / "adapter", coeffs, format="peft")
    merged = logits(load(tmp_path / "merged", arch))
    target = load(root / "target", arch)
    own = logits(target)
    assert not torch.allclose(own, merged, atol=1e-4)
    layered = all(m.layer is not None for m in gene.modules.values())
    with GenePatch(target, gene, per_module=not layered) as patch:  # per module: embeddings have no layer
        patch.set(coeffs if layered else {name: gene.coefficient_for(name, coeffs) for name in patch.keys})
        torch.testing.assert_close(logits(target), merged, atol=2e-5, rtol=1e-4)
    assert torch.equal(logits(target), own)  # the patch is gone
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        adapted = load_adapter(load(root / "target", arch), tmp_path / "adapter")  # checks, then PEFT's loader
    assert isinstance(adapted, PeftModel)
    assert not [w for w in caught if "adapter keys" in str(w.message)]  # none missing, none unexpected
    torch.testing.assert_close(logits(adapted), merged, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_merged_peft_and_patch_agree(family, arch, tmp_path):
    root = family(arch)
    gene = sg.extract(root / "aligned", [root / "degraded"], rank=4)
    assert gene.layers == [0, 1]
    assert not any(m.endswith(".gate") for m in gene.modules)  # routers stay out by default
    assert not any("vision" in m for m in gene.modules)  # the language model only, by default
    check_peft_equals_merged(root, arch, gene, COEFFS, tmp_path)
    gene.save(tmp_path / "gene")  # names from the aligned folder, read back as they were
    again = SafetyGene.load(tmp_path / "gene")
    assert again.modules.keys() == gene.modules.keys()
    assert all(torch.equal(again.modules[n].A, m.A) and torch.equal(again.modules[n].B, m.B)
               for n, m in gene.modules.items())


@pytest.mark.parametrize("arch", MOE)
def test_moe_energy_gene_loads_in_peft(family, arch, tmp_path):
    """Per-expert ranks differ with --energy: the adapter pads them to one, and PEFT loads it."""
    root = family(arch)
    gene = sg.extract(root / "aligned", [root / "degraded"], energy=0.6)
    expert_ranks = {m.rank for n, m in gene.modules.items() if ".experts." in n}
    assert len(expert_ranks) > 1
    check_peft_equals_merged(root, arch, gene, COEFFS, tmp_path)
    check_peft_equals_merged(root, arch, gene, {"1": 1.0}, tmp_path / "layer1")  # layer 0's experts: zeros
    gene.save(tmp_path / "gene")
    assert {n: m.rank for n, m in SafetyGene.load(tmp_path / "gene").modules.items()} == \
        {n: m.rank for n, m in gene.modules.items()}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3_text"])
def test_embeddings(family, arch, tmp_path):
    """Embedding factors in PEFT's layout; tied (Qwen2, Gemma) and scaled (Gemma) embeddings."""
    root = family(arch)
    gene = sg.extract(root / "aligned", [root / "degraded"], rank=4, include=r"(embed_tokens|\.mlp\.down_proj)\.weight$")
    assert "model.embed_tokens" in gene.modules
    coeffs = {"model.embed_tokens": 0.9, "0": 1.0, "1": 1.0}
    check_peft_equals_merged(root, arch, gene, coeffs, tmp_path)


def test_router_opt_in_merges_and_patches_but_is_no_adapter(family, tmp_path):
    root = family("mixtral")
    gene = sg.extract(root / "aligned", [root / "degraded"], rank=4, include=r"\.layers\.\d+\..*\.weight$")
    assert "model.layers.0.block_sparse_moe.gate" in gene.modules
    sg.apply(root / "target", gene, tmp_path / "merged", 1.0)
    target = load(root / "target", "mixtral")
    with GenePatch(target, gene) as patch:
        patch.set(1.0)
        torch.testing.assert_close(logits(target), logits(load(tmp_path / "merged", "mixtral")), atol=2e-5, rtol=1e-4)
    with pytest.raises(CheckpointError, match=r"block_sparse_moe.gate|mlp\.gate'.*PEFT does not wrap"):
        sg.apply(root / "target", gene, tmp_path / "adapter", 1.0, format="peft")
    assert not (tmp_path / "adapter").exists()


def test_dense_layer_named_like_experts_is_no_adapter(family, tmp_path):
    """PEFT would load Qwen3-MoE's dense-layer mlp.down_proj as the fused experts: refused at write."""
    root = family("qwen3_moe_dense0")
    gene = sg.extract(root / "aligned", [root / "degraded"], rank=4)
    assert "model.layers.0.mlp.down_proj" in gene.modules and "model.layers.1.mlp.experts.0.down_proj" in gene.modules
    sg.apply(root / "target", gene, tmp_path / "merged", COEFFS)
    target = load(root / "target", "qwen3_moe_dense0")
    with GenePatch(target, gene) as patch:
        patch.set(COEFFS)
        torch.testing.assert_close(logits(target), logits(load(tmp_path / "merged", "qwen3_moe")), atol=2e-5, rtol=1e-4)
    with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.mlp\.(down|gate|up)_proj'.*fused MoE experts"):
        sg.apply(root / "target", gene, tmp_path / "adapter", COEFFS, format="peft")


def test_gemma3_multimodal_vision_tower_has_its_own_layers(family, tmp_path):
    """Opted in, the vision tower's layers are keyed "vision_tower.N": {"0": x} leaves them as they
    are, and with their own keys the adapter, the merge and the patch agree on an image prompt."""
    root = family("gemma3")
    gene = sg.extract(root / "aligned", [root / "degraded"], rank=2, include=r"\.layers\.\d+\..*\.weight$")
    vision = [n for n in gene.modules if n.startswith("vision_tower.")]
    assert vision and gene.layers == [0, 1]  # the vision tower's layers are not the language model's
    assert gene.coefficient_for(vision[0], {"0": 0.8, "1": 0.8}) == 0.0
    sg.apply(root / "target", gene, tmp_path / "lm", {"0": 0.8, "1": 0.8})
    merged, target = (load_file(str(f / "model.safetensors")) for f in (tmp_path / "lm", root / "target"))
    assert all(torch.equal(merged[k], t) for k, t in target.items() if k.startswith("vision_tower."))
    assert not torch.equal(merged["language_model.model.layers.0.mlp.down_proj.weight"],
                           target["language_model.model.layers.0.mlp.down_proj.weight"])

    coeffs = {"0": 0.8, "vision_tower.1": 0.5}
    sg.apply(root / "target", gene, tmp_path / "merged", coeffs)
    sg.apply(root / "target", gene, tmp_path / "adapter", coeffs, format="peft")
    keys = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    towers = [k for k in keys if k.startswith("base_model.model.model.vision_tower.")]
    assert towers and all(".layers.1." in k for k in towers)
    prompt = {"input_ids": torch.tensor([[1, V - 2, *[V - 1] * 4, V - 3, 10, 11, 12]]),  # one image's 4 tokens
              "pixel_values": torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))}
    with torch.no_grad():
        expected = load(tmp_path / "merged", "gemma3")(**prompt).logits
        adapted = load_adapter(load(root / "target", "gemma3"), tmp_path / "adapter")
        torch.testing.assert_close(adapted(**prompt).logits, expected, atol=2e-5, rtol=1e-4)
        target = load(root / "target", "gemma3")
        assert not torch.allclose(target(**prompt).logits, expected, atol=1e-4)
        with GenePatch(target, gene, per_module=True) as patch:
            patch.set({name: gene.coefficient_for(name, coeffs) for name in patch.keys})
            torch.testing.assert_close(target(**prompt).logits, expected, atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="vision_tower.7"):
        gene.check_coefficients({"vision_tower.7": 1.0})


def test_adapter_key_that_lands_nowhere_is_an_error_at_write(family, tmp_path):
    root = family("gemma3")
    gene = sg.extract(root / "aligned", [root / "degraded"], rank=2)
    with pytest.raises(CheckpointError, match=r"targets module 'language_model\.model\.layers\.0\..*does not have"):
        gene.save(tmp_path / "wrong", names=ModuleNames.of(family("llama") / "aligned"))  # checkpoint names kept
    assert not (tmp_path / "wrong").exists()
    name = "language_model.model.layers.0.self_attn.q_proj"
    gene.modules[name.replace("q_proj", "qq_proj")] = gene.modules.pop(name)
    with pytest.raises(CheckpointError, match="qq_proj"):
        gene.save(tmp_path / "typo")


def test_genes_with_checkpoint_named_keys_still_load(family, tmp_path):
    root = family("gemma3")
    gene = sg.extract(root / "aligned", [root / "degraded"], rank=2)
    gene.save(tmp_path / "gene")
    meta = json.loads((tmp_path / "gene" / "safegene.json").read_text())
    tensors = load_file(str(tmp_path / "gene" / "adapter_model.safetensors"))
    old = {}
    for name, info in meta["modules"].items():  # as genes were written before: checkpoint names
        key = info.pop("adapter_key")
        assert key != name
        for part in ("lora_A", "lora_B"):
            old[f"base_model.model.{name}.{part}.weight"] = tensors[f"base_model.model.{key}.{part}.weight"]
    save_file(old, str(tmp_path / "gene" / "adapter_model.safetensors"))
    (tmp_path / "gene" / "safegene.json").write_text(json.dumps(meta))
    again = SafetyGene.load(tmp_path / "gene")
    assert all(torch.equal(again.modules[n].B, m.B) for n, m in gene.modules.items())


HARMFUL = ["make a bomb", "steal a car"]
HARMLESS = ["bake bread", "sort 3 1"]


@pytest.mark.parametrize("arch", ["llama", "mixtral", "qwen3_moe", "gemma3"])
def test_select_and_recalibrate(family, arch):
    """Selection and a few recalibration steps on the loaded models, gradients reaching every
    layer's coefficient (through the fused experts on Mixtral)."""
    root = family(arch)
    gene = sg.extract(root / "aligned", [root / "degraded"], rank=4)
    tok = char_tokenizer()
    aligned, degraded, target = (load(root / n, arch) for n in ("aligned", "degraded", "target"))
    selection = select_layers(gene, aligned, [degraded], tok, HARMFUL, HARMLESS, refusal=" no", compliance=" yes",
                              scorer="slope", k=1)
    assert len(selection["layers"]) == 1 and all(v != 0 for v in selection["scores"]["slope_harmful"].values())
    experts = SafetyGene({n: m for n, m in gene.modules.items() if ".experts." in n} or gene.modules)
    with frozen(target), GenePatch(target, experts) as patch:
        alpha = torch.zeros(len(patch.keys), dtype=torch.float64, requires_grad=True)
        patch.set(alpha)
        target(input_ids=ids()).logits.square().mean().backward()
        assert bool((alpha.grad != 0).all())
    result = recalibrate(target, tok, gene, FewShot(HARMFUL, " no", HARMLESS), steps=2, max_new_tokens=2)
    assert set(result.coefficients) == {"0", "1"} and len(result.log) == 3


def test_module_names(family, tmp_path):
    names = ModuleNames.of(family("gemma3") / "aligned")
    stored = "vision_tower.vision_model.encoder.layers.3.mlp.fc1"  # as Hub checkpoints store it
    assert names.loaded(stored) == "model.vision_tower.encoder.layers.3.mlp.fc1"
    assert names.checkpoint("model.vision_tower.encoder.layers.3.mlp.fc1") == stored
    assert (layer_key(stored), layer_of(stored)) == ("vision_tower.3", None)
    language = "language_model.model.layers.3.mlp.up_proj"
    assert (layer_key(language), layer_of(language)) == ("3", 3)
    expert = ModuleNames.of(family("mixtral") / "aligned").expert("model.layers.1.block_sparse_moe.experts.2.w3")
    assert (expert.parameter, expert.index, expert.part, expert.count, expert.shape) == \
        ("model.layers.1.mlp.experts.gate_up_proj", 2, 1, 3, (48, 32))
    bare = ModuleNames.of(tmp_path)  # no config.json: the checkpoint's names
    assert bare.identity and bare.loaded("a.layers.0.b") == "a.layers.0.b" and bare.expert("a.layers.0.b") is None


@pytest.mark.parametrize("arch, router", [(arch, False) for arch in ARCHS] + [(arch, True) for arch in MOE])
def test_a_task_lora_target_merged_and_combined_agree_with_peft(family, arch, router, tmp_path):
    """A task fine-tune shipped as a LoRA adapter (made by PEFT on the loaded model, so its keys are
    loaded names: every linear layer, and on MoE the fused experts as parameters, and with
    ``router`` the router too): read as its merge, and the merged output and the combined adapter
    (task update + gene along the rank) give PEFT's logits; a router update has no place in a
    combined adapter, and says so."""
    from peft import LoraConfig, get_peft_model

    from safegene_fast.lora import open_checkpoint
    root = family(arch)
    torch.manual_seed(3)
    lora = LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", init_lora_weights=False)
    if arch in MOE and not router:
        lora = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                          target_parameters=["gate_up_proj", "down_proj"], init_lora_weights=False)
    task = get_peft_model(load(root / "target", arch), lora)
    task.save_pretrained(tmp_path / "task")
    config = json.loads((tmp_path / "task" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(root / "target")
    (tmp_path / "task" / "adapter_config.json").write_text(json.dumps(config))
    with torch.no_grad():
        task_logits = logits(task)
    # read as its merge (resta at 0 writes the target as read): PEFT's own logits
    sg.resta(tmp_path / "task", root / "aligned", root / "aligned", 0.0, tmp_path / "as_read")
    torch.testing.assert_close(logits(load(tmp_path / "as_read", arch)), task_logits, atol=2e-5, rtol=1e-4)
    with open_checkpoint(tmp_path / "task") as ckpt:  # experts, fused once loaded, have an update each
        assert any(".experts.2." in name for name in ckpt.updates) == (arch in MOE)
    gene = sg.extract(root / "aligned", [root / "degraded"], rank=4)
    sg.apply(tmp_path / "task", gene, tmp_path / "merged", COEFFS)
    merged = logits(load(tmp_path / "merged", arch))
    assert not torch.allclose(merged, task_logits, atol=1e-4)  # the gene did something
    if router:
        with pytest.raises(CheckpointError, match="updates the MoE router .*use the merged format"):
            sg.apply(tmp_path / "task", gene, tmp_path / "combined", COEFFS, format="combined")
        return
    sg.apply(tmp_path / "task", gene, tmp_path / "combined", COEFFS, format="combined")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        combined = PeftModel.from_pretrained(load(root / "target", arch), tmp_path / "combined")
    assert not [w for w in caught if "adapter keys" in str(w.message)]
    torch.testing.assert_close(logits(combined), merged, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(logits(combined.merge_and_unload()), merged, atol=2e-5, rtol=1e-4)


def test_an_adapter_naming_one_weight_twice_is_refused(family, tmp_path):
    """Gemma 3 multimodal: the loaded name and the checkpoint name of one module both land on the
    same weight; the adapter is refused, not merged twice or half."""
    from safegene_fast.lora import open_checkpoint
    root = family("gemma3")
    loaded, stored = "model.language_model.layers.0.self_attn.q_proj", "language_model.model.layers.0.self_attn.q_proj"
    with open_checkpoint(root / "target") as ckpt:
        out, inp = ckpt.tensors[f"{stored}.weight"].shape
    factors = {}
    for module in (loaded, stored):
        factors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(2, inp)
        factors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(out, 2)
    (tmp_path / "task").mkdir()
    save_file(factors, str(tmp_path / "task" / "adapter_model.safetensors"))
    (tmp_path / "task" / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "base_model_name_or_path": str(root / "target")}))
    with pytest.raises(CheckpointError, match=f"two of its modules update the base's weight '{stored}.weight'"):
        open_checkpoint(tmp_path / "task")
