"""Deterministic generated Llama-shaped checkpoint families on disk, for benchmarks and tests.

    from safegene_fast.models.synthetic import write_family, default_root
    paths = write_family(default_root("llama-7b-2layers"), "llama-7b-2layers")
    paths["aligned"], paths["degraded"], paths["target"]   # HF folders (sharded safetensors)

A family shares one Llama shape and holds, per tensor (all generated in float32, stored rounded
to ``dtype`` once):

- ``aligned``: random weights, std ``WEIGHT_STD`` (norm weights around 1);
- ``degraded``: ``aligned - S + noise``, where ``S`` is a rank-``PERTURB_RANK`` "safety"
  perturbation with decaying strengths, so ``aligned - degraded`` is low-rank plus a little noise
  (like a real safety delta; bf16 rounding of both checkpoints adds its own small noise);
- ``target``: ``aligned + T + noise``, ``T`` a different low-rank "task" perturbation.

More members of a role may be asked for by suffix (``degraded2``, ``target-b``): a degraded
variant shares ``S`` with its own noise, a target variant has its own task vector and noise.

Every (tensor, role) has its own seeded generator, so a member's bytes depend only on
(shape, dtype, seed, member name), not on which other members are generated or on thread count.
Memory stays bounded by about two float32 copies of the largest tensor: one tensor is generated
at a time, for all members, and streamed to their writers.

The family is cached: ``root/.synthetic.json`` records, per member, what it was generated from;
a member whose record matches and whose folder exists is reused. Each member folder is written
atomically (``ShardedWriter``) and recorded only after it is complete, so an interrupted run is
regenerated next time. A lock file serializes concurrent writers of one root.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import re
import shutil
import sys
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from safegene_fast.cache import cache_root
from safegene_fast.gene import PEFT_PREFIX
from safegene_fast.io import Checkpoint, Planned, ShardedWriter, write_text
from safegene_fast.io.reader import DTYPE_NAMES
from safegene_fast.io.writer import DEFAULT_MAX_SHARD_SIZE
from safegene_fast.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from safegene_fast.progress import Progress

# Bump when the generated values change, so stale caches are regenerated.
GENERATOR_VERSION = 1

WEIGHT_STD = 0.02            # aligned 2-D weights
NORM_STD = 0.02              # aligned norm weights: 1 + NORM_STD * N(0, 1)
PERTURB_RANK = 8             # rank of the safety and task perturbations
SAFETY_STD = 0.002           # entry std of the safety perturbation S (10% of a weight)
TASK_STD = 0.002             # entry std of the task perturbation T
DEGRADED_NOISE_STD = 2e-4    # full-rank noise in degraded (about 1% of ||A - D||^2)
TARGET_NOISE_STD = 5e-4      # full-rank noise in target
NORM_NOISE_STD = 1e-3        # 1-D tensors of degraded / target: aligned + this * N(0, 1)

STAMP_NAME = ".synthetic.json"
LOCK_NAME = ".synthetic.lock"
ROLES = ("aligned", "degraded", "target")


@dataclass(frozen=True)
class LlamaShape:
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    layers: int
    full_layers: int  # layer count of the real model, for projecting timings to it

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) of every tensor, in the order they are written (HF names)."""
        h, i, kv = self.hidden, self.intermediate, self.kv_heads * self.head_dim
        out = [("model.embed_tokens.weight", (self.vocab, h))]
        for n in range(self.layers):
            p = f"model.layers.{n}."
            out += [
                (p + "input_layernorm.weight", (h,)),
                (p + "self_attn.q_proj.weight", (h, h)),
                (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)),
                (p + "self_attn.o_proj.weight", (h, h)),
                (p + "post_attention_layernorm.weight", (h,)),
                (p + "mlp.gate_proj.weight", (i, h)),
                (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i)),
            ]
        out += [("model.norm.weight", (h,)), ("lm_head.weight", (self.vocab, h))]
        return out

    def numel(self) -> int:
        total = 0
        for _, shape in self.tensors():
            n = 1
            for d in shape:
                n *= d
            total += n
        return total

    def nbytes(self, dtype: torch.dtype = torch.bfloat16) -> int:
        """Bytes of tensor data of one member."""
        return self.numel() * torch.empty((), dtype=dtype).element_size()

    def layer_nbytes(self, dtype: torch.dtype = torch.bfloat16) -> int:
        """Bytes of tensor data of one transformer layer."""
        one = LlamaShape(self.hidden, self.intermediate, self.heads, self.kv_heads, self.vocab, 1, 1)
        zero = LlamaShape(self.hidden, self.intermediate, self.heads, self.kv_heads, self.vocab, 0, 0)
        return one.nbytes(dtype) - zero.nbytes(dtype)

    def full_nbytes(self, dtype: torch.dtype = torch.bfloat16) -> int:
        """Bytes of tensor data of the real model (``full_layers`` layers)."""
        return self.nbytes(dtype) + (self.full_layers - self.layers) * self.layer_nbytes(dtype)

    def config(self, dtype: torch.dtype = torch.bfloat16) -> dict:
        """A transformers ``LlamaConfig`` for this shape (Llama-2 style settings)."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "num_hidden_layers": self.layers,
            "vocab_size": self.vocab,
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "hidden_act": "silu",
            "initializer_range": WEIGHT_STD,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "mlp_bias": False,
            "tie_word_embeddings": False,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "use_cache": True,
            "torch_dtype": str(dtype).removeprefix("torch."),
        }


SHAPES: dict[str, LlamaShape] = {
    # Llama-2-7B, 2 of its 32 layers.
    "llama-7b-2layers": LlamaShape(4096, 11008, 32, 32, 32000, 2, 32),
    # Llama-2-7B, 1 layer: the same matrices, half the work (for slow peers, e.g. full-SVD extraction).
    "llama-7b-1layer": LlamaShape(4096, 11008, 32, 32, 32000, 1, 32),
    # Llama-2-70B (grouped-query attention, 8 kv heads), 2 of its 80 layers.
    "llama-70b-2layers": LlamaShape(8192, 28672, 64, 8, 32000, 2, 80),
    # Small, for tests and CI smoke runs.
    "llama-tiny": LlamaShape(256, 688, 4, 2, 1000, 2, 2),
}


def resolve_shape(shape: str | LlamaShape) -> tuple[str, LlamaShape]:
    if isinstance(shape, LlamaShape):
        name = next((k for k, v in SHAPES.items() if v == shape), "custom")
        return name, shape
    if shape not in SHAPES:
        raise ValueError(f"unknown synthetic shape {shape!r}; known: {', '.join(SHAPES)}.")
    return shape, SHAPES[shape]


def default_root(shape: str | LlamaShape, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Path:
    """``cache_root()/synthetic/<shape>-<dtype>-seed<seed>``."""
    name, s = resolve_shape(shape)
    if name == "custom":
        name = "custom-" + hashlib.sha256(json.dumps(asdict(s)).encode()).hexdigest()[:12]
    return cache_root() / "synthetic" / f"{name}-{str(dtype).removeprefix('torch.')}-seed{seed}"


def _role(member: str) -> str:
    for role in ROLES:
        if member.startswith(role):
            return role
    raise ValueError(f"member {member!r} names no role; a member name starts with one of {ROLES}.")


def _generator(seed: int, name: str, what: str) -> torch.Generator:
    digest = hashlib.blake2b(f"{GENERATOR_VERSION}|{seed}|{name}|{what}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def _randn(shape, g: torch.Generator, std: float, out: torch.Tensor | None = None) -> torch.Tensor:
    out = torch.empty(shape, dtype=torch.float32) if out is None else out
    return out.normal_(0.0, std, generator=g)


def _add_lowrank_(w: torch.Tensor, g: torch.Generator, entry_std: float, sign: float) -> None:
    """w += sign * B @ A with B (out x r), A (r x in) Gaussian and decaying column strengths
    1/sqrt(k+1), scaled so each entry of B @ A has std ``entry_std``."""
    out_dim, in_dim = w.shape
    r = min(PERTURB_RANK, out_dim, in_dim)
    strengths = torch.rsqrt(torch.arange(1, r + 1, dtype=torch.float32))
    B = torch.randn(out_dim, r, generator=g) * strengths
    A = torch.randn(r, in_dim, generator=g)
    scale = entry_std / float(strengths.square().sum().sqrt())
    w.addmm_(B, A, alpha=sign * scale)


def _member_tensor(member: str, name: str, shape, aligned: torch.Tensor, buf: torch.Tensor,
                   seed: int) -> torch.Tensor:
    """The float32 values of ``member``'s tensor, built in ``buf`` from the aligned values."""
    role = _role(member)
    if role == "aligned":
        return aligned
    if len(shape) != 2:
        _randn(shape, _generator(seed, name, f"noise:{member}"), NORM_NOISE_STD, out=buf)
        return buf.add_(aligned)
    noise = DEGRADED_NOISE_STD if role == "degraded" else TARGET_NOISE_STD
    _randn(shape, _generator(seed, name, f"noise:{member}"), noise, out=buf).add_(aligned)
    if role == "degraded":  # the same safety direction for every degraded member
        _add_lowrank_(buf, _generator(seed, name, "safety"), SAFETY_STD, -1.0)
    else:                   # each target its own task vector
        _add_lowrank_(buf, _generator(seed, name, f"task:{member}"), TASK_STD, +1.0)
    return buf


