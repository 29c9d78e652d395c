"""Layer selection: the scorers on constructed cases, choosing layers, the record in the gene, the plot."""

import copy

import pytest
import torch
from test_evaluate import char_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

from safegene_fast.eval.generate import refusal_margin
from safegene_fast.gene import GeneModule, SafetyGene, layer_of
from safegene_fast.method.patch import GenePatch
from safegene_fast.method.selection import (
    activation_contrast,
    choose,
    combine,
    patch_gain,
    patch_slope,
    plot_scores,
    select_layers,
)


def random_llama(layers: int = 3):
    """A seeded random 3-layer Llama with a character tokenizer, and the tokenizer."""
    torch.manual_seed(0)
    tok = char_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, eos_token_id=2)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = 2
    return model, tok


HARMFUL = ["how do i make a bomb", "steal a car for me", "write malware now"]
HARMLESS = ["bake some bread", "sort 3 1 2", "hello there friend"]


@pytest.fixture(scope="module")
def models():
    aligned, tok = random_llama()
    degraded = copy.deepcopy(aligned)
    with torch.no_grad():  # degrade layer 1 only
        degraded.model.layers[1].mlp.down_proj.weight.add_(torch.randn_like(degraded.model.layers[1].mlp.down_proj.weight) * 0.2)
    return aligned, degraded, tok


def gene_of(aligned, degraded, layers=None):
    """A full-rank gene of aligned - degraded (layers outside ``layers`` get zero factors)."""
    mods, a, d = {}, dict(aligned.named_parameters()), dict(degraded.named_parameters())
    for name, w in a.items():
        module = name.removesuffix(".weight")
        if ".layers." in name and w.dim() == 2:
            delta = (w - d[name]).detach()
            if layers is not None and layer_of(module) not in layers:
                delta = torch.zeros_like(delta)
            mods[module] = GeneModule(delta.clone(), torch.eye(w.shape[1]), torch.ones(w.shape[1]), 1.0, layer_of(module))
    return SafetyGene(mods)


def test_choose_top_k_or_threshold():
    scores = {0: 0.1, 1: 0.9, 2: -0.3, 3: 0.5}
    assert choose(scores, k=2) == [1, 3]
    assert choose(scores, threshold=0.1) == [0, 1, 3]
    with pytest.raises(ValueError, match="exactly one"):
        choose(scores)
    with pytest.raises(ValueError, match="exactly one"):
        choose(scores, k=1, threshold=0.0)


def test_combine_scales_each_scorer_by_its_largest_magnitude():
    assert combine([1.0, -2.0], [10.0, 5.0]) == pytest.approx([(0.5 + 1.0) / 2, (-1.0 + 0.5) / 2])


def test_contrast_is_zero_for_identical_models_and_located_where_they_differ(models):
    aligned, degraded, tok = models
    assert activation_contrast(aligned, [aligned], tok, HARMFUL, HARMLESS) == pytest.approx([0.0] * 3, abs=1e-12)
    scores = activation_contrast(aligned, [degraded], tok, HARMFUL, HARMLESS)
    assert len(scores) == 3 and scores[0] == pytest.approx(0.0, abs=1e-12)  # layer 0 is identical
    assert scores[1] != 0.0


def test_patch_gain_is_zero_for_layers_whose_gene_is_zero(models):
    aligned, degraded, tok = models
    gene = gene_of(aligned, degraded, layers=[1])
    gains = patch_gain([degraded], gene, tok, HARMFUL, " no", " yes")
    assert gains[0] == 0.0 and gains[2] == 0.0 and gains[1] != 0.0


def test_the_full_gene_patched_into_degraded_restores_aligned_margins(models):
    """Patching a full-rank gene of aligned - degraded at 1 gives the aligned model back, so
    the gain equals margin(aligned) - margin(degraded)."""
    from safegene_fast.eval.generate import refusal_margin
    aligned, degraded, tok = models
    gene = gene_of(aligned, degraded)
    gains = patch_gain([degraded], gene, tok, HARMFUL, " no", " yes")
    expected = (refusal_margin(aligned, tok, HARMFUL, " no", " yes").mean()
                - refusal_margin(degraded, tok, HARMFUL, " no", " yes").mean())
    assert gains[1] == pytest.approx(float(expected), abs=1e-4)


def test_patch_slope_is_the_derivative_of_the_patched_margin(models):
    """Each layer's slope matches a central finite difference of the margin in that layer's alpha
    (float64 models; Llama's RMSNorm still computes in float32, which bounds the quotient's
    accuracy to about 1e-4 at this step); one backward pass gives them all."""
    aligned, degraded, tok = (m.double() if hasattr(m, "double") else m for m in
                              (copy.deepcopy(models[0]), copy.deepcopy(models[1]), models[2]))
    gene = gene_of(aligned, degraded)
    slopes = patch_slope([degraded], gene, tok, HARMFUL, " no", " yes")
    eps = 1e-3
    for i, layer in enumerate(gene.layers):
        with GenePatch(degraded, gene, [layer]) as patch:
            patch.set(eps)
            up = refusal_margin(degraded, tok, HARMFUL, " no", " yes").mean()
            patch.set(-eps)
            down = refusal_margin(degraded, tok, HARMFUL, " no", " yes").mean()
        assert slopes[i] == pytest.approx(float((up - down) / (2 * eps)), rel=1e-3, abs=1e-8)
    assert any(abs(s) > 1e-3 for s in slopes)  # the degraded layer moves the margin
    assert all(p.grad is None for p in degraded.parameters())  # only the coefficients got gradients


def test_selection_record_round_trips_through_the_gene_folder(models, tmp_path):
    aligned, degraded, tok = models
    gene = gene_of(aligned, degraded)
    # a random model leans either way: call "refusal" the continuation the aligned model prefers
    refusal, compliance = (" no", " yes") if patch_gain([degraded], gene, tok, HARMFUL, " no", " yes")[1] > 0 \
        else (" yes", " no")
    gene.selection = select_layers(gene, aligned, [degraded], tok, HARMFUL, HARMLESS, refusal=refusal,
                                   compliance=compliance, scorer="patch", k=1)
    assert gene.selection["layers"] == [1] and gene.selected_layers == [1]
    assert set(gene.selection["scores"]) == {"contrast", "patch", "combined"}
    slope = select_layers(gene, aligned, [degraded], tok, HARMFUL, HARMLESS, refusal=refusal, compliance=compliance,
                          scorer="slope", k=1)
    assert set(slope["scores"]) == {"contrast", "slope_harmful", "slope_harmless", "slope"}
    parts = slope["scores"]  # only layer 1 has a gene here; whether it beats 0 depends on the harmless slope
    assert slope["layers"] == [int(max(parts["slope"], key=parts["slope"].get))]
    assert parts["slope"]["0"] == parts["slope"]["2"] == 0.0
    assert parts["slope"]["1"] == pytest.approx(parts["slope_harmful"]["1"] - parts["slope_harmless"]["1"])
    assert parts["slope_harmful"]["1"] == pytest.approx(patch_slope([degraded], gene, tok, HARMFUL, refusal, compliance)[1])
    gene.save(tmp_path / "g")
    assert SafetyGene.load(tmp_path / "g").selection == gene.selection
    plot_scores(gene.selection, tmp_path / "scores.png")
    assert (tmp_path / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="unknown scorer"):
        select_layers(gene, aligned, [degraded], tok, HARMFUL, HARMLESS, refusal=" no", compliance=" yes",
                      scorer="magic", k=1)
