"""The ``safegene`` command: one module per group of commands (``engine``: extract, apply, resta,
bench; ``method``: eval, select, recalibrate; ``experiments``: demo, study, doctor), the options
they share in ``options``.

Expected failures (bad input, a full disk) end with one line ``safegene: error: ...`` on stderr and
exit status 1; usage errors exit 2 (argparse). Results go to stdout (``--json``: one
machine-readable line, the last); progress bars and status messages go to stderr, ``--quiet``
turns them off and ``--verbose`` adds debug messages. A stop signal (Ctrl-C, SIGTERM, SIGHUP) at any
moment, start-up included, ends with one line ``safegene: stopped by SIGINT...`` and exit status
128 + the signal's number.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import warnings

# Only the standard library here, and little of it: the commands import torch, transformers and the
# package (seconds), and that happens in main() once the stop signals are handled, so a Ctrl-C during
# start-up ends with one line and not a traceback. The names kept here for callers come on first use.
_FROM_OPTIONS = ("UsageError", "parse_size")

__all__ = ["UsageError", "build_parser", "main", "parse_size"]

EXIT_ERROR = 1
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MODEL_COMMANDS = ("eval", "select", "recalibrate", "demo", "study", "protect", "batch")  # the ones that load transformers models


def __getattr__(name: str):
    if name in _FROM_OPTIONS:
        from safegene_fast.cli import options
        return getattr(options, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_parser() -> argparse.ArgumentParser:
    from safegene_fast._version import __version__
    from safegene_fast.cli import engine, experiments, fleet, method
    parser = argparse.ArgumentParser(
        prog="safegene",
        description="Extract a low-rank safety gene from aligned/degraded LLM checkpoints and "
        "re-apply it to fine-tunes of the same family. Checkpoints are Hugging Face folders "
        "(model.safetensors, or shards with model.safetensors.index.json) streamed from disk one "
        "tensor at a time.",
    )
    parser.add_argument("--version", action="version", version=f"safegene_fast {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in (engine, method, fleet, experiments):
        group.register(sub)
    return parser


def fix_mmap_threshold() -> None:
    """Have glibc serve every allocation of 1 MiB or more by mmap, so a freed tensor goes back to
    the OS at once. Its default threshold adapts upward (to 32 MiB) as tensors are freed, and the
    freed multi-MB blocks then pile up in the heap over the first layers of a pass: peak RSS
    would drift with model depth instead of tracking the tensors in flight."""
    import ctypes
    try:
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 2**20)
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def configure_logging(args: argparse.Namespace) -> None:
    import logging

    class ShortNames(logging.Formatter):
        """``demo: family ready ...``: the last part of the module's logger name, then the message."""

        def format(self, record: logging.LogRecord) -> str:
            return f"{record.name.rsplit('.', 1)[-1]}: {record.getMessage()}"

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(ShortNames())
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
_received: list[int] = []  # the stop signals raised as Stopped since stop_on_signals


def _ignore_stop_signals() -> None:
    for s in STOP_SIGNALS:  # a second signal must not cut the clean-up (or the last line) short
        signal.signal(s, signal.SIG_IGN)


def _stop(signum, frame):
    _ignore_stop_signals()
    _received.append(signum)
    raise Stopped(signum)


def _exit_during_start_up(signum, frame):
    """Before the command runs there is nothing to remove, and an exception raised inside the
    imports of torch and numpy may never arrive: their C++ code swallows it (the import then fails
    later) or aborts the process on it. So the process ends here, at once."""
    _ignore_stop_signals()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os.write(2, f"{stop_line(signum, running=False)}\n".encode())
    os._exit(128 + signum)


def stop_on_signals(handler=_stop) -> dict:
    """Turn the stop signals into ``Stopped`` (in the main thread, as Python requires), or hand
    them to ``handler``; returns the handlers they had."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    _received.clear()
    return {s: signal.signal(s, handler) for s in STOP_SIGNALS}


def stop_line(signum: int, running: bool) -> str:
    removed = "; partial outputs were removed" if running else ""  # none exist before the command runs
    return f"safegene: stopped by {signal.Signals(signum).name}{removed}."


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    print(f"safegene: warning: {message}", file=file or sys.stderr)


def error_line(exc: BaseException) -> str:
    """The one line an expected failure is reported with; only here are flags named."""
    from safegene_fast.io import OutputExistsError
    from safegene_fast.pipeline import NonFiniteError
    if isinstance(exc, OutputExistsError):
        return f"{exc.path}: already exists; pass --overwrite to replace it."
    if isinstance(exc, NonFiniteError):
        return f"{exc} Pass --allow-nonfinite to {exc.allowing}."
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    # First of all: the imports below (torch, transformers, the commands) are where a start-up
    # spends its time, and a signal then would print a traceback.
    previous = stop_on_signals(_exit_during_start_up)
    try:
        args = build_parser().parse_args(argv)
        args.argv = sys.argv[1:] if argv is None else list(argv)
        fix_mmap_threshold()
        warnings.showwarning = _one_line_warning
        configure_logging(args)
        if args.command in MODEL_COMMANDS:
            # transformers draws a bar for every model it loads: noise next to ours
            from transformers.utils import logging as hf_logging
            hf_logging.disable_progress_bar()
        args.locks = contextlib.ExitStack()  # the outputs' locks, held until the command ends
        stop_on_signals()  # from here a signal unwinds the command, removing its partial outputs
        return run_command(args)
    except KeyboardInterrupt as exc:
        signum = exc.signum if isinstance(exc, Stopped) else signal.SIGINT
        print(stop_line(signum, running=True), file=sys.stderr)
        return 128 + signum
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def run_command(args: argparse.Namespace) -> int:
    """The parsed command, its expected failures turned into one line and exit status 1."""
    try:
        with args.locks:
            return args.func(args)
    except (ValueError, OSError, RuntimeError) as exc:  # CheckpointError and UsageError are ValueErrors
        if _received:  # a Stopped raised inside C++ or Rust code (safetensors, torch) comes out as another error
            raise Stopped(_received[-1]) from exc
        if os.environ.get("SAFEGENE_TRACEBACK"):
            raise
        print(f"safegene: error: {error_line(exc)}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
