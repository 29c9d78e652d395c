"""LoRA adapters as inputs: a task fine-tune given as a PEFT LoRA adapter on its base.

A tiny Llama base written by transformers, task adapters trained-looking (random factors) made
and saved by PEFT itself, and every pass (extract, apply in the three formats, resta) checked
against PEFT's own ``merge_and_unload`` and a float64 reference; then the inputs a careless
user gives (an adapter for another model, no base, DoRA, pickles, outputs over the base).
"""

from __future__ import annotations

import json
import re
import shutil
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from test_interop import TOKENS, base_weights, llama_config, perturbed, save_model
from transformers import AutoModelForCausalLM

import safegene_fast
from safegene_fast.cli import main
from safegene_fast.io import CheckpointError
from safegene_fast.lora import LoraCheckpoint, open_checkpoint

TARGETS = ["q_proj", "v_proj", "down_proj"]


def task_adapter(base, folder, *, seed=1, r=4, targets=TARGETS, **config):
    """A PEFT LoRA adapter on ``base`` with random (non-zero) factors, saved by PEFT."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    lora = LoraConfig(r=r, lora_alpha=config.pop("lora_alpha", 8), target_modules=targets,
                      init_lora_weights=False, **config)
    peft_model = get_peft_model(model, lora)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.mul_(0.2)  # a fine-tune-sized update, not a rewrite
    peft_model.save_pretrained(folder)
    config_file = folder / "adapter_config.json"
    saved = json.loads(config_file.read_text())
    saved["base_model_name_or_path"] = str(base)
    config_file.write_text(json.dumps(saved))
    return folder


def peft_merged(base, adapter, dtype=torch.float32) -> dict[str, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def checkpoint(folder) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


def logits(folder, adapter=None, dtype=torch.float32):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    if adapter is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = PeftModel.from_pretrained(model, adapter)
    with torch.no_grad():
        return model.eval()(TOKENS).logits


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    config = llama_config(tied=False)
    weights = base_weights(config, seed=0)
    base = save_model(config, weights, torch.float32, root / "base")
    (base / "LICENSE").write_text("base license")
    degraded = save_model(config, perturbed(weights, seed=2, noise=0.01, low_rank=0.2), torch.float32,
                          root / "degraded")
    gene = root / "gene"
    safegene_fast.extract(base, [degraded], rank=4).save(gene)
    task = task_adapter(base, root / "task")
    (task / "tokenizer_config.json").write_text("{}")  # a fine-tune's own companion file
    return {"root": root, "base": base, "degraded": degraded, "gene": gene, "task": task}


def test_an_adapter_reads_as_its_peft_merge(lora):
    expected = peft_merged(lora["base"], lora["task"])
    with open_checkpoint(lora["task"]) as ckpt:
        assert isinstance(ckpt, LoraCheckpoint) and len(ckpt.updates) == 3 * len(TARGETS)
        for name in ckpt.tensors:
            torch.testing.assert_close(ckpt.read(name), expected[name], rtol=2e-6, atol=2e-6)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_piece_of_an_adapted_tensor_is_that_piece_of_the_whole(lora, data):
    """Pieces need not be whole rows (resta reads fixed-size pieces): every [start, start + count)
    equals the same slice of the whole merged tensor, read fresh or into a buffer."""
    with open_checkpoint(lora["task"]) as ckpt:
        name = data.draw(st.sampled_from(sorted(ckpt.updates)))
        whole = ckpt.read(name).reshape(-1).clone()
        start = data.draw(st.integers(0, whole.numel()))
        count = data.draw(st.integers(0, whole.numel() - start))
        assert torch.equal(ckpt.read(name, start=start, count=count), whole[start:start + count])
        buffer = torch.full((count * 4 + 8,), 0xAB, dtype=torch.uint8)
        assert torch.equal(ckpt.read(name, into=buffer, start=start, count=count), whole[start:start + count])
        assert torch.equal(ckpt.view(name, start, count), whole[start:start + count])


def test_merged_combined_and_peft_outputs_agree_with_peft(lora, tmp_path):
    root = tmp_path
    coeffs = {"0": 0.7, "2": 1.3}
    safegene_fast.apply(lora["task"], lora["gene"], root / "merged", coeffs)
    safegene_fast.apply(lora["task"], lora["gene"], root / "combined", coeffs, format="combined")
    safegene_fast.apply(lora["task"], lora["gene"], root / "gene_only", coeffs, format="peft")
    merged = checkpoint(root / "merged")

    # float64 reference: base + s * B_t @ A_t + alpha * B_g @ A_g, rounded once
    base = checkpoint(lora["base"])
    task = load_file(str(lora["task"] / "adapter_model.safetensors"))
    gene = safegene_fast.SafetyGene.load(lora["gene"])
    scaling = 8 / 4
    for name, w in base.items():
        module = name.removesuffix(".weight")
        expected = w.double()
        key = f"base_model.model.{module}.lora_A.weight"
        if key in task:
            expected += scaling * task[key.replace("lora_A", "lora_B")].double() @ task[key].double()
        if module in gene.modules:
            alpha = gene.coefficient_for(module, coeffs)
            expected += alpha * gene.modules[module].B.double() @ gene.modules[module].A.double()
        torch.testing.assert_close(merged[name].double(), expected, rtol=1e-5, atol=1e-6, msg=name)

    # PEFT's merge of the combined adapter, on the base, is the merged checkpoint
    combined = peft_merged(lora["base"], root / "combined")
    for name, w in merged.items():
        torch.testing.assert_close(combined[name], w, rtol=1e-5, atol=1e-6)
    config = json.loads((root / "combined" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(lora["base"].resolve())
    ranks = config["rank_pattern"]
    assert ranks["model.layers.0.self_attn.q_proj"] == 4 + 4  # task rank + gene rank
    assert ranks["model.layers.1.self_attn.q_proj"] == 4       # layer 1 has coefficient 0: the task's only
    # PEFT's forward through the combined adapter (unmerged) gives the merged model's logits
    torch.testing.assert_close(logits(lora["base"], root / "combined"), logits(root / "merged"),
                               rtol=1e-4, atol=1e-4)
    # the gene alone, on the merged task model, is the merged checkpoint too
    task_merged = root / "task_merged"
    model = AutoModelForCausalLM.from_pretrained(lora["base"], dtype=torch.float32)
    PeftModel.from_pretrained(model, lora["task"]).merge_and_unload().save_pretrained(task_merged)
    torch.testing.assert_close(logits(task_merged, root / "gene_only"), logits(root / "merged"),
                               rtol=1e-4, atol=1e-4)
    # the combined adapter is not a gene: used as one, the task update would be added twice
    with pytest.raises(CheckpointError, match="folded"):
        safegene_fast.SafetyGene.load(root / "combined")


def test_merged_output_carries_the_base_and_adapter_companions_but_no_adapter_config(lora, tmp_path):
    safegene_fast.apply(lora["task"], lora["gene"], tmp_path / "merged", 1.0)
    files = {f.name for f in (tmp_path / "merged").iterdir()}
    assert {"config.json", "LICENSE", "tokenizer_config.json", "README.md"} <= files
    assert "adapter_config.json" not in files and "adapter_model.safetensors" not in files
    card = (tmp_path / "merged" / "README.md").read_text()
    assert "task" in card and "base" in card


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base_matches_peft_within_its_rounding(lora, tmp_path, dtype):
    """On a bf16/fp16 base PEFT rounds the update and then the sum (twice); we round once: the
    two agree within one unit in the last place of the weight, and equal the float64 reference
    rounded once."""
    base = tmp_path / "base"
    model = AutoModelForCausalLM.from_pretrained(lora["base"], dtype=dtype)
    model.save_pretrained(base)
    adapter = task_adapter(base, tmp_path / "task", seed=3)
    expected = peft_merged(base, adapter, dtype)
    task = load_file(str(adapter / "adapter_model.safetensors"))
    with open_checkpoint(adapter) as ckpt:
        for name in ckpt.updates:
            ours = ckpt.read(name)
            key = f"base_model.model.{name.removesuffix('.weight')}.lora_A.weight"
            exact = (ckpt.base.read(name).double()
                     + 2.0 * task[key.replace("lora_A", "lora_B")].double() @ task[key].double())
            assert torch.equal(ours, exact.to(dtype)) or (ours.double() - exact).abs().max() <= \
                exact.abs().max() * torch.finfo(dtype).eps  # float32 accumulation may differ from float64 by an ulp
            step = torch.finfo(dtype).eps * expected[name].double().abs().clamp_min(torch.finfo(dtype).tiny)
            assert bool(((ours.double() - expected[name].double()).abs() <= step).all()), name


def test_rslora_alpha_pattern_and_embedding_updates_match_peft(lora, tmp_path):
    adapter = task_adapter(lora["base"], tmp_path / "task", seed=4, r=3, use_rslora=True,
                           targets=["q_proj", "o_proj", "embed_tokens", "lm_head"],
                           alpha_pattern={"o_proj": 5}, rank_pattern={"lm_head": 2})
    expected = peft_merged(lora["base"], adapter)
    with open_checkpoint(adapter) as ckpt:
        assert "model.embed_tokens.weight" in ckpt.updates and "lm_head.weight" in ckpt.updates
        for name in ckpt.tensors:
            torch.testing.assert_close(ckpt.read(name), expected[name], rtol=2e-6, atol=2e-6, msg=name)


def test_extract_from_an_adapter_degraded_copy(lora, tmp_path):
    """A degraded copy given as a LoRA adapter on the aligned model: the gene is minus its update."""
    degraded = task_adapter(lora["base"], tmp_path / "degraded", seed=5, targets=["q_proj"])
    gene = safegene_fast.extract(lora["base"], [degraded], rank=4, include=r"q_proj\.weight$")
    task = load_file(str(degraded / "adapter_model.safetensors"))
    for module, m in gene.modules.items():
        key = f"base_model.model.{module}.lora_A.weight"
        update = 2.0 * task[key.replace("lora_A", "lora_B")] @ task[key]
        torch.testing.assert_close(m.B @ m.A, -update, rtol=1e-3, atol=1e-5)
    other = safegene_fast.extract(lora["base"], [degraded], rank=4, include=r"q_proj\.weight$")
    assert gene.provenance["sha256"] == other.provenance["sha256"]
    plain = safegene_fast.extract(lora["base"], [lora["base"]], rank=1, include=r"q_proj\.weight$")
    assert plain.provenance["sha256"][str(lora["base"])] != gene.provenance["sha256"][str(degraded)]


def test_resta_with_adapter_inputs_equals_resta_on_their_merges(lora, tmp_path):
    task_merged = tmp_path / "task_merged"
    model = AutoModelForCausalLM.from_pretrained(lora["base"], dtype=torch.float32)
    PeftModel.from_pretrained(model, lora["task"]).merge_and_unload().save_pretrained(task_merged)
    safegene_fast.resta(lora["task"], lora["base"], lora["degraded"], 0.5, tmp_path / "from_adapter")
    safegene_fast.resta(task_merged, lora["base"], lora["degraded"], 0.5, tmp_path / "from_merged")
    ours, theirs = checkpoint(tmp_path / "from_adapter"), checkpoint(tmp_path / "from_merged")
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ what careless users give

def run(*argv) -> int:
    return main([*map(str, argv), "--quiet"])


def copy_adapter(lora, tmp_path, name="adapter"):
    folder = tmp_path / name
    shutil.copytree(lora["task"], folder)
    return folder


def edit_config(folder, **changes):
    file = folder / "adapter_config.json"
    config = json.loads(file.read_text())
    config.update(changes)
    file.write_text(json.dumps(config))


def test_cli_walkthrough_merged_and_combined(lora, tmp_path, capsys):
    assert run("apply", "--model", lora["task"], "--gene", lora["gene"], "--out", tmp_path / "m") == 0
    assert run("apply", "--model", lora["task"], "--gene", lora["gene"], "--out", tmp_path / "c",
               "--format", "combined") == 0
    assert (tmp_path / "m" / "model.safetensors").exists() or (tmp_path / "m" / "model.safetensors.index.json").exists()
    assert (tmp_path / "c" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("change, pattern", [
    (dict(base_model_name_or_path=""), "names no base model.*--base"),
    (dict(base_model_name_or_path="/nowhere/base"), "neither a folder nor a model in the local Hub cache"),
    (dict(use_dora=True), "use_dora"),
    (dict(modules_to_save=["lm_head"]), "modules_to_save"),
    (dict(peft_type="IA3"), "IA3 adapter"),
    (dict(fan_in_fan_out=True), "fan_in_fan_out"),
])
def test_adapters_that_cannot_be_read_are_refused_in_one_line(lora, tmp_path, capsys, change, pattern):
    adapter = copy_adapter(lora, tmp_path)
    edit_config(adapter, **change)
    assert run("apply", "--model", adapter, "--gene", lora["gene"], "--out", tmp_path / "out") != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(pattern, err), err
    assert not (tmp_path / "out").exists()


def test_an_adapter_for_another_model_is_refused(lora, tmp_path, capsys):
    adapter = copy_adapter(lora, tmp_path)
    factors = load_file(str(adapter / "adapter_model.safetensors"))
    key = next(k for k in factors if k.endswith("q_proj.lora_A.weight"))
    factors[key.replace("layers.0.", "layers.9.")] = factors[key].clone()
    factors[key.replace("layers.0.", "layers.9.").replace("lora_A", "lora_B")] = \
        factors[key.replace("lora_A", "lora_B")].clone()
    save_file(factors, str(adapter / "adapter_model.safetensors"))
    assert run("apply", "--model", adapter, "--gene", lora["gene"], "--out", tmp_path / "out") != 0
    err = capsys.readouterr().err
    assert "model.layers.9.self_attn.q_proj" in err and "lands on no weight" in err
    # the right module name with the wrong shape
    other = copy_adapter(lora, tmp_path, "other")
    factors = load_file(str(other / "adapter_model.safetensors"))
    factors[key] = torch.zeros(4, 7)
    save_file(factors, str(other / "adapter_model.safetensors"))
    assert run("apply", "--model", other, "--gene", lora["gene"], "--out", tmp_path / "out") != 0
    assert "make a [48, 7] update but the base" in capsys.readouterr().err


def test_pickled_adapter_weights_are_refused(lora, tmp_path, capsys):
    adapter = copy_adapter(lora, tmp_path)
    (adapter / "adapter_model.safetensors").rename(adapter / "adapter_model.bin")
    assert run("apply", "--model", adapter, "--gene", lora["gene"], "--out", tmp_path / "out") != 0
    assert "pickle" in capsys.readouterr().err


def test_base_flag_overrides_the_config_and_a_stacked_adapter_is_refused(lora, tmp_path, capsys):
    adapter = copy_adapter(lora, tmp_path)
    edit_config(adapter, base_model_name_or_path="/nowhere/base")
    assert run("apply", "--model", adapter, "--base", lora["base"], "--gene", lora["gene"],
               "--out", tmp_path / "out") == 0
    assert run("apply", "--model", adapter, "--base", lora["task"], "--gene", lora["gene"],
               "--out", tmp_path / "out2") != 0
    assert "itself an adapter" in capsys.readouterr().err


def test_no_output_lands_on_the_adapters_base(lora, tmp_path, capsys):
    base = tmp_path / "base"
    shutil.copytree(lora["base"], base)
    adapter = copy_adapter(lora, tmp_path)
    edit_config(adapter, base_model_name_or_path=str(base))
    before = sorted((f.name, f.stat().st_size) for f in base.iterdir())
    for out in (base, base / "sub"):
        assert run("apply", "--model", adapter, "--gene", lora["gene"], "--out", out, "--overwrite") != 0
        capsys.readouterr()
    assert sorted((f.name, f.stat().st_size) for f in base.iterdir()) == before


def test_combined_needs_an_adapter_target(lora, tmp_path, capsys):
    assert run("apply", "--model", lora["base"], "--gene", lora["gene"], "--out", tmp_path / "c",
               "--format", "combined") != 0
    assert "combined format is for a LoRA adapter" in capsys.readouterr().err


def test_eval_select_and_recalibrate_take_an_adapter_target(tiny_family, tmp_path, capsys):
    """A task fine-tune as LoRA goes through the method commands as its merge does: eval gives the
    merged model's numbers, recalibrate and select run on it."""
    import test_cli

    target, aligned = tiny_family.member("target"), tiny_family.member("aligned")
    adapter = task_adapter(target, tmp_path / "task", targets=["q_proj", "v_proj"])
    for name in ("tokenizer.json", "tokenizer_config.json"):  # a fine-tune ships its tokenizer, or not
        assert not (adapter / name).exists()
    merged = tmp_path / "merged"
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
    PeftModel.from_pretrained(model, adapter).merge_and_unload().save_pretrained(merged)
    for file in target.iterdir():
        if file.name.startswith("tokenizer") or file.name.endswith(".jinja"):
            shutil.copy(file, merged / file.name)
    args = ["eval", "--family", "tiny", "--limit", "8"]
    on_adapter = test_cli.run_json(capsys, [*args, "--model", str(adapter)])
    on_merged = test_cli.run_json(capsys, [*args, "--model", str(merged)])
    strip = lambda r: {k: v for k, v in r.items() if k not in ("model", "seconds", "peak_rss_mb")}  # noqa: E731
    assert strip(on_adapter) == strip(on_merged)
    gene = tmp_path / "gene"
    assert main(["extract", "--aligned", str(aligned), "--degraded", str(tiny_family.member("dealigned")),
                 "--rank", "2", "--out", str(gene), "--quiet"]) == 0
    assert main(["recalibrate", "--model", str(adapter), "--gene", str(gene), "--family", "tiny", "--steps", "2",
                 "--shots", "4", "--out", str(tmp_path / "c.json"), "--quiet"]) == 0
    assert main(["select", "--gene", str(gene), "--aligned", str(aligned), "--degraded", str(adapter),
                 "--family", "tiny", "--layers", "1", "--shots", "4", "--quiet"]) == 0
    assert main(["apply", "--model", str(adapter), "--gene", str(gene), "--coeffs", str(tmp_path / "c.json"),
                 "--out", str(tmp_path / "protected"), "--format", "combined", "--quiet"]) == 0


