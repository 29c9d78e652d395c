"""Every file and folder the tool writes appears complete or not at all.

Each output is built under a hidden temporary name beside its target (same filesystem, so the
final rename is atomic), fsynced, and renamed into place only when complete; on any error the
temporary is removed. A folder that replaces an existing one is moved aside first, so at no
moment is there neither the old nor the new output.

    with atomic_file(path) as f: f.write(...)            # text; mode="wb" for bytes
    write_json(path, obj)
    with atomic_folder(out, overwrite=True) as tmp: ...  # fill tmp; it becomes out on exit
    with together(): ...                                 # every output of the block, or none

Outputs finished inside ``together()`` wait, complete, under their temporary names and are put
in place together when the block ends without error; on an error none of them appears and any
earlier outputs they were to replace stay as they were.

No output path can destroy an input: ``check_output`` (run by each of these before any byte
moves) refuses an output that is, holds or lies inside one of the run's inputs, one that holds the
working directory, and, when replacing, anything that is not an output of the same kind (a folder
with a checkpoint or an adapter; a file, not a folder).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

# What makes an existing folder one the tool may replace: it holds a checkpoint or an adapter.
OUTPUT_MARKERS = ("model.safetensors", "model.safetensors.index.json", "adapter_config.json", "safegene.json")


class UnsafeOutputError(ValueError):
    """An output path that would destroy an input or something the tool did not write."""


class OutputBusyError(RuntimeError):
    """Another run holds the output's lock."""


class OutputExistsError(FileExistsError):
    """The output already exists and replacing it was not asked for."""

    def __init__(self, path: str | os.PathLike):
        super().__init__(f"{path}: already exists; replacing it was not asked for.")
        self.path = Path(path)


def looks_like_output(path: Path, markers=OUTPUT_MARKERS) -> bool:
    """A real folder (not a link) holding one of ``markers``."""
    return path.is_dir() and not path.is_symlink() and any((path / m).is_file() for m in markers)


def check_output(target: str | os.PathLike, inputs=(), *, overwrite: bool = False, folder: bool = True,
                 markers=OUTPUT_MARKERS) -> Path:
    """Refuses ``target`` as an output unless writing it cannot destroy anything it should not:
    it is not, does not hold and does not lie inside one of ``inputs`` (links followed), it does
    not hold the working directory, and it does not exist unless ``overwrite``, in which case it
    must be of the output's kind (``folder``: a folder holding one of ``markers``, or any folder
    with ``markers=None``; else a file)."""
    target = Path(target)
    where = target.resolve()
    for item in inputs:
        source = Path(item).resolve()
        if where == source:
            raise UnsafeOutputError(f"{target}: is the input {item}; write the output elsewhere.")
        if source.is_relative_to(where):
            raise UnsafeOutputError(f"{target}: holds the input {item}; write the output elsewhere.")
        if source.is_dir() and where.is_relative_to(source):
            raise UnsafeOutputError(f"{target}: lies inside the input {item}; write the output elsewhere.")
    if Path.cwd().resolve().is_relative_to(where):
        raise UnsafeOutputError(f"{target}: holds the working directory; write the output elsewhere.")
    if target.exists() or target.is_symlink():
        if not overwrite:
            raise OutputExistsError(target)
        if folder and markers is not None and not looks_like_output(target, markers):
            raise UnsafeOutputError(f"{target}: exists and is not a checkpoint or adapter folder; "
                                    f"refusing to replace it.")
        if not folder and (target.is_dir() or target.is_symlink()):
            raise UnsafeOutputError(f"{target}: exists and is not a plain file; refusing to replace it.")
    return target


def check_distinct(*paths) -> None:
    """Two outputs of one run may not be the same file."""
    seen = {}
    for p in paths:
        if p is None:
            continue
        key = Path(p).resolve()
        if key in seen:
            raise UnsafeOutputError(f"{p}: is also the run's output {seen[key]}; give each output its own path.")
        seen[key] = p


