"""What every command shares: the common options (declared once), argument types, input files
read with one-line errors, and the result summary printed on stdout."""

from __future__ import annotations

import argparse
import json
import math
import re
import resource
from fractions import Fraction
from pathlib import Path

from safegene_fast.io.inputs import load_coeffs, read_prompts  # noqa: F401  (the commands' input files)
from safegene_fast.io.writer import DEFAULT_MAX_SHARD_SIZE
from safegene_fast.method.selection import SCORERS

MAX_SIZE = 2**60  # bytes


class UsageError(ValueError):
    """Bad command-line values that argparse cannot check by itself."""


# ----------------------------------------------------------------------------- argument types

def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB' or plain bytes, like transformers' max_shard_size."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", text.upper())
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 5GB, 500MB or a byte count)")
    unit = match[2].rstrip("B") or ""
    scale = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
             "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}[unit]
    size = int(Fraction(match[1]) * scale)  # exact: no float overflow for a long number
    if size <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    if size > MAX_SIZE:
        raise argparse.ArgumentTypeError(f"size is larger than any disk: {text[:40]!r}")
    return size


def number_type(convert, valid, requirement: str):
    """An argparse type: ``convert`` the text, then require ``valid`` of the value."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {'an integer' if convert is int else 'a number'}: "
                                             f"{text!r}") from None
        if not valid(value):
            raise argparse.ArgumentTypeError(f"{requirement}: {text!r}")
        return value
    return parse


finite_float = number_type(float, math.isfinite, "must be finite")
positive_int = number_type(int, lambda v: v > 0, "must be positive")
positive_float = number_type(float, lambda v: math.isfinite(v) and v > 0, "must be a positive number")


# ----------------------------------------------------------------------------- common options

def add_output_options(p: argparse.ArgumentParser, *, json_help: str = "print a JSON summary on stdout",
                       overwrite: str | None = None) -> None:
    """``--quiet``, ``--verbose``, ``--json`` and (with its help text) ``--overwrite``."""
    p.add_argument("--quiet", action="store_true", help="no progress bars or status messages")
    p.add_argument("--verbose", action="store_true", help="more status messages (debug level)")
    p.add_argument("--json", action="store_true", help=json_help)
    if overwrite:
        p.add_argument("--overwrite", action="store_true", help=overwrite)


def add_engine_options(p: argparse.ArgumentParser, *, shards: bool = True, nonfinite: bool = False,
                       overwrite: bool = True) -> None:
    """Options the streaming commands share."""
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="where the kernels run (default cpu; cuda needs a CUDA build)")
    if shards:
        default = f"{DEFAULT_MAX_SHARD_SIZE // 10**9}GB"
        p.add_argument("--max-shard-size", type=parse_size, default=DEFAULT_MAX_SHARD_SIZE, metavar="SIZE",
                       help=f"largest output shard, e.g. 5GB or 500MB (default {default})")
    if nonfinite:
        p.add_argument("--allow-nonfinite", action="store_true",
                       help="go on past NaN/Inf values (with a warning) instead of stopping: a delta's are "
                       "zeroed, the model's own are kept")
    add_output_options(p, json_help="print a JSON summary (times, bytes, peak RSS) on stdout",
                       overwrite="replace OUT if it exists" if overwrite else None)


def add_base_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", metavar="BASE",
                   help="the base model of every input given as a PEFT LoRA adapter folder (default: the one its "
                        "adapter_config.json names, a folder or a Hub id in the local cache)")


def with_bases(models, base=None) -> list:
    """``models`` and, for each that is a LoRA adapter folder, its base: what an output may not
    touch. ``--base`` with no adapter among ``models`` is a mistake, not something to ignore."""
    from safegene_fast.io import CheckpointError
    from safegene_fast.lora import base_of, is_adapter
    adapters = [path for path in models if path is not None and is_adapter(path)]
    if base is not None and not adapters:
        raise UsageError("--base is the base model of LoRA adapter inputs, and no input here is an adapter folder.")
    out = list(models)
    for path in adapters:
        try:
            out.append(base_of(path, base))
        except CheckpointError:  # the run itself says what is wrong with it
            pass
    return out


def add_prompt_options(p: argparse.ArgumentParser, harmful_help: str) -> None:
    """Prompt sets: files of the user's, or by default the embedded family's splits."""
    p.add_argument("--family", default="default", metavar="PRESET",
                   help="take default prompts from the embedded family's splits (default: default)")
    p.add_argument("--seed", type=int, default=0, help="the family's seed (default 0)")
    p.add_argument("--harmful", metavar="FILE", help=harmful_help + " (one per line, or a JSON list)")


def add_scorer_option(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--scorer", choices=list(SCORERS), default="patch", help=help)


# ----------------------------------------------------------------------------- input files

def read_examples(path: str):
    """A task file: JSON lines {"prompt": ..., "answer": ...}."""
    from safegene_fast.eval.judge import Example
    try:
        rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
        examples = [Example(str(r["prompt"]), str(r["answer"])) for r in rows]
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: cannot read the task file ({getattr(exc, 'strerror', None) or exc}).") from None
    except (json.JSONDecodeError, KeyError, TypeError):
        raise UsageError(f'{path}: a task file has one JSON object per line with "prompt" and "answer".') from None
    if not examples:
        raise UsageError(f"{path}: the task file has no examples.")
    return examples


def check_outputs(args: argparse.Namespace, inputs=(), *, folders=(), files=()) -> None:
    """Before a long run, not after it: every output path is safe to write (``io.check_output``:
    none is or touches an input, an existing one needs --overwrite and must be of its kind), no
    two are the same, and each is locked against another run until this one ends."""
    from safegene_fast.io import check_distinct, check_output, output_lock
    check_distinct(*folders, *files)
    for path, folder in [*((p, True) for p in folders), *((p, False) for p in files)]:
        if path is not None:
            args.locks.enter_context(output_lock(path))
            check_output(path, inputs, overwrite=args.overwrite, folder=folder)


# ----------------------------------------------------------------------------- results

def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def summary(command: str, seconds: float, nbytes: int, out, **extra) -> dict:
    return {"command": command, "out": str(out), "seconds": round(seconds, 4), "bytes": nbytes,
            "gb_per_s": round(nbytes / seconds / 1e9, 4) if seconds > 0 else None,
            "peak_rss_mb": round(peak_rss_mb(), 1), **extra}


def report(args: argparse.Namespace, result: dict, line: str) -> None:
    """``--json``: the result as one JSON line; else one human line with the throughput."""
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{line}: {result['bytes'] / 1e9:.2f} GB in {result['seconds']:.2f} s "
              f"({result['gb_per_s']} GB/s), peak RSS {result['peak_rss_mb']:.0f} MB")


def print_result(args: argparse.Namespace, result: dict, lines: str) -> None:
    print(json.dumps(result) if args.json else lines)
