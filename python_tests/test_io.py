"""Checkpoint I/O: the reader's validation, pread-based reads, and the atomic sharded writer."""

import errno
import json
import struct
from pathlib import Path

import pytest
import torch
from conftest import peak_rss_growth
from safetensors.torch import load_file, save_file

from safegene_fast.io import (
    Checkpoint,
    CheckpointError,
    OutputExistsError,
    UnsafeOutputError,
    Planned,
    ShardedWriter,
    check_same_layout,
)


def tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "model.embed_tokens.weight": torch.randn(11, 6, generator=g).to(torch.bfloat16),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(6, 6, generator=g).to(torch.float16),
        "model.layers.0.mlp.down_proj.weight": torch.randn(6, 13, generator=g),
        "model.norm.weight": torch.ones(6, dtype=torch.bfloat16),
        "scalar": torch.tensor(3.0),
    }


def write_sharded(folder: Path, ts: dict, per_shard: int = 2) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    names = list(ts)
    groups = [names[i:i + per_shard] for i in range(0, len(names), per_shard)]
    weight_map = {}
    for i, group in enumerate(groups):
        shard = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({n: ts[n] for n in group}, str(folder / shard))
        weight_map.update({n: shard for n in group})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


def raw_file(path: Path, header: dict, data: bytes, header_len: int | None = None) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data)
    return path


@pytest.mark.parametrize("ring", [0, 2, 3])
@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_reads_every_tensor_exactly(tmp_path, layout, ring):
    ts = tensors()
    if layout == "single":
        save_file(ts, str(tmp_path / "model.safetensors"))
    else:
        write_sharded(tmp_path, ts)
    with Checkpoint(tmp_path) as ckpt:
        assert sorted(ckpt.names) == sorted(ts)
        previous = None
        for name, t in ckpt.iter_tensors(sorted(ts), ring=ring):
            assert t.dtype == ts[name].dtype and torch.equal(t, ts[name])
            if previous is not None and ring != 2:  # valid until ring - 1 more are asked for
                assert torch.equal(previous[1], ts[previous[0]])
            previous = name, t


def test_views_and_release(tmp_path):
    """view: a tensor (or a range of its elements) in place through a mapping of its shard,
    equal to what read gives; release drops the mapped pages from RSS, views stay valid."""
    ts = {"a": torch.randn(37, 101).to(torch.bfloat16), "b": torch.arange(1000, dtype=torch.int64),
          "c": torch.randn(3000), "e": torch.zeros(0, 4)}
    save_file(ts, str(tmp_path / "model.safetensors"))
    with Checkpoint(tmp_path) as ckpt:
        for name, t in ts.items():
            v = ckpt.view(name)
            assert v.dtype == t.dtype and torch.equal(v, t)
        piece = ckpt.view("a", 100, 250)
        assert piece.shape == (250,) and torch.equal(piece, ts["a"].view(-1)[100:350])
        ckpt.release("a", 100, 250)
        assert torch.equal(piece, ts["a"].view(-1)[100:350])  # touched again after release
        ckpt.prefetch("c")
        big = ckpt.view("c")
        ckpt.release("c")
        assert torch.equal(big, ts["c"])
    del piece, big, v  # the mapping goes with the last view


