"""Interop with transformers and PEFT on a tiny real Llama family.

Checkpoints are written by transformers' own ``save_pretrained`` (several shards and an index,
bf16 / fp16 / fp32, tied embeddings where the file has no ``lm_head.weight``, and untied), run
through extract -> apply (merged and PEFT adapter) and resta, and loaded back with
``AutoModelForCausalLM`` and ``PeftModel``. Weights and logits are checked against references
computed independently in float64 and rounded once.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from types import SimpleNamespace

import pytest
import torch
from conftest import ulp
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import safegene_fast
from safegene_fast.io import CheckpointError

# Awkward sizes: head_dim 12, grouped-query attention, an odd intermediate and vocabulary.
SIZES = dict(hidden_size=48, intermediate_size=100, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=97, num_hidden_layers=3, max_position_embeddings=64)
RANK = 4
COEFFS = {"0": 0.5, "2": 1.5}   # layer 1 is absent: coefficient 0, its weights stay as they are
ALPHA_OF_LAYER = {0: 0.5, 1: 0.0, 2: 1.5}
SHARD_BYTES = 20_000            # several shards even for the bf16 family (about 150 kB)
U32 = 2.0 ** -24                # unit roundoff of float32
TOKENS = torch.randint(0, SIZES["vocab_size"], (2, 13), generator=torch.Generator().manual_seed(7))

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def llama_config(tied: bool, **overrides) -> LlamaConfig:
    return LlamaConfig(**{**SIZES, **overrides}, tie_word_embeddings=tied)


def base_weights(config: LlamaConfig, seed: int) -> dict[str, torch.Tensor]:
    """Every parameter (tied ones once), float32, from a seeded generator: projections
    N(0, 1/fan_in), embeddings and head N(0, 1), norms 1 + N(0, 0.1^2)."""
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for name, p in LlamaForCausalLM(config).named_parameters():  # named_parameters skips tied copies
        noise = torch.randn(p.shape, generator=g)
        if p.dim() == 1:
            weights[name] = 1 + 0.1 * noise
        elif "embed" in name or "lm_head" in name:
            weights[name] = noise
        else:
            weights[name] = noise / p.shape[1] ** 0.5
    return weights


def perturbed(weights, seed: int, noise: float, low_rank: float = 0.0) -> dict[str, torch.Tensor]:
    """weights + noise * std * N(0, 1), plus for 2-D block weights a rank-2 term of relative size
    low_rank (a degradation a rank-4 gene can capture)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, w in weights.items():
        d = noise * w.std() * torch.randn(w.shape, generator=g)
        if low_rank and w.dim() == 2 and ".layers." in name:
            u, v = torch.randn(w.shape[0], 2, generator=g), torch.randn(2, w.shape[1], generator=g)
            d += low_rank * w.norm() * (u @ v) / (u @ v).norm()
        out[name] = w + d
    return out


def save_model(config, weights, dtype, folder):
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    model.to(dtype).save_pretrained(folder, max_shard_size=SHARD_BYTES)
    return folder


def read_folder(folder) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder, read with safetensors itself (not our reader)."""
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() \
        else ["model.safetensors"]
    tensors = {}
    for f in files:
        tensors.update(load_file(str(folder / f)))
    return tensors


def raw_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def load_model(folder, dtype):
    model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


def model_with(config, weights, dtype):
    """The architecture holding exactly `weights` (lm_head given only when untied)."""
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)  # as from_pretrained builds it
    state = dict(weights)
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True)
    return model.eval()


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model(TOKENS).logits


def alpha_of(module: str, gene) -> float:
    return ALPHA_OF_LAYER[gene.modules[module].layer]


def exact_merge(gene, target) -> dict[str, torch.Tensor]:
    """float64 W + alpha_l * B @ A for every gene module, unrounded; other tensors as they are."""
    out = {}
    for name, w in target.items():
        module = name.removesuffix(".weight")
        if module in gene.modules:
            m = gene.modules[module]
            out[name] = w.double() + alpha_of(module, gene) * (m.B.double() @ m.A.double())
        else:
            out[name] = w
    return out


def fp32_error_scale(gene, name, w) -> torch.Tensor:
    """|W| + |alpha| |B| @ |A|: the magnitude float32 rounding errors of the merge scale with."""
    module = name.removesuffix(".weight")
    m = gene.modules[module]
    return w.double().abs() + abs(alpha_of(module, gene)) * (m.B.double().abs() @ m.A.double().abs())


def ulps_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many steps between representable values of their dtype separate a and b (0: equal)."""
    bits = a.element_size() * 8
    as_int = {16: torch.int16, 32: torch.int32}[bits]

    def ordered(x):
        i = x.contiguous().view(as_int).long()
        return torch.where(i < 0, -(i & ((1 << (bits - 1)) - 1)), i)

    return (ordered(a) - ordered(b)).abs()


