"""Writing a checkpoint in the Hugging Face layout, streamed and atomic.

Every shard's header is planned up front from the tensors' names, shapes and dtypes, so tensor
data is streamed straight to disk in order and memory stays bounded by one tensor. All files go
into a hidden temporary folder beside the output, are fsynced, and the folder is renamed into
place only when complete (index last): a failed or interrupted run leaves nothing that looks
finished, and the temporary folder is removed on any error.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from safegene_fast.io.atomic import (
    OutputExistsError,
    commit_folder,
    prepare_folder,
    remove,
)
from safegene_fast.io.reader import (
    DTYPE_NAMES,
    INDEX_NAME,
    SINGLE_NAME,
    CheckpointError,
)

DEFAULT_MAX_SHARD_SIZE = 5 * 10**9  # bytes of tensor data per shard, as transformers' save_pretrained

# Weights and their indexes stay behind: the output has its own, and a pickle must not ride along.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".pkl", ".npz",
                   ".safetensors.index.json", ".bin.index.json")
# An adapter's configuration would make transformers take the output folder for an adapter.
NOT_COMPANIONS = ("adapter_config.json",)


def companion_files(folder: str | os.PathLike) -> list[Path]:
    """The files that travel with a model's weights, so the output loads and is licensed like it
    (config, generation config, tokenizer, processor, chat template, license, notice, use policy,
    model card ...): every regular file at the folder's top but weights, indexes and hidden files."""
    folder = Path(folder)
    return sorted(f for f in folder.iterdir() if f.is_file() and not f.name.startswith(".")
                  and not f.name.endswith(WEIGHT_SUFFIXES) and f.name not in NOT_COMPANIONS)


@dataclass(frozen=True)
class Planned:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        numel = 1
        for dim in self.shape:
            numel *= dim
        return numel * torch.empty((), dtype=self.dtype).element_size()


