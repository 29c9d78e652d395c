"""Reading Hugging Face safetensors checkpoints, validated before anything is trusted.

A checkpoint is a folder with ``model.safetensors``, or with shards and
``model.safetensors.index.json``, or a single ``.safetensors`` file. Each shard is opened once.
Tensors are read with ``os.preadv`` straight into tensor memory (``read``, ``iter_tensors``),
or seen in place through a read-only mapping of the shard (``view``), whose pages the caller
hands back with ``release`` once used: either way resident memory stays bounded by the tensors
(or pieces) in flight, not by the file sizes. (Mapped pages count toward RSS while mapped.)
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
import struct
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors format's own cap
T = TypeVar("T")

# Every dtype safetensors stores in whole bytes, by the name safetensors itself writes for it.
# The sub-byte ones (F4, F6_E2M3, F6_E3M2) are refused: their headers count 4- or 6-bit elements.
DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
    "F8_E5M2FNUZ": torch.float8_e5m2fnuz, "F8_E8M0": torch.float8_e8m0fnu, "C64": torch.complex64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file, tensor and problem."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path
    offset: int  # absolute byte offset of the data in `file`
    nbytes: int


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a number a header may hold")


def load_json(raw: bytes | str, path: Path, problem: str):
    """JSON as safetensors reads it: no NaN or Infinity, no nesting deep enough to overflow the
    parser; anything else is a CheckpointError naming ``path``, ``problem`` with its reason."""
    try:
        return json.loads(raw, parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        reason = "nested too deeply" if isinstance(exc, RecursionError) else "not JSON"
        raise CheckpointError(f"{path}: {problem.format(reason=reason)}.") from None


def _ints(values) -> bool:
    return isinstance(values, list) and all(type(v) is int for v in values)


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parses and validates one safetensors file's header: its tensors and its metadata."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes).")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES or header_len > size - 8:
                raise CheckpointError(
                    f"{path}: not a safetensors file or truncated (header length {header_len} "
                    f"bytes, file {size} bytes).")
            raw = f.read(header_len)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be read ({exc.strerror}).") from None
    header = load_json(raw, path, "not a safetensors file (its header is {reason})")
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (its header is not a JSON object).")
    metadata = header.pop("__metadata__", None) or {}
    if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise CheckpointError(f"{path}: its __metadata__ is not an object of strings.")
    data_start, data_len = 8 + header_len, size - 8 - header_len
    tensors, spans = {}, []
    for name, entry in header.items():
        # as strict as safetensors itself: whole numbers only, no floats, strings or booleans
        dtype = DTYPES.get(entry.get("dtype")) if isinstance(entry, dict) and isinstance(entry.get("dtype"), str) else None
        shape, offsets = (entry.get("shape"), entry.get("data_offsets")) if isinstance(entry, dict) else (None, None)
        if dtype is None or not _ints(shape) or not _ints(offsets) or len(offsets) != 2:
            raise CheckpointError(
                f"{path}: tensor {name!r} has a malformed or unsupported header entry "
                f"{json.dumps(entry)[:120]}.")
        shape, (begin, end) = tuple(shape), offsets
        numel = 1
        for dim in shape:
            if dim < 0:
                raise CheckpointError(f"{path}: tensor {name!r} has a negative dimension {shape}.")
            numel *= dim
        expected = numel * torch.empty((), dtype=dtype).element_size()
        if end - begin != expected or begin < 0:
            raise CheckpointError(
                f"{path}: tensor {name!r} has byte range [{begin}, {end}) but its shape {list(shape)} "
                f"and dtype {entry['dtype']} need {expected} bytes.")
        if end > data_len:
            raise CheckpointError(
                f"{path}: tensor {name!r} ends at byte {end} past the end of the data ({data_len} "
                f"bytes): the file is truncated.")
        spans.append((begin, end, name))
        tensors[name] = TensorInfo(name, dtype, shape, path, data_start + begin, expected)
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            problem = "overlaps the previous tensor" if begin < position else "leaves a gap before it"
            raise CheckpointError(f"{path}: tensor {name!r} at byte {begin} {problem} "
                                  f"(expected byte {position}).")
        position = end
    if position != data_len:
        raise CheckpointError(f"{path}: the data section has {data_len - position} bytes that no "
                              f"tensor uses after byte {position}.")
    return tensors, metadata


class Checkpoint:
    """An opened, validated checkpoint. Use as a context manager to close its shard handles."""

    def __init__(self, path: str | os.PathLike):
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"a checkpoint is a path or a Hub model id, not {type(path).__name__} {path!r}.")
        self.path = Path(path)
        if not self.path.exists():
            self.path = from_hub_cache(str(path))
        self.folder = self.path if self.path.is_dir() else self.path.parent
        self.tensors: dict[str, TensorInfo] = {}
        self.metadata: dict[str, str] = {}
        for shard in self._shard_files():
            tensors, metadata = read_header(shard)
            twice = next((n for n in tensors if n in self.tensors), None)
            if twice is not None:
                raise CheckpointError(f"{shard}: tensor {twice!r} is also in {self.tensors[twice].file.name}.")
            self.metadata.update(metadata)
            self.tensors.update(tensors)
        if self._index is not None:
            self._check_index()
        self._fds: dict[Path, int] = {}
        self._maps: dict[Path, mmap.mmap] = {}

    def _shard_files(self) -> list[Path]:
        self._index = None
        if self.path.is_file():
            return [self.path]
        index_path = self.folder / INDEX_NAME
        if index_path.is_file():
            try:
                raw = index_path.read_bytes()
            except OSError as exc:
                raise CheckpointError(f"{index_path}: cannot be read ({exc.strerror}).") from None
            index = load_json(raw, index_path, "not a valid index (it is {reason})")
            self._index = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(self._index, dict):
                raise CheckpointError(f"{index_path}: not a valid index (no weight_map object).")
            if not self._index:
                raise CheckpointError(f"{index_path}: its weight_map lists no tensors.")
            bad = next((v for v in self._index.values() if not isinstance(v, str)), None)
            if bad is not None:
                raise CheckpointError(f"{index_path}: shard name {json.dumps(bad)[:60]} is not a string.")
            shards = []
            for name in sorted(set(self._index.values())):
                shard = Path(name)
                if shard.is_absolute() or len(shard.parts) != 1 or name in ("..", "."):
                    raise CheckpointError(f"{index_path}: shard {name!r} lies outside the checkpoint folder.")
                shards.append(self._inside(self.folder / shard, index_path))
            return shards
        if (self.folder / SINGLE_NAME).is_file():
            return [self._inside(self.folder / SINGLE_NAME, self.folder)]
        pickles = sorted(f.name for f in self.folder.glob("*.bin"))
        if pickles:
            raise CheckpointError(
                f"{self.folder}: holds PyTorch pickle weights ({pickles[0]}), which can run code when loaded, and no "
                f"safetensors; convert it once with transformers: AutoModelForCausalLM.from_pretrained(folder)"
                f".save_pretrained(new_folder).")
        raise CheckpointError(f"{self.folder}: no {SINGLE_NAME} or {INDEX_NAME} in this folder.")

    def _inside(self, shard: Path, where: Path) -> Path:
        """A shard file of this checkpoint: present, and inside its folder once links are followed."""
        if not shard.is_file():
            raise CheckpointError(f"{where}: shard {shard.name!r} is missing.")
        if not shard.resolve().is_relative_to(self.folder.resolve()):
            raise CheckpointError(f"{where}: shard {shard.name!r} links to {shard.resolve()}, outside the "
                                  f"checkpoint folder.")
        return shard

    def _check_index(self) -> None:
        index_path = self.folder / INDEX_NAME
        for name, shard in self._index.items():
            info = self.tensors.get(name)
            if info is None or info.file.name != shard:
                raise CheckpointError(f"{index_path}: tensor {name!r} is not in shard {shard!r}.")
        extra = sorted(set(self.tensors) - set(self._index))
        if extra:
            raise CheckpointError(f"{index_path}: tensor {extra[0]!r} of shard "
                                  f"{self.tensors[extra[0]].file.name!r} is not in the index.")

    @property
    def names(self) -> list[str]:
        return list(self.tensors)

    def read(self, name: str, into: torch.Tensor | None = None, start: int = 0,
             count: int | None = None) -> torch.Tensor:
        """One tensor, read with positioned reads into fresh memory, or into the start of the
        uint8 buffer ``into`` (large enough). With ``start``/``count``: only those elements of
        the flattened tensor, as a 1-D tensor."""
        info = self.tensors[name]
        size = info.dtype.itemsize
        whole = start == 0 and count is None
        count = info.nbytes // size - start if count is None else count
        nbytes, offset = count * size, info.offset + start * size
        out = torch.empty(nbytes, dtype=torch.uint8) if into is None else into[:nbytes]
        if nbytes:
            fd = self._fd(info.file)
            view = memoryview(out.numpy())
            done = 0
            while done < nbytes:  # preadv may return short reads
                got = os.preadv(fd, [view[done:]], offset + done)
                if got == 0:
                    raise CheckpointError(f"{info.file}: tensor {name!r} is truncated on disk.")
                done += got
        out = out.view(info.dtype)
        return out.reshape(info.shape) if whole else out

    def _fd(self, file: Path) -> int:
        fd = self._fds.get(file)
        if fd is None:
            fd = self._fds[file] = os.open(file, os.O_RDONLY)
        return fd

    def _range(self, name: str, start: int, count: int | None) -> tuple[TensorInfo, int, int]:
        """(info, byte offset in its file, byte count) of elements [start, start + count)."""
        info = self.tensors[name]
        size = info.dtype.itemsize
        count = info.nbytes // size - start if count is None else count
        return info, info.offset + start * size, count * size

    def view(self, name: str, start: int = 0, count: int | None = None) -> torch.Tensor:
        """Tensor ``name`` (or elements [start, start + count) of it, flattened) in place in the
        page cache, through a mapping of its shard: no copy, nothing read until touched. Treat it
        as read-only (the mapping is private: a write would change only this process's copy).
        Its pages count toward RSS once touched; ``release`` the range when done with it."""
        info, offset, nbytes = self._range(name, start, count)
        if not nbytes:
            return torch.empty(0 if count is not None or start else info.shape, dtype=info.dtype)
        # Checked on every view, not only when mapping: touching a mapped page past the end of a
        # file that another process shrank meanwhile kills the process with SIGBUS.
        if os.fstat(self._fd(info.file)).st_size < offset + nbytes:
            raise CheckpointError(f"{info.file}: tensor {name!r} is truncated on disk (the file changed while "
                                  f"it was read).")
        m = self._maps.get(info.file)
        if m is None:
            m = self._maps[info.file] = mmap.mmap(self._fd(info.file), 0, access=mmap.ACCESS_COPY)
            m.madvise(mmap.MADV_SEQUENTIAL)  # read ahead far on faults when not in the page cache
        out = torch.frombuffer(m, dtype=info.dtype, count=nbytes // info.dtype.itemsize, offset=offset)
        return out.view(info.shape) if start == 0 and count is None else out

    def release(self, name: str, start: int = 0, count: int | None = None) -> None:
        """Unmaps the pages of a ``view`` range from this process (they stay in the page cache):
        its RSS drops by them. Views of the range stay valid (touching them maps pages again)."""
        info, offset, nbytes = self._range(name, start, count)
        m = self._maps.get(info.file)
        if m is None or not nbytes:
            return
        begin = offset - offset % mmap.PAGESIZE
        m.madvise(mmap.MADV_DONTNEED, begin, min(offset + nbytes, len(m)) - begin)

    def prefetch(self, name: str) -> None:
        """Asks the kernel to start reading tensor ``name`` into the page cache (returns at once
        for cached data; does the reading's bookkeeping for the rest, so call it off the hot path)."""
        info = self.tensors[name]
        if info.nbytes:
            os.posix_fadvise(self._fd(info.file), info.offset, info.nbytes, os.POSIX_FADV_WILLNEED)

    def iter_tensors(self, names: Iterable[str], ring: int = 0,
                     digest: hashlib._Hash | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yields (name, tensor) in order, reading the next tensor while the caller works.

        ``ring=0``: every tensor in fresh memory. ``ring=n`` (2 or more): the tensors live in n
        buffers that take turns (each grown to the largest tensor so far), and a yielded tensor
        stays valid only until n - 1 more have been asked for: 2 when each tensor is used up
        before the next, 3 to write one out in the background (``ShardedWriter``) while the next
        is computed on and the one after is read. Reused buffers save the kernel zero-filling
        and page-faulting fresh memory for every tensor.

        ``digest`` (a hashlib object) is fed each tensor's name, dtype, shape and bytes as it is
        read, in the reading thread: a fingerprint of the content at no extra read.
        """
        if ring == 1 or ring < 0:
            raise ValueError("ring must be 0 (fresh memory) or at least 2 (one read ahead).")
        names = list(names)
        buffers = [torch.empty(0, dtype=torch.uint8) for _ in range(ring)]

        def read(i: int) -> torch.Tensor:
            if not ring:
                tensor = self.read(names[i])
            else:
                slot, nbytes = i % ring, self.tensors[names[i]].nbytes
                if buffers[slot].numel() < nbytes:
                    buffers[slot] = torch.empty(0, dtype=torch.uint8)  # free the small one first
                    buffers[slot] = torch.empty(nbytes, dtype=torch.uint8)
                tensor = self.read(names[i], into=buffers[slot])
            if digest is not None:
                info = self.tensors[names[i]]
                digest.update(f"{info.name}|{DTYPE_NAMES[info.dtype]}|{list(info.shape)}\n".encode())
                digest.update(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
            return tensor

        # read(i + 1) starts when tensor i is asked for: its slot held tensor i + 1 - ring, which
        # the caller is done with by then.
        yield from zip(names, read_ahead(read, len(names)))

    def close(self) -> None:
        for m in self._maps.values():
            try:
                m.close()
            except BufferError:  # a view is still alive: the mapping goes when the last one does
                pass
        self._maps.clear()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def from_hub_cache(name: str) -> Path:
    """The folder of Hub model ``name`` (``org/model``) in the local Hugging Face cache (``HF_HOME``,
    ``HF_HUB_CACHE``), never downloaded: a run reads only what is on this machine."""
    if not HUB_ID.fullmatch(name) or ".." in name:
        raise CheckpointError(f"{name}: no such file or folder.")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
    try:
        return Path(snapshot_download(name, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, OSError):
        raise CheckpointError(f"{name}: no such folder, and no Hub model of that id in the local cache; download it "
                              f"first (hf download {name}).") from None


def check_same_layout(reference: Checkpoint, *others: Checkpoint, interchangeable=()) -> None:
    """Every checkpoint of one run must hold the same tensor names, shapes and dtypes; a tensor
    may be of one dtype here and another there when both are ``interchangeable`` (the float dtypes
    the kernels read, which do their math in float32 whatever the inputs)."""
    for other in others:
        for name, info in reference.tensors.items():
            theirs = other.tensors.get(name)
            if theirs is None:
                raise CheckpointError(f"{other.path}: has no tensor {name!r}, which {reference.path} has.")
            mixed = theirs.dtype in interchangeable and info.dtype in interchangeable
            if theirs.shape != info.shape or (theirs.dtype != info.dtype and not mixed):
                raise CheckpointError(
                    f"{other.path}: tensor {name!r} is {theirs.dtype} {list(theirs.shape)} but in "
                    f"{reference.path} it is {info.dtype} {list(info.shape)}.")
        extra = [n for n in other.tensors if n not in reference.tensors]
        if extra:
            raise CheckpointError(f"{other.path}: has tensor {extra[0]!r}, which {reference.path} lacks.")


def read_ahead(read: Callable[[int], T], count: int) -> Iterator[T]:
    """``read(0)``, ..., ``read(count - 1)`` in order; ``read(i + 1)`` runs in a background
    thread, started when item ``i`` is asked for, while the caller works on item ``i``."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(read, 0) if count else None
        for i in range(count):
            item = pending.result()
            pending = pool.submit(read, i + 1) if i + 1 < count else None
            yield item
