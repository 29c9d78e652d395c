"""Every dtype safetensors stores is read, written and passed through byte for byte; NaN and Inf in
a target, or made by a merge that overflows, never reach an output unannounced."""

import json
import math
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from test_cli import error_of, family, gene  # noqa: F401  (fixtures)

import safegene_fast as sg
from safegene_fast import pipeline
from safegene_fast.cli import main
from safegene_fast.gene import GeneModule, SafetyGene
from safegene_fast.io import Checkpoint, CheckpointError, Planned, ShardedWriter
from safegene_fast.models.synthetic import write_family
from safegene_fast.pipeline import KERNEL_DTYPES

# Every dtype the reader takes, by the name safetensors writes for it.
SAFETENSORS_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.float8_e4m3fnuz: "F8_E4M3FNUZ",
    torch.float8_e5m2fnuz: "F8_E5M2FNUZ", torch.float8_e8m0fnu: "F8_E8M0", torch.complex64: "C64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint64: "U64", torch.uint32: "U32", torch.uint16: "U16", torch.uint8: "U8", torch.bool: "BOOL",
}
# Empty, scalar, odd and empty-inside shapes.
ODD_SHAPES = [(0,), (), (7,), (3, 0, 2), (5, 13)]
MERGED = "model.layers.1.mlp.down_proj.weight"  # a module of the gene
COPIED = "model.norm.weight"                    # a floating tensor no merge touches


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(as_bytes(a), as_bytes(b))


def raw_values(dtype, shape, seed) -> torch.Tensor:
    """Random bytes seen as ``dtype`` (NaN and Inf bit patterns included, 0/1 for bool), or random
    normal values for the dtypes a merge computes on, which must stay finite."""
    g = torch.Generator().manual_seed(seed)
    numel = math.prod(shape)
    if dtype in KERNEL_DTYPES:
        return torch.randn(shape, generator=g).to(dtype)
    high = 2 if dtype == torch.bool else 256
    return torch.randint(0, high, (numel * dtype.itemsize,), generator=g, dtype=torch.uint8).view(dtype).reshape(shape)


def every_dtype(seed=0) -> dict[str, torch.Tensor]:
    return {f"extra.{SAFETENSORS_NAMES[dtype].lower()}.{'x'.join(map(str, shape)) or 'scalar'}":
            raw_values(dtype, shape, seed + 100 * i + j)
            for i, dtype in enumerate(SAFETENSORS_NAMES) for j, shape in enumerate(ODD_SHAPES)}


def header_dtypes(path) -> dict[str, str]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__", None)
    return {name: entry["dtype"] for name, entry in header.items()}


def theirs(path) -> dict[str, torch.Tensor]:
    """What the safetensors library reads from a file."""
    with safe_open(str(path), framework="pt") as f:
        return {n: f.get_tensor(n) for n in f.keys()}


def read_all(path) -> dict[str, torch.Tensor]:
    with Checkpoint(path) as c:
        return {n: c.read(n) for n in c.names}


def save_model(folder, tensors):
    folder.mkdir(parents=True)
    save_file({n: t.contiguous() for n, t in tensors.items()}, str(folder / "model.safetensors"))
    return folder


def nothing_left(outs) -> bool:
    """No output, no hidden temporary and no lock beside where the output would have been."""
    return not outs.exists() or not any(outs.iterdir())


# ----------------------------------------------------------------------------- every dtype, read and written

def test_every_dtype_reads_as_safetensors_reads_it(tmp_path):
    tensors = every_dtype()
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path))
    assert set(header_dtypes(path).values()) == set(SAFETENSORS_NAMES.values())
    reference = theirs(path)
    with Checkpoint(path) as ckpt:
        assert {n: info.dtype for n, info in ckpt.tensors.items()} == {n: t.dtype for n, t in tensors.items()}
        for ring in (0, 3):
            for name, ours in ckpt.iter_tensors(ckpt.names, ring=ring):
                assert same_bytes(ours, reference[name]), (ring, name)
        for name, expected in reference.items():
            assert same_bytes(ckpt.read(name), expected) and same_bytes(ckpt.view(name), expected), name
            numel = expected.numel()
            if numel > 2:  # a range that starts and ends inside the tensor
                middle = expected.reshape(-1)[1:numel - 1]
                assert same_bytes(ckpt.read(name, start=1, count=numel - 2), middle), name
                assert same_bytes(ckpt.view(name, 1, numel - 2), middle), name
            ckpt.release(name)


