"""extract -> gene -> apply / resta on tiny generated Llama-shaped checkpoints."""

import json

import pytest
import torch
from conftest import assert_bits_equal, ulp

from safegene_fast import pipeline
from safegene_fast.gene import SafetyGene
from safegene_fast.io import (
    Checkpoint,
    CheckpointError,
    OutputExistsError,
    Planned,
    ShardedWriter,
)
from safegene_fast.pipeline import apply_merged, extract, resta, select_modules

HIDDEN, INTER, KV, VOCAB, LAYERS = 24, 37, 12, 50, 3


def llama_tensors(seed, dtype):
    g = torch.Generator().manual_seed(seed)
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN), p + "self_attn.k_proj.weight": (KV, HIDDEN),
            p + "self_attn.v_proj.weight": (KV, HIDDEN), p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
            p + "mlp.gate_proj.weight": (INTER, HIDDEN), p + "mlp.up_proj.weight": (INTER, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, INTER), p + "input_layernorm.weight": (HIDDEN,),
        })
    return {n: torch.randn(s, generator=g).to(dtype) for n, s in shapes.items()}


def save(folder, ts, max_shard_size=4000):
    with ShardedWriter(folder, [Planned(n, t.dtype, tuple(t.shape)) for n, t in ts.items()],
                       max_shard_size) as w:
        for n, t in ts.items():
            w.write(n, t)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return folder


@pytest.fixture(scope="module", params=[torch.bfloat16, torch.float32])
def family(request, tmp_path_factory):
    root, dtype = tmp_path_factory.mktemp("family"), request.param
    aligned = llama_tensors(0, dtype)
    models = {"aligned": aligned}
    for k, seed in (("degraded1", 1), ("degraded2", 2), ("target", 3)):
        g = torch.Generator().manual_seed(seed)
        models[k] = {n: (t.float() + 0.05 * torch.randn(t.shape, generator=g)).to(dtype)
                     for n, t in aligned.items()}
    return {k: save(root / k, ts) for k, ts in models.items()}, models, dtype


def test_default_selection_is_block_projections(family):
    paths, _, _ = family
    with Checkpoint(paths["aligned"]) as c:
        names = select_modules(c)
    assert len(names) == 7 * LAYERS and not any("norm" in n or "embed" in n for n in names)
    with Checkpoint(paths["aligned"]) as c:
        assert len(select_modules(c, exclude=r"mlp\.")) == 4 * LAYERS


def test_full_rank_gene_reproduces_the_mean_delta(family):
    paths, models, _ = family
    gene = extract(paths["aligned"], [paths["degraded1"], paths["degraded2"]], rank=HIDDEN)
    for module, m in gene.modules.items():
        name = module + ".weight"
        delta = models["aligned"][name].double() - (models["degraded1"][name].double()
                                                     + models["degraded2"][name].double()) / 2
        torch.testing.assert_close(m.B.double() @ m.A.double(), delta, rtol=0, atol=2e-5)
        assert m.layer == int(module.split(".")[2]) and m.energy == pytest.approx(1.0, abs=1e-4)
    assert gene.provenance["settings"]["rank"] == HIDDEN
    assert len(gene.provenance["sha256"]) == 3


