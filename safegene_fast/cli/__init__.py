"""The ``safegene`` command: one module per group of commands (``engine``: extract, apply, resta,
bench; ``method``: eval, select, recalibrate; ``experiments``: demo, study, doctor), the options
they share in ``options``.

Expected failures (bad input, a full disk) end with one line ``safegene: error: ...`` on stderr and
exit status 1; usage errors exit 2 (argparse). Results go to stdout (``--json``: one
machine-readable line, the last); progress bars and status messages go to stderr, ``--quiet``
turns them off and ``--verbose`` adds debug messages.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import logging
import os
import signal
import sys
import threading
import warnings

from safegene_fast._version import __version__
from safegene_fast.cli import engine, experiments, method
from safegene_fast.cli.options import UsageError, parse_size
from safegene_fast.io import OutputExistsError
from safegene_fast.pipeline import NonFiniteError

__all__ = ["UsageError", "build_parser", "main", "parse_size"]

EXIT_ERROR = 1
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MODEL_COMMANDS = ("eval", "select", "recalibrate", "demo", "study")  # the ones that load transformers models


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="safegene",
        description="Extract a low-rank safety gene from aligned/degraded LLM checkpoints and "
        "re-apply it to fine-tunes of the same family. Checkpoints are Hugging Face folders "
        "(model.safetensors, or shards with model.safetensors.index.json) streamed from disk one "
        "tensor at a time.",
    )
    parser.add_argument("--version", action="version", version=f"safegene_fast {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in (engine, method, experiments):
        group.register(sub)
    return parser


def fix_mmap_threshold() -> None:
    """Have glibc serve every allocation of 1 MiB or more by mmap, so a freed tensor goes back to
    the OS at once. Its default threshold adapts upward (to 32 MiB) as tensors are freed, and the
    freed multi-MB blocks then pile up in the heap over the first layers of a pass: peak RSS
    would drift with model depth instead of tracking the tensors in flight."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 2**20)
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


class _ShortNames(logging.Formatter):
    """``demo: family ready ...``: the last part of the module's logger name, then the message."""

    def format(self, record: logging.LogRecord) -> str:
        return f"{record.name.rsplit('.', 1)[-1]}: {record.getMessage()}"


def configure_logging(args: argparse.Namespace) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_ShortNames())
    root = logging.getLogger("safegene_fast")
    root.handlers[:] = [handler]
    root.propagate = False
    root.setLevel(logging.WARNING if getattr(args, "quiet", False) else
                  logging.DEBUG if getattr(args, "verbose", False) else logging.INFO)


class Stopped(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP: unwinds like Ctrl-C, so every temporary output is removed."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _stop(signum, frame):
    for s in STOP_SIGNALS:  # a second signal must not cut the clean-up short
        signal.signal(s, signal.SIG_IGN)
    raise Stopped(signum)


def stop_on_signals() -> dict:
    """Turn the stop signals into ``Stopped`` (in the main thread, as Python requires); returns
    the handlers they had."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {s: signal.signal(s, _stop) for s in STOP_SIGNALS}


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    print(f"safegene: warning: {message}", file=file or sys.stderr)


def error_line(exc: BaseException) -> str:
    """The one line an expected failure is reported with; only here are flags named."""
    if isinstance(exc, OutputExistsError):
        return f"{exc.path}: already exists; pass --overwrite to replace it."
    if isinstance(exc, NonFiniteError):
        return f"{exc} Pass --allow-nonfinite to zero them."
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    fix_mmap_threshold()
    warnings.showwarning = _one_line_warning
    configure_logging(args)
    if args.command in MODEL_COMMANDS:
        # transformers draws a bar for every model it loads: noise next to ours
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
    previous = stop_on_signals()
    args.locks = contextlib.ExitStack()  # the outputs' locks, held until the command ends
    try:
        with args.locks:
            return args.func(args)
    except KeyboardInterrupt as exc:
        signum = exc.signum if isinstance(exc, Stopped) else signal.SIGINT
        print(f"safegene: stopped by {signal.Signals(signum).name}; partial outputs were removed.", file=sys.stderr)
        return 128 + signum
    except (ValueError, OSError, RuntimeError) as exc:  # CheckpointError and UsageError are ValueErrors
        if os.environ.get("SAFEGENE_TRACEBACK"):
            raise
        print(f"safegene: error: {error_line(exc)}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


if __name__ == "__main__":
    sys.exit(main())