def test_release_returns_mapped_pages(tmp_path):
    t = torch.randn(64 * 2**20 // 4)  # 64 MiB
    save_file({"t": t}, str(tmp_path / "model.safetensors"))

    def rss_file_mib() -> float:
        for line in open("/proc/self/status"):
            if line.startswith("RssFile:"):
                return int(line.split()[1]) / 1024
        pytest.skip("no RssFile in /proc/self/status")

    with Checkpoint(tmp_path) as ckpt:
        before = rss_file_mib()
        float(ckpt.view("t").sum())  # touches every page
        touched = rss_file_mib()
        ckpt.release("t")
        released = rss_file_mib()
    assert touched - before > 48 and released - before < 8, (before, touched, released)


def test_write_part(tmp_path):
    """write_part: a tensor in pieces of any size (also in another dtype), between whole ones."""
    ts = {"x": torch.randn(33, 17).to(torch.bfloat16), "y": torch.arange(10), "z": torch.randn(5)}
    plan = [Planned(n, t.dtype, tuple(t.shape)) for n, t in ts.items()]
    with ShardedWriter(tmp_path / "out", plan, max_shard_size=1000) as w:
        flat = ts["x"].view(-1)
        for lo in range(0, flat.numel(), 100):
            w.write_part("x", flat[lo:lo + 100].clone())
        w.write_part("y", ts["y"][:3].view(torch.uint8).clone())
        w.write_part("y", ts["y"][3:].clone())
        w.write("z", ts["z"])
    with Checkpoint(tmp_path / "out") as ckpt:
        for name, t in ts.items():
            assert torch.equal(ckpt.read(name), t)
    with pytest.raises(CheckpointError, match="tensor 'y' got 88 bytes but was planned with 80"):
        with ShardedWriter(tmp_path / "bad", plan) as w:
            w.write("x", ts["x"])
            w.write_part("y", torch.zeros(11, dtype=torch.int64))
    with pytest.raises(CheckpointError, match="incomplete, tensor 'y' was only written in part"):
        with ShardedWriter(tmp_path / "bad", plan) as w:
            w.write("x", ts["x"])
            w.write_part("y", torch.zeros(3, dtype=torch.int64))
    assert not (tmp_path / "bad").exists()


def test_reused_buffers_grow_and_take_turns(tmp_path):
    """Sizes that go up and down: each tensor is read whole into a buffer big enough for it."""
    ts = {f"t{i}": torch.randn(size) for i, size in enumerate([5, 300, 7, 1000, 1000, 2, 999])}
    save_file(ts, str(tmp_path / "model.safetensors"))
    with Checkpoint(tmp_path) as ckpt:
        storages = []
        for name, t in ckpt.iter_tensors(list(ts), ring=3):
            assert torch.equal(t, ts[name])
            storages.append(t.untyped_storage().data_ptr())
    assert len(set(storages)) < len(ts)  # buffers were reused


def test_validation_errors_name_the_file_and_tensor(tmp_path):
    def expect(path, pattern):
        with pytest.raises(CheckpointError, match=pattern):
            Checkpoint(path)

    expect(tmp_path / "nope", "nope: no such file or folder")
    (tmp_path / "empty").mkdir()
    expect(tmp_path / "empty", "no model.safetensors or model.safetensors.index.json")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x01\x02\x03")
    expect(junk, "junk.safetensors: not a safetensors file")
    f32 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    expect(raw_file(tmp_path / "absurd.safetensors", {"w": f32}, bytes(8), header_len=2**40),
           "absurd.safetensors: not a safetensors file or truncated")
    not_json = tmp_path / "notjson.safetensors"
    not_json.write_bytes(struct.pack("<Q", 5) + b"{oops" + bytes(8))
    expect(not_json, "notjson.safetensors: not a safetensors file .its header is not JSON")
    expect(raw_file(tmp_path / "short.safetensors", {"w": f32}, bytes(5)),
           "tensor 'w' ends at byte 8 past the end of the data .5 bytes.: the file is truncated")
    expect(raw_file(tmp_path / "size.safetensors", {"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8)),
           r"tensor 'w' has byte range \[0, 8\) but its shape \[3\] and dtype F32 need 12 bytes")
    overlap = {"a": f32, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}
    expect(raw_file(tmp_path / "overlap.safetensors", overlap, bytes(12)), "tensor 'b' at byte 4 overlaps")
    gap = {"a": f32, "b": {"dtype": "F32", "shape": [2], "data_offsets": [12, 20]}}
    expect(raw_file(tmp_path / "gap.safetensors", gap, bytes(20)), "tensor 'b' at byte 12 leaves a gap")
    expect(raw_file(tmp_path / "tail.safetensors", {"w": f32}, bytes(12)), "4 bytes that no tensor uses")
    expect(raw_file(tmp_path / "dtype.safetensors", {"w": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 2]}}, bytes(2)),
           "tensor 'w' has a malformed or unsupported header entry")


def test_index_errors(tmp_path):
    folder = write_sharded(tmp_path / "m", tensors())
    index = folder / "model.safetensors.index.json"
    good = json.loads(index.read_text())

    def with_map(weight_map, pattern):
        index.write_text(json.dumps({"weight_map": weight_map}))
        with pytest.raises(CheckpointError, match=pattern):
            Checkpoint(folder)

    with_map({**good["weight_map"], "scalar": "model-00009-of-00009.safetensors"},
             "shard 'model-00009-of-00009.safetensors' is missing")
    with_map({**good["weight_map"], "scalar": "../evil.safetensors"}, "shard '../evil.safetensors' lies outside")
    with_map({**good["weight_map"], "scalar": "/etc/passwd"}, "shard '/etc/passwd' lies outside")
    first = next(iter(good["weight_map"]))
    with_map({k: v for k, v in good["weight_map"].items() if k != first}, f"tensor '{first}' .* is not in the index")
    index.write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="not a valid index"):
        Checkpoint(folder)