def check_one_rounding(got: torch.Tensor, want: torch.Tensor, slack: torch.Tensor, name: str) -> int:
    """`got` is `want` (float64, or a tensor of got's dtype) rounded once to got's dtype, up to
    `slack` of float32 arithmetic before that rounding: |got - want| <= ulp(want) + slack
    everywhere, and got is want rounded or its neighbour (<= 1 ulp apart) wherever the slack is
    under half an ulp (everywhere but where the sum nearly cancels). Returns how many differ."""
    want64 = want.double()
    assert ((got.double() - want64).abs() <= ulp(want64, got.dtype) + slack).all(), name
    rounded = want.to(got.dtype)
    away_from_cancellation = slack < ulp(want64, got.dtype) / 2
    assert not (ulps_apart(got, rounded)[away_from_cancellation] > 1).any(), name
    return int((got != rounded).sum())


@pytest.fixture(scope="module", params=[(d, t) for d in DTYPES for t in (True, False)],
                ids=lambda p: f"{p[0]}-{'tied' if p[1] else 'untied'}")
def family(request, tmp_path_factory):
    """aligned, degraded (aligned + a low-rank degradation), target (aligned + task noise), saved
    by transformers; the rank-4 gene, and its merged and PEFT applications to target."""
    dtype_name, tied = request.param
    dtype = DTYPES[dtype_name]
    root = tmp_path_factory.mktemp(f"llama-{dtype_name}-{'tied' if tied else 'untied'}")
    config = llama_config(tied)
    aligned = base_weights(config, seed=0)
    variants = {"aligned": aligned,
                "degraded": perturbed(aligned, seed=1, noise=0.01, low_rank=0.3),
                "target": perturbed(aligned, seed=2, noise=0.05)}
    paths = {k: save_model(config, w, dtype, root / k) for k, w in variants.items()}
    f = SimpleNamespace(dtype=dtype, tied=tied, config=config, root=root, **paths)
    f.weights = {k: read_folder(p) for k, p in paths.items()}
    f.gene = safegene_fast.extract(f.aligned, [f.degraded], rank=RANK)
    f.merged = safegene_fast.apply(f.target, f.gene, root / "merged", COEFFS, format="merged",
                                   max_shard_size=SHARD_BYTES)
    f.adapter = safegene_fast.apply(f.target, f.gene, root / "adapter", COEFFS, format="peft")
    return f


def test_checkpoints_are_sharded_transformers_checkpoints(family):
    f = family
    for folder in (f.target, f.merged):
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 2
    names = set(f.weights["target"])
    assert ("lm_head.weight" in names) != f.tied   # transformers leaves a tied head out of the file
    assert set(read_folder(f.merged)) == names     # and so does the merged output
    assert len(f.gene.modules) == 7 * SIZES["num_hidden_layers"]


def test_merged_weights_match_float64_reference(family):
    """Each merged module is W + alpha_l * B @ A computed in float64 and rounded once, up to the
    float32 arithmetic of the merge ((r + 3) float32 roundoffs of |W| + |alpha| |B| @ |A|).
    In bf16/fp16 that is the float64 result rounded once in all but a few entries (1 ulp off,
    where the float32 value straddles a rounding boundary): measured 3 (bf16) and 6 (fp16) of
    42,624. In fp32 it is float32 roundoff (9,426 of 42,624 entries differ)."""
    f = family
    merged, target = read_folder(f.merged), f.weights["target"]
    exact = exact_merge(f.gene, f.weights["target"])
    differing = total = 0
    for module in f.gene.modules:
        name = module + ".weight"
        if alpha_of(module, f.gene) == 0.0:
            continue
        slack = (RANK + 3) * U32 * fp32_error_scale(f.gene, name, target[name])
        differing += check_one_rounding(merged[name], exact[name], slack, name)
        total += merged[name].numel()
    if f.dtype != torch.float32:
        assert differing <= total // 1000
    assert not torch.equal(merged["model.layers.0.mlp.down_proj.weight"],
                           target["model.layers.0.mlp.down_proj.weight"])


