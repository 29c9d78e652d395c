"""Inputs a careless user gives that used to end in a silent no-op, an Inf checkpoint or a run
that never ends: each is now one sentence and exit status 1 (or 2 for a bad option), with no
output written."""

import pytest
from test_cli import error_of, family, gene  # noqa: F401  (fixtures)

import safegene_fast as sg
from safegene_fast.cli import main
from safegene_fast.method.selection import choose


@pytest.mark.parametrize("coeffs, problem", [
    ('{"99": 0.8}', "coefficient key '99' is neither a layer index"),
    ('{"model.layers.0.self_attn.q_proj.weight": 0.8}', "is neither a layer index"),  # the .weight typo
    ("{}", "zero for every module of the gene"),
    ('{"0": 0, "1": 0.0}', "zero for every module of the gene"),
])
def test_coefficients_that_land_nowhere(family, gene, capsys, tmp_path, coeffs, problem):  # noqa: F811
    path = tmp_path / "c.json"
    path.write_text(coeffs)
    for fmt in ("merged", "peft"):
        out = tmp_path / f"out-{fmt}"
        assert problem in error_of(capsys, ["apply", "--model", str(family["target"]), "--gene", str(gene),
                                            "--coeffs", str(path), "--format", fmt, "--out", str(out), "--quiet"])
        assert not out.exists()


@pytest.mark.parametrize("alpha", ["1e300", "-1e300", "0"])
def test_a_coefficient_that_overflows_or_does_nothing(family, gene, capsys, tmp_path, alpha):  # noqa: F811
    out = tmp_path / "out"
    line = error_of(capsys, ["apply", "--model", str(family["target"]), "--gene", str(gene), f"--alpha={alpha}",
                             "--out", str(out), "--quiet"])
    assert ("overflow float32" in line) if alpha != "0" else ("zero for every module" in line)
    assert not out.exists()


@pytest.mark.parametrize("flag, value", [("--power-iters", "10000000"), ("--power-iters", "-1"),
                                         ("--oversample", "100000")])
def test_sketch_settings_out_of_range(family, capsys, tmp_path, flag, value):  # noqa: F811
    out = tmp_path / "gene"
    line = error_of(capsys, ["extract", "--aligned", str(family["aligned"]), "--degraded", str(family["degraded"]),
                             "--out", str(out), flag, value, "--quiet"])
    assert "must be an integer from 0 to" in line and not out.exists()


def test_one_degraded_path_as_a_string(family):  # noqa: F811
    """``extract(A, "degraded/")`` means that one checkpoint, not the characters of its name."""
    extracted = sg.extract(family["aligned"], str(family["degraded"]), rank=2)
    assert extracted.provenance["degraded"] == [str(family["degraded"])] and extracted.modules


def test_a_threshold_that_keeps_no_layer():
    with pytest.raises(ValueError, match="no layer scores at least 1e\\+09"):
        choose({0: 0.1, 1: 0.3}, threshold=1e9)
    assert choose({0: 0.1, 1: 0.3}, threshold=0.2) == [1]


@pytest.mark.parametrize("value", ["-1", "0", "nan", "inf"])
def test_recalibrate_bound_must_be_positive(capsys, tmp_path, value):
    with pytest.raises(SystemExit) as exc:  # argparse: usage error, exit status 2
        main(["recalibrate", "--model", str(tmp_path), "--gene", str(tmp_path), "--out", str(tmp_path / "c.json"),
              "--alpha-max", value])
    assert exc.value.code == 2 and "--alpha-max" in capsys.readouterr().err
    with pytest.raises(ValueError, match="upper bound must be a positive number"):
        sg.recalibrate(None, None, sg.SafetyGene({}), sg.FewShot([], "", []), alpha_max=float(value))


# ----------------------------------------------------------------------------- checkpoints that lie

import json  # noqa: E402
import os  # noqa: E402
import struct  # noqa: E402

import torch  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from safetensors import safe_open  # noqa: E402

from safegene_fast.io import Checkpoint, CheckpointError  # noqa: E402

JSONISH = st.recursive(st.none() | st.booleans() | st.integers(-3, 40) | st.floats(allow_nan=True) | st.text(max_size=4),
                       lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=3), kids, max_size=3),
                       max_leaves=6)
ENTRY = st.fixed_dictionaries({}, optional={
    "dtype": st.sampled_from(["F32", "BF16", "F16", "I64", "Q4", 7]) | JSONISH,
    "shape": st.lists(st.integers(0, 4) | st.floats(0, 4) | st.text(max_size=2), max_size=3) | JSONISH,
    "data_offsets": st.lists(st.integers(-2, 40) | st.floats(-1, 40) | st.sampled_from(["0", "8"]), max_size=3) | JSONISH,
})