def test_layout_mismatches_name_the_first_difference(tmp_path):
    ts = tensors()
    save_file(ts, str(tmp_path / "a.safetensors"))
    other = dict(ts)
    other["model.norm.weight"] = other["model.norm.weight"].float()
    save_file(other, str(tmp_path / "b.safetensors"))
    with Checkpoint(tmp_path / "a.safetensors") as a, Checkpoint(tmp_path / "b.safetensors") as b:
        with pytest.raises(CheckpointError, match=r"b.safetensors: tensor 'model.norm.weight' is torch.float32 \[6\] but in .*a.safetensors it is torch.bfloat16 \[6\]"):
            check_same_layout(a, b)
    del other["scalar"]
    other["model.norm.weight"] = ts["model.norm.weight"]
    save_file(other, str(tmp_path / "c.safetensors"))
    with Checkpoint(tmp_path / "a.safetensors") as a, Checkpoint(tmp_path / "c.safetensors") as c:
        with pytest.raises(CheckpointError, match="c.safetensors: has no tensor 'scalar'"):
            check_same_layout(a, c)
        check_same_layout(a, a)


def planned(ts):
    return [Planned(n, t.dtype, tuple(t.shape)) for n, t in ts.items()]


@pytest.mark.parametrize("max_shard_size", [10**9, 200, 1])
def test_writer_round_trip_and_sharding(tmp_path, max_shard_size):
    ts = tensors()
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text('{"model_type": "llama"}')
    (src / "tokenizer.json").write_text("{}")
    out = tmp_path / "out"
    with ShardedWriter(out, planned(ts), max_shard_size, copy_from=src) as writer:
        for name, t in ts.items():
            writer.write(name, t)
        assert not out.exists()  # nothing appears before the end
    assert (out / "config.json").read_text() == '{"model_type": "llama"}'
    assert (out / "tokenizer.json").exists()
    shards = sorted(out.glob("*.safetensors"))
    if max_shard_size == 10**9:
        assert [p.name for p in shards] == ["model.safetensors"]
    else:
        assert len(shards) > 1 and (out / "model.safetensors.index.json").exists()
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in ts.values())
    loaded = {}
    for shard in shards:
        loaded.update(load_file(str(shard)))  # the reference safetensors reader accepts them
    assert loaded.keys() == ts.keys() and all(torch.equal(loaded[n], ts[n]) for n in ts)
    with Checkpoint(out) as ckpt:  # and so does ours, with every check
        assert all(torch.equal(ckpt.read(n), ts[n]) for n in ts)
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_existing_output_needs_overwrite(tmp_path):
    ts = tensors()
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(OutputExistsError, match="out: already exists"):
        ShardedWriter(out, planned(ts))
    # a folder that holds no checkpoint is not an earlier output: even --overwrite leaves it alone
    with pytest.raises(UnsafeOutputError, match="out: exists and is not a checkpoint"):
        ShardedWriter(out, planned(ts), overwrite=True)
    assert (out / "old.txt").read_text() == "old"
    save_file({"x": torch.zeros(1)}, str(out / "model.safetensors"))  # an earlier checkpoint: replaced whole
    with ShardedWriter(out, planned(ts), overwrite=True) as writer:
        for name, t in ts.items():
            writer.write(name, t)
    assert not (out / "old.txt").exists() and set(load_file(str(out / "model.safetensors"))) == set(ts)