def test_untouched_tensors_are_byte_identical(family):
    """Embeddings, norms, the head when present, and the modules of layer 1 (coefficient 0)."""
    f = family
    merged, target = read_folder(f.merged), f.weights["target"]
    untouched = [n for n in target
                 if n.removesuffix(".weight") not in f.gene.modules
                 or alpha_of(n.removesuffix(".weight"), f.gene) == 0.0]
    assert "model.embed_tokens.weight" in untouched and "model.norm.weight" in untouched
    assert any(".layers.1.self_attn" in n for n in untouched)
    assert ("lm_head.weight" in untouched) != f.tied
    for name in untouched:
        assert merged[name].dtype == target[name].dtype, name
        assert raw_bytes(merged[name]) == raw_bytes(target[name]), name


# Logits of two forward passes of the same function in one dtype differ by rounding: at most the
# sum of their errors against the exact (float64) forward, each about the size of the reference
# forward's error. Comparisons allow FORWARD_SLACK times that error (measured ratios: 0 to 0.8
# when only the weights' last bits differ, up to 1.5 for PEFT's differently ordered forward).
FORWARD_SLACK = 3


def reference_logits(f, exact) -> tuple[torch.Tensor, float]:
    """Logits of the architecture holding `exact` rounded once to the family's dtype, and that
    forward pass's own rounding error: its largest distance from the same architecture run in
    float64 on the unrounded weights."""
    want = logits(model_with(f.config, {n: w.to(f.dtype) for n, w in exact.items()}, f.dtype))
    truth = logits(model_with(f.config, {n: w.double() for n, w in exact.items()}, torch.float64))
    return want, max_diff(want, truth)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def test_merged_checkpoint_loads_with_reference_logits(family):
    """transformers loads the merged checkpoint (every tensor, the tie, the dtype) and computes
    with exactly the file's tensors; its logits equal those of the architecture holding the
    float64 reference weights rounded once, within the forward's own rounding (FORWARD_SLACK):
    the weights differ only in the last bits of a few entries (bf16/fp16; logits measured
    identical in bf16) or by float32 roundoff (fp32). The gene moves the logits by at least 5
    times that tolerance, so a wrong coefficient or a skipped module cannot hide in it (the
    weight tests catch those exactly anyway)."""
    f = family
    model = load_model(f.merged, f.dtype)
    assert model.dtype == f.dtype
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == f.tied
    got = logits(model)
    assert torch.equal(got, logits(model_with(f.config, read_folder(f.merged), f.dtype)))
    want, noise = reference_logits(f, exact_merge(f.gene, f.weights["target"]))
    assert max_diff(got, want) <= FORWARD_SLACK * noise
    assert max_diff(got, logits(load_model(f.target, f.dtype))) >= 5 * FORWARD_SLACK * noise


def load_peft(f):
    """target + the exported adapter through PEFT, refusing any warning about keys."""
    base = load_model(f.target, f.dtype)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(base, f.adapter)
    problems = [str(w.message) for w in caught if "key" in str(w.message).lower()]
    assert not problems, problems
    return model.eval()


def lora_layers(model) -> dict[str, torch.nn.Module]:
    """The LoRA-wrapped modules of a PeftModel, by their name in the base model."""
    return {n.removeprefix("base_model.model."): m for n, m in model.named_modules()
            if hasattr(m, "lora_A") and "default" in m.lora_A}


def test_peft_adapter_loads_every_factor(family):
    """Every gene module a coefficient reaches becomes a LoRA module holding the gene's A and
    alpha_l * B (float32, rank RANK, scaling 1); the file has exactly those keys, so nothing is
    missing or unexpected, and the modules of layer 1 (coefficient 0) are left out."""
    f = family
    layers = lora_layers(load_peft(f))
    assert set(layers) == {m for m in f.gene.modules if alpha_of(m, f.gene) != 0}
    assert layers and not any(".layers.1." in m for m in layers)
    file_keys = set(load_file(str(f.adapter / "adapter_model.safetensors")))
    assert file_keys == {f"base_model.model.{m}.lora_{x}.weight" for m in layers for x in "AB"}
    for module, layer in layers.items():
        g, alpha = f.gene.modules[module], alpha_of(module, f.gene)
        assert layer.r["default"] == g.rank == RANK and layer.scaling["default"] == 1.0
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        assert A.dtype == B.dtype == torch.float32  # PEFT keeps (upcasts) adapters in float32
        assert torch.equal(A, g.A) and torch.equal(B, (g.B * alpha).to(g.B.dtype)), module


def test_peft_forward_matches_merged_logits(family):
    """PEFT computes base(x) + lora_B(lora_A(x)) instead of x @ (merged W)^T: the same function
    rounded in another order, so within FORWARD_SLACK of the merged model's own forward error."""
    f = family
    merged = logits(load_model(f.merged, f.dtype))
    exact = exact_merge(f.gene, f.weights["target"])
    truth = logits(model_with(f.config, {n: w.double() for n, w in exact.items()}, torch.float64))
    assert max_diff(logits(load_peft(f)), merged) <= FORWARD_SLACK * max_diff(merged, truth)