def plan_shards(tensors: list[Planned], max_shard_size: int) -> list[list[Planned]]:
    """Tensors in order, cut into shards of at most max_shard_size data bytes (a larger tensor
    gets a shard of its own)."""
    shards: list[list[Planned]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def shard_header(shard: list[Planned]) -> bytes:
    """The safetensors header of one shard, padded to 8 bytes like the reference writer."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for t in shard:
        header[t.name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                          "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


class ShardedWriter:
    """Streams tensors, in the planned order, into a new checkpoint folder.

        with ShardedWriter(out, planned, max_shard_size, copy_from=model_dir) as writer:
            for name, tensor in ...:
                writer.write(name, tensor)
        # the folder appears at `out` only here, complete
    """

    def __init__(self, out: str | os.PathLike, tensors: list[Planned], max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
                 copy_from: str | os.PathLike | list | None = None, overwrite: bool = False, inputs=(),
                 extra_files: dict[str, str] | None = None):
        if max_shard_size <= 0:
            raise CheckpointError(f"max shard size must be positive, got {max_shard_size}.")
        tensors = list(tensors)
        unstorable = next((t for t in tensors if t.dtype not in DTYPE_NAMES), None)
        if unstorable is not None:  # before the temporary folder is made
            raise CheckpointError(f"{out}: tensor {unstorable.name!r} is {unstorable.dtype}, which safetensors "
                                  f"cannot store.")
        # the folders companion files come from, later ones winning
        self.copy_from = [Path(f) for f in (copy_from if isinstance(copy_from, (list, tuple)) else
                                            [copy_from] if copy_from else [])]
        self.out, self.tmp = prepare_folder(out, [*inputs, *self.copy_from], overwrite=overwrite)
        self.overwrite = overwrite
        self.extra_files = dict(extra_files or {})  # name -> text, written over a copied file of that name
        self.shards = plan_shards(tensors, max_shard_size)
        n = len(self.shards)
        self.shard_names = [SINGLE_NAME] if n == 1 else [
            f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.order = [t for shard in self.shards for t in shard]
        self.shard_of = [i for i, shard in enumerate(self.shards) for _ in shard]
        self._next = 0        # index into self.order
        self._part = 0        # bytes of self.order[self._next] received so far by write_part
        self._shard = -1      # shard being written
        self._file = None
        # Write-behind: one tensor's write runs in this thread while the caller computes the next.
        self._pool = ThreadPoolExecutor(max_workers=1)
        self._pending: tuple[Future, str] | None = None

    def _guard(self, what: str, action):
        try:
            return action()
        except OutputExistsError:  # another run finished the same output first
            self.abort()
            raise
        except OSError as exc:
            self.abort()
            reason = "the disk is full" if exc.errno == errno.ENOSPC else exc.strerror
            raise CheckpointError(f"{self.out}: writing {what} failed ({reason}); the partial "
                                  f"output was removed.") from None

    def _close_shard(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    def _expect(self, name: str) -> Planned:
        if self._next >= len(self.order) or self.order[self._next].name != name:
            expected = self.order[self._next].name if self._next < len(self.order) else "nothing"
            self.abort()
            raise CheckpointError(f"{self.out}: got tensor {name!r} but the plan expects {expected!r}.")
        return self.order[self._next]

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Appends the next planned tensor (same name, dtype and shape as planned).

        The data is written in the background: ``tensor``'s memory must stay unchanged until the
        next ``write`` (or ``write_part``) returns (it waits for this one) or ``finish``.
        """
        planned = self._expect(name)
        if self._part or tensor.dtype != planned.dtype or tuple(tensor.shape) != planned.shape:
            self.abort()
            raise CheckpointError(f"{self.out}: tensor {name!r} is {tensor.dtype} {list(tensor.shape)} "
                                  f"but was planned as {planned.dtype} {list(planned.shape)}.")
        self._submit(name, tensor)
        self._next += 1

    def write_part(self, name: str, part: torch.Tensor) -> None:
        """Appends the next bytes of the next planned tensor: ``part`` (any dtype, contiguous)
        holds its data from where the previous part ended; the tensor is complete once parts
        of its planned size have arrived. Written in the background like ``write``: ``part``'s
        memory must stay unchanged until the next ``write_part`` or ``write`` returns."""
        planned = self._expect(name)
        nbytes = part.numel() * part.element_size()
        if self._part + nbytes > planned.nbytes:
            self.abort()
            raise CheckpointError(f"{self.out}: tensor {name!r} got {self._part + nbytes} bytes but was "
                                  f"planned with {planned.nbytes}.")
        self._submit(name, part)
        self._part += nbytes
        if self._part == planned.nbytes:
            self._next, self._part = self._next + 1, 0

    def _submit(self, name: str, tensor: torch.Tensor) -> None:
        self._wait()
        shard = self.shard_of[self._next]
        data = memoryview(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())

        def write_data() -> None:
            if shard != self._shard:
                self._open_shard(shard)
            self._file.write(data)

        self._pending = (self._pool.submit(write_data),
                         f"tensor {name!r} to shard {self.shard_names[shard]}")

    def _wait(self) -> None:
        """Waits for the write in flight; a failure becomes the one-sentence error, output removed."""
        if self._pending is not None:
            (future, what), self._pending = self._pending, None
            self._guard(what, future.result)

    def _open_shard(self, shard: int) -> None:
        self._close_shard()
        self._shard = shard
        self._file = open(self.tmp / self.shard_names[shard], "wb")
        self._file.write(shard_header(self.shards[shard]))

    def finish(self) -> Path:
        """Completes the checkpoint and moves it into place; returns its folder."""
        self._wait()
        if self._next != len(self.order):
            missing = self.order[self._next].name
            self.abort()
            raise CheckpointError(f"{self.out}: incomplete, tensor {missing!r} was "
                                  f"{'only written in part' if self._part else 'never written'}.")
        self._guard("the index and companion files", self._finish_files)
        self._pool.shutdown()
        return self.out

    def _finish_files(self) -> None:
        if not self.order:  # a checkpoint with no tensors still gets its (empty) file
            self._open_shard(0)
        self._close_shard()
        for folder in self.copy_from:
            for file in companion_files(folder):
                shutil.copyfile(file, self.tmp / file.name)
        for name, text in self.extra_files.items():
            (self.tmp / name).write_text(text, encoding="utf-8")
        if len(self.shards) > 1:
            total = sum(t.nbytes for t in self.order)
            weight_map = {t.name: self.shard_names[i] for i, s in enumerate(self.shards) for t in s}
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            with open(self.tmp / INDEX_NAME, "w") as f:
                json.dump(index, f, indent=2)
                f.flush()
                os.fsync(f.fileno())
        commit_folder(self.tmp, self.out, overwrite=self.overwrite)

    def abort(self) -> None:
        """Removes everything written so far."""
        if self._pending is not None:  # let the write in flight end before removing its file
            self._pending[0].exception()
            self._pending = None
        self._pool.shutdown()
        if self._file is not None:
            self._file.close()
            self._file = None
        remove(self.tmp)

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finish()
        else:
            self.abort()