def test_base_without_an_adapter_input_and_a_gene_given_as_the_model_are_mistakes(lora, tmp_path, capsys):
    assert run("apply", "--model", lora["base"], "--base", lora["base"], "--gene", lora["gene"],
               "--out", tmp_path / "out") != 0
    assert "no input here is an adapter folder" in capsys.readouterr().err
    assert run("eval", "--model", lora["base"], "--base", lora["base"]) != 0
    assert "no input here is an adapter folder" in capsys.readouterr().err
    assert run("apply", "--model", lora["gene"], "--gene", lora["gene"], "--out", tmp_path / "out") != 0
    assert "is a safety gene, not a fine-tune" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_protect_and_batch_take_an_adapter_whose_base_is_given(lora, tmp_path):
    """An adapter whose config names no base, its base given: protect fingerprints it on that base,
    and a batch resumes it."""
    import yaml

    from safegene_fast.fleet.batch import run_batch
    adapter = copy_adapter(lora, tmp_path)
    edit_config(adapter, base_model_name_or_path="")
    done = safegene_fast.protect(adapter, lora["gene"], tmp_path / "p", 0.7, base=lora["base"])
    assert len(done.record["target"]["fingerprint"]) == 64
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"gene": str(lora["gene"]), "alpha": 0.7, "out_dir": str(tmp_path / "fleet"),
                                      "targets": [{"model": str(adapter), "base": str(lora["base"])}]}))
    assert run_batch(recipe, progress=False)[0]["status"] == "ok"
    assert run_batch(recipe, resume=True, progress=False)[0]["status"] == "up to date"