def test_every_dtype_is_written_as_safetensors_writes_it(tmp_path):
    tensors = every_dtype(seed=1)
    save_file(tensors, str(tmp_path / "reference.safetensors"))
    their_names = header_dtypes(tmp_path / "reference.safetensors")
    plan = [Planned(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    with ShardedWriter(tmp_path / "out", plan, max_shard_size=64) as writer:  # many shards
        for name, t in tensors.items():
            writer.write(name, t)
    shards = sorted((tmp_path / "out").glob("model-*-of-*.safetensors"))
    assert len(shards) > 3
    read_back = {}
    for shard in shards:
        assert all(their_names[n] == dtype for n, dtype in header_dtypes(shard).items())
        read_back.update(theirs(shard))
    assert read_back.keys() == tensors.keys()
    assert all(same_bytes(read_back[n], t) for n, t in tensors.items())


def test_a_dtype_safetensors_cannot_store_is_refused_before_anything_is_written(tmp_path):
    outs = tmp_path / "outs"
    plan = [Planned("fine", torch.float32, (2,)), Planned("complex", torch.complex128, (2,))]
    with pytest.raises(CheckpointError, match=r"tensor 'complex' is torch.complex128, which safetensors cannot store"):
        ShardedWriter(outs / "out", plan)
    assert nothing_left(outs)


def test_a_sub_byte_dtype_is_refused_by_name(tmp_path):
    """F4 headers count 4-bit elements; read as bytes they would be misplaced, so they are refused."""
    path = tmp_path / "model.safetensors"
    save_file({"packed": torch.zeros(4, dtype=torch.uint8).view(torch.float4_e2m1fn_x2)}, str(path))
    assert header_dtypes(path) == {"packed": "F4"}
    with pytest.raises(CheckpointError, match=r"tensor 'packed' has a malformed or unsupported header entry"):
        Checkpoint(path)


# ----------------------------------------------------------------------------- every dtype through apply and resta

def with_extras(source, folder, seed):
    """The checkpoint at ``source`` plus one tensor of every dtype and odd shape."""
    return save_model(folder, {**read_all(source), **every_dtype(seed)})


def test_apply_and_resta_pass_every_dtype_through(family, gene, capsys, tmp_path):  # noqa: F811
    extras = every_dtype(seed=0)
    # NaN and Inf outside bfloat16, float16 and float32 are no merge's business: passed through
    extras["extra.f64.7"][2] = math.nan
    extras["extra.f8_e5m2.5x13"][1, 3] = -math.inf
    target = save_model(tmp_path / "target", {**read_all(family["target"]), **extras})
    # aligned and degraded differ from the target in every extra: a merge would show
    aligned = with_extras(family["aligned"], tmp_path / "aligned", seed=1)
    degraded = with_extras(family["degraded"], tmp_path / "degraded", seed=2)
    before = theirs(target / "model.safetensors")
    assert main(["apply", "--model", str(target), "--gene", str(gene), "--alpha", "0.5",
                 "--out", str(tmp_path / "applied"), "--max-shard-size", "100KB", "--quiet"]) == 0
    assert main(["resta", "--model", str(target), "--aligned", str(aligned), "--degraded", str(degraded),
                 "--alpha", "0.3", "--out", str(tmp_path / "resta"), "--quiet"]) == 0
    sg.apply(family["target"], gene, tmp_path / "applied-plain", 0.5)
    sg.resta(family["target"], family["aligned"], family["degraded"], 0.3, tmp_path / "resta-plain")
    plain_applied, plain_resta = read_all(tmp_path / "applied-plain"), read_all(tmp_path / "resta-plain")
    applied, restaed = read_all(tmp_path / "applied"), read_all(tmp_path / "resta")
    assert applied.keys() == restaed.keys() == before.keys()
    a_extras, d_extras = every_dtype(seed=1), every_dtype(seed=2)
    for name, t in before.items():
        assert same_bytes(applied[name], plain_applied.get(name, t)), name  # the gene touches no extra
        if not name.startswith("extra."):
            assert same_bytes(restaed[name], plain_resta[name]), name
        elif t.dtype in KERNEL_DTYPES:  # merged, in merge_diff's float32 order
            a, d = a_extras[name], d_extras[name]
            assert same_bytes(restaed[name], (t.float() + 0.3 * (a.float() - d.float())).to(t.dtype)), name
        else:  # float64, float8, integers, bool, complex: the target's bytes
            assert same_bytes(restaed[name], t), name
    assert not same_bytes(plain_applied[MERGED], before[MERGED])  # the merge did happen


def test_extract_refuses_selected_weights_the_kernels_cannot_factor(tmp_path, capsys):
    """A quantized checkpoint (float8, integer weights) or float64 weights are not left out of the
    gene in silence: extract names them, and factors the rest once they are excluded."""
    def model(seed):
        g = torch.Generator().manual_seed(seed)
        return {f"model.layers.0.mlp.{SAFETENSORS_NAMES[dtype].lower()}.weight":
                torch.randn(9, 7, generator=g).to(dtype)
                for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64,
                              torch.float8_e4m3fn, torch.float8_e5m2, torch.int8)}
    aligned, degraded = save_model(tmp_path / "a", model(0)), save_model(tmp_path / "d", model(1))
    line = error_of(capsys, ["extract", "--aligned", str(aligned), "--degraded", str(degraded), "--out",
                             str(tmp_path / "g"), "--quiet"])
    assert line == (f"safegene: error: {aligned}: 4 of the selected weights, first 'model.layers.0.mlp.f64.weight', "
                    f"are not bfloat16, float16 or float32 (float64: a quantized checkpoint?), and a gene is factored "
                    f"only from those; dequantize the checkpoint first, or leave them out with --exclude.")
    assert not (tmp_path / "g").exists()
    assert main(["extract", "--aligned", str(aligned), "--degraded", str(degraded), "--out", str(tmp_path / "g"),
                 "--rank", "2", "--exclude", r"mlp\.(f64|f8_e4m3|f8_e5m2|i8)\.", "--quiet"]) == 0
    assert sorted(SafetyGene.load(tmp_path / "g").modules) == [f"model.layers.0.mlp.{n}" for n in ("bf16", "f16", "f32")]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float8_e4m3fn, torch.float8_e5m2, torch.int8])
