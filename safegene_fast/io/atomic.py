"""Every file and folder the tool writes appears complete or not at all.

Each output is built under a hidden temporary name beside its target (same filesystem, so the
final rename is atomic), fsynced, and renamed into place only when complete; on any error the
temporary is removed. A folder that replaces an existing one is moved aside first, so at no
moment is there neither the old nor the new output.

    with atomic_file(path) as f: f.write(...)            # text; mode="wb" for bytes
    write_json(path, obj)
    with atomic_folder(out, overwrite=True) as tmp: ...  # fill tmp; it becomes out on exit
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class OutputExistsError(FileExistsError):
    """The output already exists and replacing it was not asked for."""

    def __init__(self, path: str | os.PathLike):
        super().__init__(f"{path}: already exists; replacing it was not asked for.")
        self.path = Path(path)


def temp_sibling(target: str | os.PathLike, kind: str = "tmp") -> Path:
    """The hidden temporary name beside ``target`` that this process builds it under."""
    target = Path(target)
    return target.parent / f".{target.name}.{kind}-{os.getpid()}"


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
def atomic_file(target: str | os.PathLike, mode: str = "w", *, overwrite: bool = True,
                encoding: str | None = "utf-8") -> Iterator:
    """An open file that becomes ``target`` when the block ends without error."""
    target = Path(target)
    if target.exists() and not overwrite:
        raise OutputExistsError(target)
    tmp = temp_sibling(target)
    try:
        with open(tmp, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


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


@contextmanager
def atomic_folder(target: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """A fresh temporary folder to fill; on a clean exit it is fsynced and renamed to ``target``
    (an existing ``target`` is replaced only with ``overwrite``), on any error removed."""
    target = Path(target)
    if target.exists() and not overwrite:
        raise OutputExistsError(target)
    tmp = temp_sibling(target)
    remove(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        commit_folder(tmp, target, overwrite=overwrite)
    finally:
        remove(tmp)


def commit_folder(tmp: Path, target: Path, *, overwrite: bool) -> None:
    """Renames the finished folder ``tmp`` to ``target``: the old ``target`` (with ``overwrite``)
    is moved aside first and removed only once the new one is in place."""
    fsync_dir(tmp)
    old = None
    if target.exists() or target.is_symlink():
        if not overwrite:
            raise OutputExistsError(target)
        old = temp_sibling(target, "old")
        remove(old)
        target.rename(old)
    tmp.rename(target)
    fsync_dir(target.parent)
    if old is not None:
        remove(old)