def _aligned_tensor(name: str, shape, seed: int) -> torch.Tensor:
    g = _generator(seed, name, "aligned")
    if len(shape) == 2:
        return _randn(shape, g, WEIGHT_STD)
    return _randn(shape, g, NORM_STD).add_(1.0)


@contextmanager
def _locked(root: Path):
    root.mkdir(parents=True, exist_ok=True)
    with open(root / LOCK_NAME, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _read_stamp(root: Path) -> dict:
    try:
        stamp = json.loads((root / STAMP_NAME).read_text())
        return stamp if isinstance(stamp, dict) and isinstance(stamp.get("members"), dict) else {"members": {}}
    except (OSError, ValueError):
        return {"members": {}}


def _write_stamp(root: Path, stamp: dict) -> None:
    write_text(root / STAMP_NAME, json.dumps(stamp, indent=2, sort_keys=True))


def write_family(root: str | os.PathLike, shape: str | LlamaShape, *, dtype: torch.dtype = torch.bfloat16,
                 seed: int = 0, members=("aligned", "degraded", "target"), max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
                 progress: bool = False) -> dict[str, Path]:
    """Generates (or reuses from the cache) the family's members as HF folders ``root/<member>``;
    returns ``{member: folder}``."""
    shape_name, s = resolve_shape(shape)
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"synthetic checkpoints are bfloat16, float16 or float32, not {dtype}.")
    members = list(dict.fromkeys(members))
    for m in members:
        _role(m)
        if not m or "/" in m or m.startswith("."):
            raise ValueError(f"member name {m!r} is not a plain folder name.")
    root = Path(root)
    paths = {m: root / m for m in members}
    record = {"generator": GENERATOR_VERSION, "shape_name": shape_name, "shape": asdict(s),
              "dtype": DTYPE_NAMES[dtype], "seed": seed, "max_shard_size": max_shard_size}
    with _locked(root):
        stamp = _read_stamp(root)
        todo = [m for m in members if stamp["members"].get(m) != record or not paths[m].is_dir()]
        if not todo:
            return paths
        for leftover in root.glob(".*.tmp-*"):  # from a run that was killed
            shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)
        for m in todo:  # no longer valid: forget it first, so a crash below cannot look finished
            stamp["members"].pop(m, None)
        _write_stamp(root, stamp)
        _generate(root, s, dtype, seed, todo, max_shard_size, progress)
        stamp = _read_stamp(root)
        for m in todo:
            stamp["members"][m] = record
        _write_stamp(root, stamp)
    return paths