@pytest.mark.parametrize("fmt", ["merged", "peft"])
def test_a_gene_aimed_at_a_weight_of_another_dtype_is_refused(family, gene, capsys, tmp_path, dtype, fmt):  # noqa: F811
    tensors = read_all(family["target"])
    tensors[MERGED] = tensors[MERGED].float().to(dtype)
    target, outs = save_model(tmp_path / "target", tensors), tmp_path / "outs"
    line = error_of(capsys, ["apply", "--model", str(target), "--gene", str(gene), "--format", fmt,
                             "--out", str(outs / "out"), "--quiet"])
    assert line == (f"safegene: error: {target}: tensor '{MERGED}', which the gene targets, is "
                    f"{str(dtype).removeprefix('torch.')}, and a gene merges only into bfloat16, float16 or "
                    f"float32 weights.")
    assert nothing_left(outs)


# ----------------------------------------------------------------------------- NaN and Inf in the target

NAN_WITH_PAYLOAD = {torch.bfloat16: 0x7FC5, torch.float16: 0x7E05}  # quiet NaNs that are not the default one


def poisoned_target(source, folder, name, where=(3, -5)):
    """``source`` with a NaN (with a payload) and a -Inf in tensor ``name``, at these flat indices."""
    tensors = read_all(source)
    t = tensors[name].clone()
    flat = t.view(-1)
    flat[where[0]] = torch.tensor(NAN_WITH_PAYLOAD[t.dtype], dtype=torch.int16).view(t.dtype)
    flat[where[1]] = -math.inf
    tensors[name] = t
    return save_model(folder, tensors), t


def bits_where(t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16)[mask]


@pytest.mark.parametrize("name", [MERGED, COPIED, "lm_head.weight"])
@pytest.mark.parametrize("command", ["apply", "resta"])
def test_nan_or_inf_in_the_target_is_refused_by_name(family, gene, capsys, tmp_path, name, command):  # noqa: F811
    target, _ = poisoned_target(family["target"], tmp_path / "target", name)
    outs = tmp_path / "outs"
    argv = (["apply", "--gene", str(gene), "--alpha", "0.5"] if command == "apply" else
            ["resta", "--aligned", str(family["aligned"]), "--degraded", str(family["degraded"]), "--alpha", "0.3"])
    line = error_of(capsys, argv + ["--model", str(target), "--out", str(outs / "out"), "--quiet"])
    assert line.startswith(f"safegene: error: {target}: tensor '{name}' has 2 NaN or Inf values. "
                           f"Pass --allow-nonfinite")
    assert nothing_left(outs)