def test_failure_midway_leaves_nothing(tmp_path):
    ts = tensors()
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        with ShardedWriter(out, planned(ts), 100) as writer:
            writer.write("model.embed_tokens.weight", ts["model.embed_tokens.weight"])
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(CheckpointError, match="got tensor 'scalar' but the plan expects 'model.embed_tokens.weight'"):
        ShardedWriter(out, planned(ts)).write("scalar", ts["scalar"])
    with pytest.raises(CheckpointError, match=r"tensor 'scalar' is torch.float16 \[\] but was planned as torch.float32"):
        w = ShardedWriter(out, planned({"scalar": ts["scalar"]}))
        w.write("scalar", ts["scalar"].half())
    with pytest.raises(CheckpointError, match="incomplete, tensor 'scalar' was never written"):
        ShardedWriter(out, planned({"scalar": ts["scalar"]})).finish()
    assert list(tmp_path.iterdir()) == []


def test_disk_full_is_a_clear_error_and_cleans_up(tmp_path, monkeypatch):
    ts = tensors()
    out = tmp_path / "out"
    writer = ShardedWriter(out, planned(ts))  # one shard: the next write goes to the same file
    writer.write("model.embed_tokens.weight", ts["model.embed_tokens.weight"])
    writer._wait()  # the background write has opened the shard

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer._file, "write", full)
    with pytest.raises(CheckpointError, match="out: writing tensor 'model.layers.0.self_attn.q_proj.weight' to shard "
                       "model.safetensors failed .the disk is full.; the partial output was removed"):
        writer.write("model.layers.0.self_attn.q_proj.weight", ts["model.layers.0.self_attn.q_proj.weight"])
        writer.finish()  # a background write's failure surfaces at the next call
    assert list(tmp_path.iterdir()) == []


def test_streaming_read_and_write_keep_memory_bounded(tmp_path):
    """Copying a 256 MiB checkpoint through reader and writer holds a few tensors at a time,
    not the files (no memory maps)."""
    n, shape = 8, (4096, 2048)  # 8 tensors of 32 MiB (bf16)
    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(n)]
    plan = [Planned(name, torch.bfloat16, shape) for name in names]
    src = tmp_path / "src"
    with ShardedWriter(src, plan, max_shard_size=100 * 2**20) as writer:
        for name in names:
            writer.write(name, torch.ones(shape, dtype=torch.bfloat16))
    with peak_rss_growth() as grown, Checkpoint(src) as ckpt:
        with ShardedWriter(tmp_path / "copy", plan, max_shard_size=100 * 2**20) as writer:
            for name, tensor in ckpt.iter_tensors(names, ring=3):
                writer.write(name, tensor)
    print(f"peak RSS growth {grown.mib:.0f} MiB")
    assert grown.mib < 4 * 32 + 16, f"peak RSS grew by {grown.mib:.0f} MiB for 256 MiB of data"
    with Checkpoint(tmp_path / "copy") as copy:
        assert torch.equal(copy.read(names[-1]), torch.ones(shape, dtype=torch.bfloat16))