LORA_TARGETS = r"\.layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight$"  # what task LoRAs usually adapt


def write_lora_adapter(folder: str | os.PathLike, base: str | os.PathLike, rank: int, *, seed: int = 0,
                       targets: str = LORA_TARGETS) -> Path:
    """A PEFT LoRA adapter folder on ``base`` with float32 factors of rank ``rank`` on every
    attention and MLP projection (an update of about 1% of each weight's norm), as PEFT saves
    one: a task fine-tune shipped as LoRA, for benchmarks and tests."""
    folder, pattern = Path(folder), re.compile(targets)
    tensors, modules = {}, set()
    with Checkpoint(base) as ckpt:
        for name, info in ckpt.tensors.items():
            if len(info.shape) != 2 or not pattern.search(name):
                continue
            out_features, in_features = info.shape
            g = _generator(seed, name, "lora")
            module = name.removesuffix(".weight")
            tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = _randn((rank, in_features), g, in_features ** -0.5)
            tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = _randn((out_features, rank), g, 0.01 * rank ** -0.5)
            modules.add(module.rsplit(".", 1)[1])
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(Path(base).resolve()),
              "r": rank, "lora_alpha": rank, "target_modules": sorted(modules), "lora_dropout": 0.0,
              "bias": "none", "fan_in_fan_out": False, "inference_mode": True}
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return folder


def _generate(root: Path, s: LlamaShape, dtype: torch.dtype, seed: int, members: list[str],
              max_shard_size: int, progress: bool) -> None:
    staging = root / f".config.tmp-{os.getpid()}"
    staging.mkdir(parents=True, exist_ok=True)
    writers = []
    try:
        (staging / "config.json").write_text(json.dumps(s.config(dtype), indent=2) + "\n")
        tensors = s.tensors()
        plan = [Planned(n, dtype, shape) for n, shape in tensors]
        writers = [ShardedWriter(root / m, plan, max_shard_size, copy_from=staging, overwrite=True)
                   for m in members]
        need_buf = any(_role(m) != "aligned" for m in members)
        with Progress(f"synthetic {root.name}", s.nbytes(dtype) * len(members), len(tensors) * len(members),
                      progress) as bar:
            for name, shape in tensors:
                aligned = _aligned_tensor(name, shape, seed)
                buf = torch.empty(shape, dtype=torch.float32) if need_buf else None
                for m, w in zip(members, writers):
                    # A copy of its own for each writer: it writes in the background while buf is
                    # refilled for the next member (.to(float32) alone would hand it buf itself).
                    w.write(name, _member_tensor(m, name, shape, aligned, buf, seed).to(dtype, copy=True))
                    bar.advance(aligned.numel() * dtype.itemsize)
                del aligned, buf
        for w in writers:
            w.finish()
    except BaseException:
        for w in writers:
            w.abort()
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m safegene_fast.models.synthetic",
                                description="Write (or reuse) a synthetic Llama-shaped family.")
    p.add_argument("shape", choices=list(SHAPES))
    p.add_argument("--root", help="output folder (default: the cache folder for shape/dtype/seed)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--members", default=",".join(ROLES))
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    root = args.root or default_root(args.shape, dtype, args.seed)
    paths = write_family(root, args.shape, dtype=dtype, seed=args.seed,
                         members=args.members.split(","), progress=True)
    for m, path in paths.items():
        print(f"{m}\t{path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