def test_gene_round_trips_as_a_peft_adapter(family, tmp_path):
    paths, _, _ = family
    gene = extract(paths["aligned"], [paths["degraded1"]], rank=4)
    gene.save(tmp_path / "gene", base_model="tiny")
    config = json.loads((tmp_path / "gene/adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == "tiny"
    assert set(config["target_modules"]) == set(gene.modules)
    assert all(r == 4 for r in config["rank_pattern"].values())
    back = SafetyGene.load(tmp_path / "gene")
    for name, m in gene.modules.items():
        assert torch.equal(back.modules[name].A, m.A) and torch.equal(back.modules[name].B, m.B)
        assert back.modules[name].layer == m.layer
    with pytest.raises(OutputExistsError, match="already exists"):
        gene.save(tmp_path / "gene")


@pytest.mark.parametrize("piece", [None, 50])  # 50: a few whole rows per piece, ragged last piece
def test_apply_merged_matches_float64_reference(family, tmp_path, monkeypatch, piece):
    paths, models, dtype = family
    if piece:
        monkeypatch.setattr(pipeline, "PIECE", piece)
    gene = extract(paths["aligned"], [paths["degraded1"]], rank=5)
    coeffs = {"0": 0.5, "1": 1.5}  # layer 2 absent: unchanged
    out = apply_merged(paths["target"], gene, tmp_path / "merged", coeffs, max_shard_size=3000)
    assert json.loads((out / "config.json").read_text()) == {"model_type": "llama"}
    with Checkpoint(out) as merged:
        for name, t in models["target"].items():
            got = merged.read(name)
            module = gene.modules.get(name.removesuffix(".weight"))
            alpha = {0: 0.5, 1: 1.5}.get(module.layer, 0.0) if module else 0.0
            if alpha == 0.0:
                assert_bits_equal(got, t)
                continue
            exact = t.double() + alpha * (module.B.double() @ module.A.double())
            allowed = 1e-5 + (ulp(exact, dtype) if dtype != torch.float32 else 0)
            assert ((got.double() - exact).abs() <= allowed).all(), name


@pytest.mark.parametrize("piece", [None, 37])  # 37: many pieces with a ragged last one
def test_resta_is_bit_exact(family, tmp_path, monkeypatch, piece):
    paths, models, _ = family
    if piece:
        monkeypatch.setattr(pipeline, "PIECE", piece)
    out = resta(paths["target"], paths["aligned"], paths["degraded1"], 0.7, tmp_path / "resta")
    with Checkpoint(out) as merged:
        for name, t in models["target"].items():
            delta = models["aligned"][name].float() - models["degraded1"][name].float()
            assert_bits_equal(merged.read(name), (t.float() + 0.7 * delta).to(t.dtype))


def test_mismatched_checkpoints_are_refused(family, tmp_path):
    paths, models, _ = family
    other = dict(models["aligned"])
    other["model.layers.0.mlp.up_proj.weight"] = other["model.layers.0.mlp.up_proj.weight"][:-1]
    save(tmp_path / "odd", other)
    with pytest.raises(CheckpointError, match=r"odd: tensor 'model.layers.0.mlp.up_proj.weight' is .* \[36, 24\] but in"):
        extract(paths["aligned"], [tmp_path / "odd"], rank=2)
    with pytest.raises(CheckpointError, match="odd: tensor"):
        resta(paths["target"], paths["aligned"], tmp_path / "odd", 1.0, tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_nan_in_a_delta_is_refused_by_name(family, tmp_path):
    paths, models, _ = family
    poisoned = dict(models["degraded1"])
    name = "model.layers.1.mlp.down_proj.weight"
    poisoned[name] = poisoned[name].clone()
    poisoned[name][2, 3] = float("nan")
    save(tmp_path / "nan", poisoned)
    message = f"the delta of tensor '{name}' has 1 NaN or Inf values"
    with pytest.raises(CheckpointError, match=message):
        extract(paths["aligned"], [tmp_path / "nan"], rank=2)
    with pytest.raises(CheckpointError, match=message):
        resta(paths["target"], paths["aligned"], tmp_path / "nan", 1.0, tmp_path / "never")
    assert not (tmp_path / "never").exists()

    # Allowed, the bad entry's delta counts as 0: the merged weight keeps the target's value there.
    with pytest.warns(UserWarning, match=f"zeroed 1 NaN or Inf values in the delta of tensor '{name}'"):
        gene = extract(paths["aligned"], [tmp_path / "nan"], rank=2, allow_nonfinite=True)
    assert gene.provenance["nonfinite_zeroed"] == 1
    assert all(bool(torch.isfinite(m.B).all() and torch.isfinite(m.A).all()) for m in gene.modules.values())
    with pytest.warns(UserWarning, match="zeroed 1 NaN"):
        resta(paths["target"], paths["aligned"], tmp_path / "nan", 1.0, tmp_path / "out", allow_nonfinite=True)
    with Checkpoint(tmp_path / "out") as c:
        merged = c.read(name)
    t, a, d = models["target"][name], models["aligned"][name], poisoned[name]
    expected = (t.float() + (a.float() - d.float()).nan_to_num(0.0)).to(t.dtype)  # the fp32 op order
    assert_bits_equal(merged, expected)
