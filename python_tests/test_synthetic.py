"""Generated Llama-shaped families (safegene_fast.models.synthetic) on the tiny shape."""

import hashlib
import json

import pytest
import torch

from safegene_fast.io import Checkpoint
from safegene_fast.models import synthetic
from safegene_fast.models.synthetic import SHAPES, write_family

TINY = SHAPES["llama-tiny"]


def digest(folder):
    """sha256 over every file of a checkpoint folder, by name."""
    h = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return write_family(tmp_path_factory.mktemp("tiny"), "llama-tiny", max_shard_size=2_000_000)


def test_layout_and_config(family):
    with Checkpoint(family["aligned"]) as c:
        assert {n: i.shape for n, i in c.tensors.items()} == dict(TINY.tensors())
        assert all(i.dtype == torch.bfloat16 for i in c.tensors.values())
        assert len({i.file for i in c.tensors.values()}) > 1  # sharded, with an index
    assert (family["aligned"] / "model.safetensors.index.json").is_file()
    assert sum(1 for _ in family["aligned"].iterdir()) >= 3
    config = json.loads((family["target"] / "config.json").read_text())
    assert config["num_key_value_heads"] == 2 and config["model_type"] == "llama"


def test_deterministic_and_independent_of_other_members(family, tmp_path):
    again = write_family(tmp_path / "a", "llama-tiny", max_shard_size=2_000_000)
    for m in ("aligned", "degraded", "target"):
        assert digest(again[m]) == digest(family[m])
    alone = write_family(tmp_path / "b", "llama-tiny", members=("target",), max_shard_size=2_000_000)
    assert digest(alone["target"]) == digest(family["target"])
    other = write_family(tmp_path / "c", "llama-tiny", seed=1, members=("aligned",), max_shard_size=2_000_000)
    assert digest(other["aligned"]) != digest(family["aligned"])


def test_float32_members_do_not_share_memory_with_the_writer(tmp_path):
    """float32 needs no conversion: each member's values must still reach its writer as a copy,
    since the writer writes in the background while the next member is built in the same buffer."""
    together = write_family(tmp_path / "all", "llama-tiny", dtype=torch.float32)
    for member in ("degraded", "target"):
        alone = write_family(tmp_path / member, "llama-tiny", dtype=torch.float32, members=(member,))
        assert digest(alone[member]) == digest(together[member]), member


def test_loads_in_transformers(family):
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(family["degraded"], dtype=torch.bfloat16)
    assert type(model).__name__ == "LlamaForCausalLM"
    with Checkpoint(family["degraded"]) as c:
        for name in ("model.layers.1.self_attn.k_proj.weight", "lm_head.weight", "model.norm.weight"):
            assert torch.equal(model.state_dict()[name], c.read(name))
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 7, 9]])).logits
    assert logits.shape == (1, 4, TINY.vocab) and bool(torch.isfinite(logits).all())


@pytest.mark.parametrize("name", ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"])
def test_safety_delta_is_nearly_low_rank(family, name):
    with Checkpoint(family["aligned"]) as a, Checkpoint(family["degraded"]) as d, \
            Checkpoint(family["target"]) as t:
        w_a, w_d, w_t = a.read(name).double(), d.read(name).double(), t.read(name).double()
    s = torch.linalg.svdvals(w_a - w_d)
    energy = s.square().cumsum(0) / s.square().sum()
    r = synthetic.PERTURB_RANK
    assert energy[r - 1] > 0.97       # rank 8 keeps almost all of A - D
    assert energy[r - 2] < 0.97       # and fewer components do not
    assert s[r] < 0.1 * s[r - 1]      # a clear gap after rank 8
    # entries: the safety perturbation is about 10% of a weight
    assert 0.05 < float((w_a - w_d).std() / w_a.std()) < 0.2
    # the target's own perturbation points elsewhere
    cos = torch.nn.functional.cosine_similarity((w_t - w_a).flatten(), (w_a - w_d).flatten(), dim=0)
    assert abs(float(cos)) < 0.1


def test_cache_is_reused_and_interrupted_runs_regenerate(tmp_path, monkeypatch):
    root = tmp_path / "fam"
    first = write_family(root, "llama-tiny")
    before = {m: (p / "model.safetensors").stat().st_mtime_ns for m, p in first.items()}

    def boom(*args, **kwargs):
        raise AssertionError("regenerated although the cache matches")

    with monkeypatch.context() as mp:
        mp.setattr(synthetic, "_generate", boom)
        assert write_family(root, "llama-tiny") == first
    assert {m: (p / "model.safetensors").stat().st_mtime_ns for m, p in first.items()} == before

    # a run killed while writing: no stamp entry for the member -> it is written again
    stamp = json.loads((root / ".synthetic.json").read_text())
    del stamp["members"]["target"]
    (root / ".synthetic.json").write_text(json.dumps(stamp))
    calls = []
    real = synthetic._generate
    with monkeypatch.context() as mp:
        mp.setattr(synthetic, "_generate", lambda root, s, dtype, seed, members, *a: (
            calls.append(members), real(root, s, dtype, seed, members, *a)))
        write_family(root, "llama-tiny")
        assert calls == [["target"]]
        # another dtype is another family: regenerated
        write_family(root, "llama-tiny", dtype=torch.float32, members=("aligned",))
        assert calls[-1] == ["aligned"]
    with Checkpoint(first["aligned"]) as c:
        assert c.tensors["lm_head.weight"].dtype == torch.float32


def test_failed_generation_leaves_nothing_that_looks_finished(tmp_path, monkeypatch):
    root = tmp_path / "fam"

    def fail(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(synthetic, "_member_tensor", fail)
    with pytest.raises(RuntimeError):
        write_family(root, "llama-tiny")
    assert sorted(p.name for p in root.iterdir()) == [".synthetic.json", ".synthetic.lock"]
    assert json.loads((root / ".synthetic.json").read_text())["members"] == {}


def test_unknown_shape_and_member():
    with pytest.raises(ValueError, match="unknown synthetic shape"):
        write_family("/nonexistent", "llama-1t")
    with pytest.raises(ValueError, match="names no role"):
        write_family("/nonexistent", "llama-tiny", members=("base",))


def test_shapes_project_to_the_real_models():
    seven, seventy = SHAPES["llama-7b-2layers"], SHAPES["llama-70b-2layers"]
    assert abs(seven.full_nbytes() / 2 - 6.74e9) < 0.01e9      # Llama-2-7B: 6.74 B parameters
    assert abs(seventy.full_nbytes() / 2 - 68.98e9) < 0.05e9   # Llama-2-70B: 68.98 B parameters