def test_peft_merge_and_unload_equals_merged_bit_for_bit(family):
    """PEFT merges W + round32(B' @ A), rounded once to W's dtype, with B' = round32(alpha * B)
    the adapter's folded B (PEFT keeps adapters in float32 and adds in float32); apply_merged
    feeds merge_lowrank_ the same B' (SafetyGene.scaled_B) with coefficient 1, so the two agree
    bit for bit in every dtype."""
    f = family
    merged = read_folder(f.merged)
    unloaded = load_peft(f).merge_and_unload().state_dict()
    assert set(unloaded) >= set(merged)
    for name, ours in merged.items():
        assert unloaded[name].dtype == ours.dtype and torch.equal(unloaded[name], ours), name


RESTA_ALPHA = 0.7


def test_resta_loads_and_matches_float64(family, tmp_path):
    """RESTA is dense: every tensor, embeddings and norms included, becomes T + alpha (A - D),
    computed in float32 (4 roundoffs of |T| + alpha (|A| + |D|)) and rounded once; the output
    loads in transformers with the reference logits (tolerance as for the merged output)."""
    f = family
    out = safegene_fast.resta(f.target, f.aligned, f.degraded, RESTA_ALPHA, tmp_path / "resta",
                              max_shard_size=SHARD_BYTES)
    T, A, D = (f.weights[k] for k in ("target", "aligned", "degraded"))
    got = read_folder(out)
    assert set(got) == set(T)
    exact = {n: T[n].double() + RESTA_ALPHA * (A[n].double() - D[n].double()) for n in T}
    differing = total = 0
    for name, e in exact.items():
        magnitude = T[name].double().abs() + RESTA_ALPHA * (A[name].double().abs() + D[name].double().abs())
        slack = 4 * U32 * magnitude
        differing += check_one_rounding(got[name], e, slack, name)
        total += e.numel()
    if f.dtype != torch.float32:
        assert differing <= total // 1000
    assert not torch.equal(got["model.embed_tokens.weight"], T["model.embed_tokens.weight"])
    model = load_model(out, f.dtype)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == f.tied
    result = logits(model)
    assert torch.equal(result, logits(model_with(f.config, got, f.dtype)))
    want, noise = reference_logits(f, exact)
    assert max_diff(result, want) <= FORWARD_SLACK * noise


@pytest.fixture(scope="module")
def strangers(tmp_path_factory):
    """Llama checkpoints of other shapes: a narrower MLP, and one layer fewer."""
    root = tmp_path_factory.mktemp("strangers")
    folders = {}
    for name, overrides in {"narrower_mlp": dict(intermediate_size=96),
                            "shallower": dict(num_hidden_layers=2)}.items():
        config = llama_config(False, **overrides)
        folders[name] = save_model(config, base_weights(config, seed=3), torch.bfloat16, root / name)
    return folders


@pytest.mark.parametrize("fmt", ["merged", "peft"])
@pytest.mark.parametrize("stranger, pattern", [
    pytest.param("narrower_mlp", r"tensor '(model\.layers\.0\.mlp\.\w+_proj\.weight)' has shape "
                 r"\[(\d+), (\d+)\] but the gene's factors make \[(\d+), (\d+)\]\.$", id="narrower_mlp"),
    pytest.param("shallower", r"has no tensor '(model\.layers\.2\.[\w.]+\.weight)', which the gene "
                 r"targets\.$", id="shallower"),
])
def test_gene_from_another_family_is_refused(family, strangers, tmp_path, fmt, stranger, pattern):
    """A gene applied to a model of other shapes: a CheckpointError of one sentence naming the
    model and the tensor, raised before anything is written."""
    f = family
    out = tmp_path / "out"
    with pytest.raises(CheckpointError) as caught:
        safegene_fast.apply(strangers[stranger], f.gene, out, COEFFS, format=fmt)
    message = str(caught.value)
    assert isinstance(caught.value, ValueError)
    assert message.startswith(f"{strangers[stranger]}: ") and ". " not in message  # one sentence
    match = re.search(pattern, message)
    assert match, message
    if stranger == "narrower_mlp":
        name, *dims = match.groups()
        have = read_folder(strangers[stranger])[name].shape
        g = f.gene.modules[name.removesuffix(".weight")]
        gene_shape = (g.B.shape[0], g.A.shape[1])
        assert [int(d) for d in dims] == [*have, *gene_shape] and have != gene_shape
    assert os.listdir(tmp_path) == []  # no output, no temporary folder