@pytest.mark.parametrize("name", [MERGED, COPIED])
def test_allowed_nan_or_inf_in_the_target_is_kept_bit_for_bit(family, gene, capsys, tmp_path, name):  # noqa: F811
    target, poisoned = poisoned_target(family["target"], tmp_path / "target", name)
    bad = ~torch.isfinite(poisoned)
    with pytest.warns(UserWarning, match=rf"{target}: kept 2 NaN or Inf values in tensor '{name}'\."):
        sg.apply(target, gene, tmp_path / "applied", 0.5, allow_nonfinite=True)
    sg.apply(family["target"], gene, tmp_path / "clean-applied", 0.5)
    assert main(["resta", "--model", str(target), "--aligned", str(family["aligned"]), "--degraded",
                 str(family["degraded"]), "--alpha", "0.3", "--out", str(tmp_path / "restaed"),
                 "--allow-nonfinite", "--quiet"]) == 0
    assert (f"safegene: warning: {target}: kept 2 NaN or Inf values in tensor '{name}'."
            in capsys.readouterr().err)
    sg.resta(family["target"], family["aligned"], family["degraded"], 0.3, tmp_path / "clean-restaed")
    for output, clean in (("applied", "clean-applied"), ("restaed", "clean-restaed")):
        ours, theirs_clean = read_all(tmp_path / output), read_all(tmp_path / clean)
        assert torch.equal(bits_where(ours[name], bad), bits_where(poisoned, bad)), output
        assert torch.equal(bits_where(ours[name], ~bad), bits_where(theirs_clean[name], ~bad)), output
        assert all(same_bytes(ours[n], theirs_clean[n]) for n in ours if n != name), output


@pytest.mark.parametrize("name", [MERGED, "lm_head.weight"])
def test_counts_cover_every_piece_of_a_tensor(family, gene, capsys, tmp_path, monkeypatch, name):  # noqa: F811
    """A tensor streamed in many pieces, with NaN and Inf in different ones: the count is the tensor's."""
    monkeypatch.setattr(pipeline, "PIECE", 1000)
    rows, cols = read_all(family["target"])[name].shape
    assert rows > 200 and cols > 200
    target, _ = poisoned_target(family["target"], tmp_path / "target", name, where=(0, 200 * cols + 200))
    for argv in (["apply", "--gene", str(gene)],
                 ["resta", "--aligned", str(family["aligned"]), "--degraded", str(family["degraded"]), "--alpha", "1"]):
        line = error_of(capsys, argv + ["--model", str(target), "--out", str(tmp_path / "outs" / "out"), "--quiet"])
        assert f"{target}: tensor '{name}' has 2 NaN or Inf values." in line
    assert nothing_left(tmp_path / "outs")


# ----------------------------------------------------------------------------- merges that overflow

@pytest.fixture(scope="module")
def half_family(tmp_path_factory):
    return write_family(tmp_path_factory.mktemp("half"), "llama-tiny", dtype=torch.float16)


def huge_gene(folder, family_paths):
    """One module whose B @ A is 3e38 everywhere: finite in float32, and so is 1.133 * B, but
    W + 1.133 * B @ A = 3.399e38 rounds past bfloat16's largest value (3.3895e38) to Inf."""
    with Checkpoint(family_paths["target"]) as ckpt:
        rows, cols = ckpt.tensors[MERGED].shape
    module = MERGED.removesuffix(".weight")
    factors = GeneModule(torch.ones(rows, 1), torch.full((1, cols), 3e38), torch.ones(1), 1.0, 1)
    return SafetyGene({module: factors}).save(folder)