def write_raw(path, header: dict, data_len: int) -> None:
    raw = json.dumps(header).encode()  # NaN and Infinity are written as those bare words
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(data_len))


FUZZ = int(os.environ.get("SAFEGENE_FUZZ_EXAMPLES", "300"))  # make fuzz runs many more


@settings(max_examples=FUZZ, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(entries=st.dictionaries(st.text(min_size=1, max_size=3), ENTRY | JSONISH, min_size=1, max_size=3),
       metadata=st.none() | JSONISH, data_len=st.integers(0, 40))
def test_a_header_that_lies_is_refused_as_safetensors_refuses_it(tmp_path_factory, entries, metadata, data_len):
    """Whatever the header says, the reader either refuses the file with a CheckpointError or
    reads exactly what the safetensors library itself reads from it."""
    path = tmp_path_factory.mktemp("h") / "model.safetensors"
    header = dict(entries) if metadata is None else {"__metadata__": metadata, **entries}
    write_raw(path, header, data_len)
    try:
        with Checkpoint(path) as ckpt:
            ours = {n: ckpt.read(n) for n in ckpt.names}
    except CheckpointError as exc:
        assert str(exc).startswith(str(path)) and "\n" not in str(exc)
        return
    with safe_open(str(path), framework="pt") as f:  # accepted by us: safetensors must agree
        theirs = {n: f.get_tensor(n) for n in f.keys()}
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[n], theirs[n]) for n in ours)