@contextmanager
def output_lock(target: str | os.PathLike) -> Iterator[None]:
    """Holds an exclusive lock on ``target`` (``fcntl.flock`` on a hidden ``.<name>.lock`` beside
    it) for the block: a second run writing the same output is refused, not silently raced."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = target.parent / f".{target.name}.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputBusyError(f"{target}: another run is writing it now.") from None
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)
    finally:
        os.close(fd)


def temp_sibling(target: str | os.PathLike, kind: str = "tmp") -> Path:
    """The hidden temporary name beside ``target`` that this process builds it under."""
    target = Path(target)
    return target.parent / f".{target.name}.{kind}-{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def sweep_stale(target: str | os.PathLike) -> None:
    """What a killed run left beside ``target``: its temporary (removed) and, if it died between
    moving the old output aside and renaming the new one in, the old output (put back)."""
    target = Path(target)
    if not target.parent.is_dir():
        return
    for kind in ("tmp", "old"):
        for leftover in target.parent.glob(f".{target.name}.{kind}-*"):
            pid = leftover.name.rsplit("-", 1)[-1]
            if not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)):
                continue
            if kind == "old" and not (target.exists() or target.is_symlink()):
                leftover.rename(target)
            else:
                remove(leftover)


def remove(path: Path) -> None:
    """Removes a file or folder if it is there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def fsync_dir(folder: str | os.PathLike) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_file(target: str | os.PathLike, mode: str = "w", *, overwrite: bool = True, inputs=(),
                encoding: str | None = "utf-8") -> Iterator:
    """An open file that becomes ``target`` when the block ends without error."""
    target = check_output(target, inputs, overwrite=overwrite, folder=False)
    tmp = temp_sibling(target)
    try:
        with open(tmp, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _commit(_Finished(tmp, target, overwrite, folder=False))


def write_text(target: str | os.PathLike, text: str, **kw) -> Path:
    with atomic_file(target, **kw) as f:
        f.write(text)
    return Path(target)


def write_json(target: str | os.PathLike, obj, *, indent: int | None = 2, **kw) -> Path:
    return write_text(target, json.dumps(obj, indent=indent), **kw)


def save_figure(fig, target: str | os.PathLike, **kw) -> Path:
    """A matplotlib figure as a PNG, atomically."""
    with atomic_file(target, "wb") as f:
        fig.savefig(f, format="png", **kw)
    return Path(target)


def prepare_folder(target: str | os.PathLike, inputs=(), *, overwrite: bool = False,
                   markers=OUTPUT_MARKERS) -> tuple[Path, Path]:
    """(target, its fresh temporary folder): what a killed run left beside it cleared, the
    output checked (``check_output``), then the empty temporary made."""
    sweep_stale(target)
    target = check_output(target, inputs, overwrite=overwrite, markers=markers)
    tmp = temp_sibling(target)
    remove(tmp)
    tmp.mkdir(parents=True)
    return target, tmp


@contextmanager
def atomic_folder(target: str | os.PathLike, *, overwrite: bool = False, inputs=(),
                  markers=OUTPUT_MARKERS) -> Iterator[Path]:
    """A fresh temporary folder to fill; on a clean exit it is fsynced and renamed to ``target``
    (an existing ``target`` is replaced only with ``overwrite``; see ``check_output``), on any
    error removed."""
    target, tmp = prepare_folder(target, inputs, overwrite=overwrite, markers=markers)
    # files written into tmp are parts of this folder, not outputs of a ``together()`` block
    outside = _finished_together.set(None)
    try:
        yield tmp
    except BaseException:
        remove(tmp)
        raise
    finally:
        _finished_together.reset(outside)
    commit_folder(tmp, target, overwrite=overwrite)


def commit_folder(tmp: Path, target: Path, *, overwrite: bool) -> None:
    """Puts the finished folder ``tmp`` in place as ``target`` (see ``_Finished``)."""
    fsync_dir(tmp)
    _commit(_Finished(tmp, target, overwrite, folder=True))


@dataclass
class _Finished:
    """A complete output under its temporary name, waiting to be put in place."""
    tmp: Path
    target: Path
    overwrite: bool
    folder: bool
    old: Path | None = None  # where the output it replaces was moved aside

    def put_in_place(self) -> None:
        """The old output (with ``overwrite``) is moved aside, then the new one renamed in: at no
        moment is there neither. A file is linked in, so one another run made meanwhile is never
        replaced."""
        if self.target.exists() or self.target.is_symlink():
            if not self.overwrite:
                raise OutputExistsError(self.target)
            self.old = temp_sibling(self.target, "old")
            remove(self.old)
            self.target.rename(self.old)
        if self.folder:
            self.tmp.rename(self.target)
        else:
            try:
                os.link(self.tmp, self.target)
            except FileExistsError:
                raise OutputExistsError(self.target) from None
            self.tmp.unlink()
        fsync_dir(self.target.parent)

    def take_back(self) -> None:
        """Undoes ``put_in_place``: the new output removed, the old one back."""
        remove(self.target)
        if self.old is not None:
            self.old.rename(self.target)
            self.old = None

    def finish(self) -> None:
        if self.old is not None:
            remove(self.old)

    def discard(self) -> None:
        remove(self.tmp)


# The outputs a ``together()`` block has finished so far; None outside such a block.
_finished_together: ContextVar[list[_Finished] | None] = ContextVar("finished_together", default=None)


def _commit(output: _Finished) -> None:
    pending = _finished_together.get()
    if pending is None:
        _put_all_in_place([output])
    else:
        pending.append(output)


def _put_all_in_place(outputs: list[_Finished]) -> None:
    placed = []
    try:
        for output in outputs:
            output.put_in_place()
            placed.append(output)
    except BaseException:  # a signal too: every output goes back to how it was
        for output in reversed(placed):
            output.take_back()
        for output in outputs:
            output.discard()
        raise
    for output in outputs:
        output.finish()


@contextmanager
def together() -> Iterator[None]:
    """Every output finished in the block appears when the block ends without error, or none does.

    An output cannot be read back inside the block (it is still under its temporary name). In a
    nested block the outermost one puts them in place."""
    if _finished_together.get() is not None:
        yield
        return
    pending: list[_Finished] = []
    token = _finished_together.set(pending)
    try:
        yield
    except BaseException:
        for output in pending:
            output.discard()
        raise
    finally:
        _finished_together.reset(token)
    _put_all_in_place(pending)
