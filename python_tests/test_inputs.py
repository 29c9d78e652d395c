"""Inputs as people have them: Hub ids from the local cache, checkpoints of mixed float dtypes,
pickle checkpoints refused with the reason, and a gene's fingerprints that identify content."""

import shutil

import huggingface_hub.constants
import pytest
import torch
from conftest import assert_bits_equal
from safetensors.torch import load_file, save_file
from test_cli import error_of, family, gene  # noqa: F401  (fixtures)

import safegene_fast as sg
from safegene_fast.cli import main
from safegene_fast.io import Checkpoint

REVISION = "0123456789abcdef0123456789abcdef01234567"


def read_all(path):
    with Checkpoint(path) as c:
        return {n: c.read(n) for n in c.names}


def recast(source, folder, dtype):
    """A copy of checkpoint ``source`` with every bfloat16 tensor stored as ``dtype`` (exact for float32)."""
    folder.mkdir(parents=True)
    tensors = {n: (t.to(dtype) if t.dtype == torch.bfloat16 else t) for n, t in read_all(source).items()}
    save_file(tensors, str(folder / "model.safetensors"))
    shutil.copy(source / "config.json", folder / "config.json")
    return folder


def test_a_hub_id_is_read_from_the_local_cache(family, gene, tmp_path, monkeypatch, capsys):  # noqa: F811
    cache = tmp_path / "hub"
    repo = cache / "models--acme--support-bot"
    shutil.copytree(family["target"], repo / "snapshots" / REVISION)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    out = tmp_path / "protected"
    assert main(["apply", "--model", "acme/support-bot", "--gene", str(gene), "--out", str(out), "--quiet"]) == 0
    sg.apply(family["target"], gene, tmp_path / "from-folder")
    for name, tensor in read_all(tmp_path / "from-folder").items():
        assert_bits_equal(read_all(out)[name], tensor)
    assert "base_model: acme/support-bot" in (out / "README.md").read_text()
    line = error_of(capsys, ["apply", "--model", "acme/other-bot", "--gene", str(gene), "--out",
                             str(tmp_path / "o2"), "--quiet"])
    assert line == ("safegene: error: acme/other-bot: no such folder, and no Hub model of that id in the local "
                    "cache; download it first (hf download acme/other-bot).")
    assert not (tmp_path / "o2").exists()


@pytest.mark.parametrize("path", ["nothing-here", "../up/and-away", "a/b/c"])
def test_a_missing_path_that_is_no_hub_id(path, gene, capsys, tmp_path):  # noqa: F811
    assert error_of(capsys, ["apply", "--model", path, "--gene", str(gene), "--out", str(tmp_path / "o"),
                             "--quiet"]) == f"safegene: error: {path}: no such file or folder."


def test_pickle_weights_are_refused_with_the_reason(tmp_path, gene, capsys):  # noqa: F811
    folder = tmp_path / "old-model"
    folder.mkdir()
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not loaded")
    line = error_of(capsys, ["apply", "--model", str(folder), "--gene", str(gene), "--out", str(tmp_path / "o"),
                             "--quiet"])
    assert "holds PyTorch pickle weights (pytorch_model.bin), which can run code when loaded" in line
    assert "save_pretrained" in line


def test_mixed_float_dtypes_give_what_one_dtype_gives(family, tmp_path):  # noqa: F811
    """float32 copies of bfloat16 checkpoints hold the same values: every result is bit-identical,
    and outputs keep the target's dtype."""
    aligned32 = recast(family["aligned"], tmp_path / "aligned32", torch.float32)
    degraded32 = recast(family["degraded"], tmp_path / "degraded32", torch.float32)
    same = sg.extract(family["aligned"], [family["degraded"]], rank=4)
    mixed = sg.extract(family["aligned"], [degraded32], rank=4)
    for name, m in same.modules.items():
        assert_bits_equal(mixed.modules[name].B, m.B)
        assert_bits_equal(mixed.modules[name].A, m.A)
    sg.resta(family["target"], family["aligned"], family["degraded"], 0.5, tmp_path / "resta")
    sg.resta(family["target"], aligned32, family["degraded"], 0.5, tmp_path / "resta-mixed")
    expected = read_all(tmp_path / "resta")
    for name, tensor in read_all(tmp_path / "resta-mixed").items():
        assert_bits_equal(tensor, expected[name])


def test_int_tensors_must_still_match(family, tmp_path):  # noqa: F811
    tensors = read_all(family["degraded"])
    tensors["extra.counter"] = torch.arange(3, dtype=torch.int32)
    folder = tmp_path / "d"
    folder.mkdir()
    save_file(tensors, str(folder / "model.safetensors"))
    aligned = read_all(family["aligned"])
    aligned["extra.counter"] = torch.arange(3, dtype=torch.int64)
    (tmp_path / "a").mkdir()
    save_file(aligned, str(tmp_path / "a" / "model.safetensors"))
    with pytest.raises(ValueError, match="tensor 'extra.counter' is torch.int32 .* it is torch.int64"):
        sg.extract(tmp_path / "a", [folder], rank=2)


def test_fingerprints_identify_content(family, tmp_path):  # noqa: F811
    copy = shutil.copytree(family["degraded"], tmp_path / "copy")
    gene = sg.extract(family["aligned"], [family["degraded"], copy], rank=2)
    digests = gene.provenance["sha256"]
    assert digests[str(family["degraded"])] == digests[str(copy)] != digests[str(family["aligned"])]
    tensors = load_file(str(next(copy.glob("*.safetensors"))))
    name = next(n for n in tensors if ".layers.0." in n and n.endswith("proj.weight"))
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] += 1
    save_file(tensors, str(next(copy.glob("*.safetensors"))), metadata={"format": "pt"})
    changed = sg.extract(family["aligned"], [family["degraded"], copy], rank=2).provenance["sha256"]
    assert changed[str(copy)] != digests[str(copy)] and changed[str(family["degraded"])] == digests[str(family["degraded"])]