@pytest.mark.parametrize("allow", [False, True])
def test_a_merge_that_overflows_bfloat16_is_always_an_error(family, capsys, tmp_path, allow):  # noqa: F811
    gene_folder, alpha = huge_gene(tmp_path / "gene", family), 1.133
    (module,) = SafetyGene.load(gene_folder).modules.values()
    assert torch.isfinite(module.scaled_B(alpha)).all()  # what the coefficient check looks at
    rows, cols = module.B.shape[0], module.A.shape[1]
    # the target's own NaN and Inf in the same tensor are not counted as the merge's
    target, _ = poisoned_target(family["target"], tmp_path / "target", MERGED)
    outs = tmp_path / "outs"
    with pytest.raises(pipeline.MergeOverflowError) as caught:
        sg.apply(target, gene_folder, outs / "api", alpha, allow_nonfinite=allow)
    assert str(caught.value) == (f"{target}: merging tensor '{MERGED}' with coefficient 1.133 overflows bfloat16 in "
                                 f"{rows * cols - 2} values: the coefficient is too large for this dtype.")
    line = error_of(capsys, ["apply", "--model", str(family["target"]), "--gene", str(gene_folder),
                             "--alpha", str(alpha), "--out", str(outs / "cli"), "--quiet"])
    assert line == (f"safegene: error: {family['target']}: merging tensor '{MERGED}' with coefficient 1.133 "
                    f"overflows bfloat16 in {rows * cols} values: the coefficient is too large for this dtype.")
    assert nothing_left(outs)


def test_a_merge_that_overflows_float16_is_an_error(half_family, gene, capsys, tmp_path):  # noqa: F811
    """The gene (float32 factors) fits; alpha * B is finite; W + alpha * B @ A is not, in float16."""
    alpha = 1e30
    loaded = SafetyGene.load(gene)
    assert all(torch.isfinite(m.scaled_B(alpha)).all() for m in loaded.modules.values())
    target = read_all(half_family["target"])
    first = next(n for n in target if n.removesuffix(".weight") in loaded.modules)  # the first merged, in file order
    m = loaded.modules[first.removesuffix(".weight")]
    expected = int((~torch.isfinite((target[first].float() + m.scaled_B(alpha) @ m.A).half())).sum())
    assert expected > 0
    outs = tmp_path / "outs"
    line = error_of(capsys, ["apply", "--model", str(half_family["target"]), "--gene", str(gene),
                             "--alpha", "1e30", "--out", str(outs / "out"), "--quiet"])
    assert line == (f"safegene: error: {half_family['target']}: merging tensor '{first}' with coefficient 1e+30 "
                    f"overflows float16 in {expected} values: the coefficient is too large for this dtype.")
    assert nothing_left(outs)


@pytest.mark.parametrize("members, alpha, dtype_name", [("family", "1e39", "bfloat16"),  # past float32 itself
                                                       ("half_family", "1e9", "float16")])
@pytest.mark.parametrize("allow", [False, True])
def test_a_resta_that_overflows_is_always_an_error(request, capsys, tmp_path, members, alpha, dtype_name, allow):
    paths = request.getfixturevalue(members)
    target, aligned, degraded = (read_all(paths[m]) for m in ("target", "aligned", "degraded"))
    scale = torch.tensor(float(alpha), dtype=torch.float32)  # merge_diff scales in float32, as torch does
    made = {n: int((~torch.isfinite((t.float() + scale * (aligned[n].float() - degraded[n].float())).to(t.dtype))).sum())
            for n, t in target.items()}
    first, count = next((n, c) for n, c in made.items() if c)  # the first tensor written that overflows
    outs = tmp_path / "outs"
    line = error_of(capsys, ["resta", "--model", str(paths["target"]), "--aligned", str(paths["aligned"]),
                             "--degraded", str(paths["degraded"]), "--alpha", alpha, "--out", str(outs / "out"),
                             "--quiet", *(["--allow-nonfinite"] if allow else [])])
    assert line == (f"safegene: error: {paths['target']}: merging tensor '{first}' with coefficient {float(alpha):g} "
                    f"overflows {dtype_name} in {count} values: the coefficient is too large for this dtype.")
    assert nothing_left(outs)


def test_apply_keeps_the_targets_nan_or_inf_only_when_allowed(family, gene, capsys, tmp_path):  # noqa: F811
    for name in (MERGED, COPIED):
        target, _ = poisoned_target(family["target"], tmp_path / name, name)
        argv = ["apply", "--model", str(target), "--gene", str(gene), "--out", str(tmp_path / f"outs-{name}" / "out"),
                "--quiet"]
        assert error_of(capsys, argv) == (f"safegene: error: {target}: tensor '{name}' has 2 NaN or Inf values. "
                                          f"Pass --allow-nonfinite to keep them.")
        assert nothing_left(tmp_path / f"outs-{name}")
        assert main(argv + ["--allow-nonfinite"]) == 0
        assert f"safegene: warning: {target}: kept 2 NaN or Inf values in tensor '{name}'." in capsys.readouterr().err
