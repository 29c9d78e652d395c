"""GenePatch: the low-rank path on a loaded model equals the merged weights, and is differentiable."""

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from safegene_fast.gene import GeneModule, SafetyGene, layer_of
from safegene_fast.method.patch import GenePatch


@pytest.fixture(scope="module")
def model_and_gene():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=37, hidden_size=24, intermediate_size=40, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(config).double().eval()
    modules = {}
    for name, w in model.named_parameters():
        module = name.removesuffix(".weight")
        if ".layers." in name and w.dim() == 2:
            r = 3
            modules[module] = GeneModule(torch.randn(w.shape[0], r, dtype=torch.float64) * 0.05,
                                         torch.randn(r, w.shape[1], dtype=torch.float64) * 0.05,
                                         torch.ones(r), 1.0, layer_of(module))
    return model, SafetyGene(modules)


def merged(model, gene, coeffs):
    out = copy.deepcopy(model)
    params = dict(out.named_parameters())
    with torch.no_grad():
        for name, m in gene.modules.items():
            alpha = gene.coefficient_for(name, coeffs)
            params[name + ".weight"] += alpha * (m.B @ m.A)
    return out


IDS = torch.tensor([[3, 5, 7, 11, 2, 9], [1, 4, 1, 5, 9, 2]])


@pytest.mark.parametrize("coeffs", [{"0": 0.7, "2": 1.3}, {"1": 2.0}, {"0": 0.0, "1": 0.0, "2": 0.0}])
def test_patch_equals_merged_weights(model_and_gene, coeffs):
    model, gene = model_and_gene
    expected = merged(model, gene, coeffs)(IDS).logits
    with GenePatch(model, gene) as patch:
        patch.set(coeffs)
        got = model(IDS).logits
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(model(IDS).logits, merged(model, gene, 0.0)(IDS).logits)  # hooks removed


def test_layers_outside_the_patch_get_nothing(model_and_gene):
    model, gene = model_and_gene
    with GenePatch(model, gene, layers=[1]) as patch:
        patch.set(1.5)
        assert patch.keys == ["1"]
        got = model(IDS).logits
    torch.testing.assert_close(got, merged(model, gene, {"1": 1.5})(IDS).logits, rtol=1e-10, atol=1e-10)


def test_per_module_coefficients(model_and_gene):
    model, gene = model_and_gene
    name = "model.layers.2.mlp.down_proj"
    with GenePatch(model, gene, layers=[2], per_module=True) as patch:
        assert name in patch.keys and len(patch.keys) == 7
        patch.set({name: 0.9})
        got = model(IDS).logits
        assert patch.coefficients()[name] == pytest.approx(0.9)
    torch.testing.assert_close(got, merged(model, gene, {name: 0.9})(IDS).logits, rtol=1e-10, atol=1e-10)


def loss(model):  # in float64 (transformers' own loss casts the logits to float32)
    logp = torch.log_softmax(model(IDS).logits, -1)
    return -logp[:, :-1].gather(-1, IDS[:, 1:, None]).mean()


def test_gradient_in_the_coefficients_matches_finite_differences(model_and_gene):
    model, gene = model_and_gene
    alpha = torch.tensor([0.3, 0.8, 1.1], dtype=torch.float64, requires_grad=True)
    with GenePatch(model, gene) as patch:
        patch.set(alpha)
        loss(model).backward()
        eps = 1e-3  # the RMSNorm computes in float32 even in a float64 model: a smaller step is noise
        for i in range(3):
            hi, lo = alpha.detach().clone(), alpha.detach().clone()
            hi[i] += eps
            lo[i] -= eps
            patch.set(hi)
            f_hi = loss(model).item()
            patch.set(lo)
            f_lo = loss(model).item()
            assert alpha.grad[i].item() == pytest.approx((f_hi - f_lo) / (2 * eps), rel=1e-3, abs=1e-6)
    model.zero_grad(set_to_none=True)


def test_a_gene_module_the_model_lacks_is_refused(model_and_gene):
    model, gene = model_and_gene
    bad = SafetyGene({"model.layers.0.mlp.nope": next(iter(gene.modules.values()))})
    with pytest.raises(ValueError, match="model.layers.0.mlp.nope"):
        GenePatch(model, bad)