@pytest.mark.parametrize("header, problem", [
    ({"__metadata__": [1], "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, "__metadata__ is not an object"),
    ({"w": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}}, "malformed"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": ["0", "8"]}}, "malformed"),
    ({"w": {"dtype": "F32", "shape": [True, 2], "data_offsets": [0, 8]}}, "malformed"),
    ({"w": {"dtype": "F32", "shape": [float("inf")], "data_offsets": [0, 8]}}, "not JSON"),
])
def test_coerced_header_values_are_refused(tmp_path, header, problem):
    path = tmp_path / "model.safetensors"
    write_raw(path, header, 8)
    with pytest.raises(CheckpointError, match=problem):
        Checkpoint(path)


def test_deeply_nested_json_is_an_error(tmp_path):
    path = tmp_path / "model.safetensors"
    raw = b"[" * 100_000 + b"]" * 100_000
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(CheckpointError, match="nested too deeply"):
        Checkpoint(path)


def sharded(folder, weight_map, shards):
    folder.mkdir()
    for name, tensors in shards.items():
        from safetensors.torch import save_file
        save_file(tensors, str(folder / name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


def test_index_problems(tmp_path):
    a, b = {"a": torch.zeros(2)}, {"b": torch.ones(2)}
    cases = [
        ("empty", {}, {"s1.safetensors": a}, "weight_map lists no tensors"),
        ("nonstring", {"a": 1}, {"s1.safetensors": a}, "shard name 1 is not a string"),
        ("twice", {"a": "s1.safetensors"}, {"s1.safetensors": a, "s2.safetensors": a}, "is also in"),
    ]
    for name, weight_map, shards, problem in cases:
        if name == "twice":  # both shards named in the index, both holding 'a'
            weight_map = {"a": "s1.safetensors", "b": "s2.safetensors"}
            shards = {"s1.safetensors": a, "s2.safetensors": {**a, **b}}
        with pytest.raises(CheckpointError, match=problem):
            Checkpoint(sharded(tmp_path / name, weight_map, shards))
    outside = tmp_path / "outside.safetensors"
    from safetensors.torch import save_file
    save_file(b, str(outside))
    folder = sharded(tmp_path / "linked", {"a": "s1.safetensors", "b": "s2.safetensors"}, {"s1.safetensors": a})
    (folder / "s2.safetensors").symlink_to(outside)
    with pytest.raises(CheckpointError, match="links to .*outside the checkpoint folder"):
        Checkpoint(folder)
    single = tmp_path / "single"
    single.mkdir()
    (single / "model.safetensors").symlink_to(outside)
    with pytest.raises(CheckpointError, match="outside the checkpoint folder"):
        Checkpoint(single)


NEAR_MISSES = st.sampled_from([2.0, "2", True, -1, 10**30, float("nan"), float("inf"), None, [2], 0, 1])


@settings(max_examples=FUZZ, deadline=None)
@given(field=st.sampled_from(["dtype", "shape0", "shape1", "begin", "end", "metadata"]), value=NEAR_MISSES,
       tail=st.integers(0, 8))
def test_a_near_miss_header_is_judged_like_safetensors_judges_it(tmp_path_factory, field, value, tail):
    """A valid two-tensor header with one value changed to a near miss (a float, a string, a
    boolean, out of range, NaN): accepted only when safetensors accepts it, with the same data."""
    entries = {"a": {"dtype": "F32", "shape": [2, 1], "data_offsets": [0, 8]},
               "b": {"dtype": "F32", "shape": [1, 2], "data_offsets": [8, 16]}}
    header = {"__metadata__": {"format": "pt"}, **entries}
    if field == "dtype":
        entries["b"]["dtype"] = value
    elif field.startswith("shape"):
        entries["b"]["shape"][int(field[-1])] = value
    elif field in ("begin", "end"):
        entries["b"]["data_offsets"][field == "end"] = value
    else:
        header["__metadata__"] = {"format": value}
    path = tmp_path_factory.mktemp("n") / "model.safetensors"
    write_raw(path, header, 16 + tail)
    try:
        with Checkpoint(path) as ckpt:
            ours = {n: ckpt.read(n) for n in ckpt.names}
    except CheckpointError:
        return
    with safe_open(str(path), framework="pt") as f:
        theirs = {n: f.get_tensor(n) for n in f.keys()}
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[n], theirs[n]) for n in ours)


# ----------------------------------------------------------------------------- options and gene files

def test_cuda_without_cuda_is_one_sentence(family, gene, capsys, tmp_path):  # noqa: F811
    import torch as _torch

    from safegene_fast import ops
    if ops.build_info()["cuda_built"] and _torch.cuda.is_available():
        pytest.skip("this machine can run CUDA")
    line = error_of(capsys, ["apply", "--model", str(family["target"]), "--gene", str(gene), "--out",
                             str(tmp_path / "o"), "--device", "cuda", "--quiet"])
    assert "built with CPU kernels only" in line or "sees no CUDA device" in line
    assert not (tmp_path / "o").exists()


def test_a_bad_module_pattern(family, capsys, tmp_path):  # noqa: F811
    line = error_of(capsys, ["extract", "--aligned", str(family["aligned"]), "--degraded", str(family["degraded"]),
                             "--out", str(tmp_path / "g"), "--include", "(", "--quiet"])
    assert "'(' is not a valid regular expression" in line


@pytest.mark.parametrize("size", ["9" * 400, "1e3GB", "0", "-5MB"])
def test_absurd_shard_sizes_are_usage_errors(family, gene, capsys, tmp_path, size):  # noqa: F811
    with pytest.raises(SystemExit) as exc:
        main(["apply", "--model", str(family["target"]), "--gene", str(gene), "--out", str(tmp_path / "o"),
              f"--max-shard-size={size}"])
    assert exc.value.code == 2 and "--max-shard-size" in capsys.readouterr().err


@pytest.mark.parametrize("damage, problem", [
    (lambda g: (g / "safegene.json").write_text("{not json"), "not a safety gene folder"),
    (lambda g: (g / "safegene.json").write_text('{"modules": 3}'), "lists no modules"),
    (lambda g: (g / "safegene.json").write_text("[" * 100_000), "not a safety gene folder"),
    (lambda g: (g / "adapter_model.safetensors").write_bytes(b"garbage!" * 4), "not a safety gene folder"),
    (lambda g: (g / "adapter_model.safetensors").unlink(), "not a safety gene folder"),
    (lambda g: g.joinpath("safegene.json").write_text(json.dumps(
        {**json.loads(g.joinpath("safegene.json").read_text()),
         "modules": {m: {**i, "layer": "x"} for m, i in json.loads(g.joinpath("safegene.json").read_text())["modules"].items()}})),
     "malformed entry for module"),
])
def test_a_broken_gene_is_one_sentence(family, gene, capsys, tmp_path, damage, problem):  # noqa: F811
    import shutil
    broken = tmp_path / "gene"
    shutil.copytree(gene, broken)
    damage(broken)
    line = error_of(capsys, ["apply", "--model", str(family["target"]), "--gene", str(broken), "--out",
                             str(tmp_path / "o"), "--quiet"])
    assert problem in line and not (tmp_path / "o").exists()


def test_gene_factors_with_nan_are_refused(family, gene, tmp_path):  # noqa: F811
    import shutil

    from safetensors.torch import load_file, save_file
    broken = tmp_path / "gene"
    shutil.copytree(gene, broken)
    tensors = load_file(str(broken / "adapter_model.safetensors"))
    first = sorted(tensors)[0]
    tensors[first][0, 0] = float("nan")
    save_file(tensors, str(broken / "adapter_model.safetensors"))
    with pytest.raises(CheckpointError, match="hold NaN or Inf values"):
        sg.SafetyGene.load(broken)
