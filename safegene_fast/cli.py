"""The ``safegene`` command: extract, apply, resta, bench and doctor.

Expected failures (bad input, a full disk) end with one line ``safegene: error: ...`` on stderr and
exit status 1; usage errors exit 2 (argparse). ``--json`` prints one machine-readable summary as
the last line on stdout; progress bars go to stderr and ``--quiet`` turns them off.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import re
import resource
import sys
import time
import warnings
from pathlib import Path

import torch

DEFAULT_SHARD = "5GB"
EXIT_ERROR = 1
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


class UsageError(ValueError):
    """Bad command-line values that argparse cannot check by itself."""


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB' or plain bytes, like transformers' max_shard_size."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", text.upper())
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 5GB, 500MB or a byte count)")
    number, unit = float(match[1]), match[2].rstrip("B") or ""
    scale = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
             "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}[unit]
    size = int(number * scale)
    if size <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
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


def load_coeffs(path: str) -> dict[str, float]:
    """coeffs.json: {"<layer index or module name>": alpha, ...}; absent layers get 0."""
    try:
        coeffs = json.loads(Path(path).read_text())
    except OSError as exc:
        raise UsageError(f"{path}: cannot read the coefficients file ({exc.strerror}).") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"{path}: the coefficients file is not JSON ({exc}).") from None
    if not isinstance(coeffs, dict) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in coeffs.values()):
        raise UsageError(f"{path}: the coefficients file must map layer indices or module names to "
                         f"finite numbers.")
    return {str(k): float(v) for k, v in coeffs.items()}


def checkpoint_bytes(path, names=None) -> int:
    """Bytes of the checkpoint's tensors, or of those named."""
    from safegene_fast.io import Checkpoint
    with Checkpoint(path) as ckpt:
        return sum(ckpt.tensors[n].nbytes for n in (ckpt.tensors if names is None else names))


def summary(command: str, seconds: float, nbytes: int, out, **extra) -> dict:
    return {"command": command, "out": str(out), "seconds": round(seconds, 4), "bytes": nbytes,
            "gb_per_s": round(nbytes / seconds / 1e9, 4) if seconds > 0 else None,
            "peak_rss_mb": round(peak_rss_mb(), 1), **extra}


def report(args: argparse.Namespace, result: dict, line: str) -> None:
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{line}: {result['bytes'] / 1e9:.2f} GB in {result['seconds']:.2f} s "
              f"({result['gb_per_s']} GB/s), peak RSS {result['peak_rss_mb']:.0f} MB")


def cmd_extract(args: argparse.Namespace) -> int:
    from safegene_fast.pipeline import extract
    if args.energy is not None and not 0 < args.energy <= 1:
        raise UsageError(f"--energy must be in (0, 1], got {args.energy}.")
    if Path(args.out).exists() and not args.overwrite:  # before the long pass, not after it
        raise UsageError(f"{args.out}: already exists; pass --overwrite to replace it.")
    rank = args.rank if args.energy is None else None
    start = time.perf_counter()
    gene = extract(args.aligned, args.degraded, rank=rank, energy=args.energy, max_rank=args.max_rank,
                   oversample=args.oversample, power_iters=args.power_iters, seed=args.seed,
                   include=args.include, exclude=args.exclude, device=args.device,
                   allow_nonfinite=args.allow_nonfinite, progress=not args.quiet)
    gene.save(args.out, overwrite=args.overwrite, base_model=str(Path(args.aligned).resolve()))
    seconds = time.perf_counter() - start
    ranks = [m.rank for m in gene.modules.values()]
    energies = [m.energy for m in gene.modules.values()]
    gene_bytes = sum(m.A.nbytes + m.B.nbytes for m in gene.modules.values())
    nbytes = checkpoint_bytes(args.aligned, [f"{m}.weight" for m in gene.modules])  # what extract read of A
    result = summary("extract", seconds, nbytes, args.out, modules=len(ranks),
                     rank_min=min(ranks), rank_max=max(ranks), rank_total=sum(ranks),
                     energy_min=round(min(energies), 6), energy_mean=round(sum(energies) / len(energies), 6),
                     gene_mb=round(gene_bytes / 1e6, 3), nonfinite_zeroed=gene.provenance["nonfinite_zeroed"])
    report(args, result, f"wrote gene {args.out} ({len(ranks)} modules, rank {min(ranks)}-{max(ranks)}, "
                         f"mean energy kept {result['energy_mean']:.3f}, {result['gene_mb']:.1f} MB)")
    return 0


def cmd_apply(args: argparse.Namespace) -> int:
    from safegene_fast.pipeline import apply
    coeffs = load_coeffs(args.coeffs) if args.coeffs else args.alpha
    start = time.perf_counter()
    apply(args.model, args.gene, args.out, coeffs, format=args.format, max_shard_size=args.max_shard_size,
          device=args.device, overwrite=args.overwrite, progress=not args.quiet)
    seconds = time.perf_counter() - start
    nbytes = checkpoint_bytes(args.model) if args.format == "merged" else checkpoint_bytes(
        Path(args.out) / "adapter_model.safetensors")
    result = summary("apply", seconds, nbytes, args.out, format=args.format,
                     coefficients=coeffs if isinstance(coeffs, dict) else {"*": coeffs})
    report(args, result, f"wrote {'merged checkpoint' if args.format == 'merged' else 'PEFT adapter'} {args.out}")
    return 0


def cmd_resta(args: argparse.Namespace) -> int:
    from safegene_fast.pipeline import resta
    start = time.perf_counter()
    resta(args.model, args.aligned, args.degraded, args.alpha, args.out, max_shard_size=args.max_shard_size,
          device=args.device, overwrite=args.overwrite, allow_nonfinite=args.allow_nonfinite,
          progress=not args.quiet)
    seconds = time.perf_counter() - start
    result = summary("resta", seconds, checkpoint_bytes(args.model), args.out, alpha=args.alpha)
    report(args, result, f"wrote RESTA checkpoint {args.out}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from safegene_fast.bench import format_table, run_bench
    if (args.model is None) == (args.synthetic is None):
        raise UsageError("give either --model (with --gene and/or --aligned/--degraded) or --synthetic SHAPE.")
    if args.model is not None and args.gene is None and not (args.aligned and args.degraded):
        raise UsageError("--model needs --gene, or --aligned and --degraded to extract one.")
    if bool(args.aligned) != bool(args.degraded):
        raise UsageError("--aligned and --degraded go together.")
    result = run_bench(model=args.model, gene=args.gene, aligned=args.aligned, degraded=args.degraded,
                       synthetic=args.synthetic, work=args.work, rank=args.rank, alpha=args.alpha,
                       device=args.device, keep=args.keep, repeat=args.repeat, progress=not args.quiet)
    if args.json:
        print(json.dumps(result))
    else:
        print(format_table(result))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from safegene_fast.judge import OPENING, REFUSAL_PHRASES, judge_check
    result = judge_check()
    if args.json:
        print(json.dumps(result))
    else:
        print(f"refusal judge ({len(REFUSAL_PHRASES)} phrases in the first {OPENING} characters) on PyRIT's "
              f"{result['n']} human-labelled responses ({result['refusals']} refusals):")
        print(f"accuracy {result['accuracy']:.3f}  precision {result['precision']:.3f}  recall {result['recall']:.3f}  "
              f"(TP {result['true_positive']}, FP {result['false_positive']}, FN {result['false_negative']}, "
              f"TN {result['true_negative']})")
    return 0


def doctor_report() -> dict:
    """What this installation can run: versions, CPU kernels' ISA, CUDA build and device."""
    import safegene_fast
    from safegene_fast import ops

    info = ops.build_info()
    return {
        "safegene_fast": safegene_fast.__version__,
        "native_module_version": info["version"],
        "torch": torch.__version__,
        "torch_built_against": info["torch_version"],
        "cpu_isa": info["cpu_isa"],
        "cpu_isa_best": info["cpu_isa_best"],
        "threads": torch.get_num_threads(),
        "cuda_built": info["cuda_built"],
        "cuda_archs": info["cuda_archs"] or None,
        "cuda_available": torch.cuda.is_available(),
    }


def cmd_doctor(args: argparse.Namespace) -> int:
    report = doctor_report()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        width = max(map(len, report))
        for key, value in report.items():
            print(f"{key:<{width}}  {value}")
    stale = report["native_module_version"] != report["safegene_fast"]
    if stale:
        print("warning: the native module is from another version; rebuild with "
              "pip install --no-build-isolation -e .", file=sys.stderr)
    return 1 if stale else 0


def _common(p: argparse.ArgumentParser, *, shards: bool = True, nonfinite: bool = False,
            overwrite: bool = True) -> None:
    """Options the streaming commands share."""
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="where the kernels run (default cpu; cuda needs a CUDA build)")
    if shards:
        p.add_argument("--max-shard-size", type=parse_size, default=parse_size(DEFAULT_SHARD), metavar="SIZE",
                       help=f"largest output shard, e.g. 5GB or 500MB (default {DEFAULT_SHARD})")
    if nonfinite:
        p.add_argument("--allow-nonfinite", action="store_true",
                       help="zero NaN/Inf entries of a delta (with a warning) instead of stopping")
    if overwrite:
        p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--json", action="store_true", help="print a JSON summary (times, bytes, peak RSS) on stdout")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="safegene",
        description="Extract a low-rank safety gene from aligned/degraded LLM checkpoints and "
        "re-apply it to fine-tunes of the same family. Checkpoints are Hugging Face folders "
        "(model.safetensors, or shards with model.safetensors.index.json) streamed from disk one "
        "tensor at a time.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("extract", help="extract a safety gene: low-rank factors of aligned - mean(degraded)",
                       description="Stream ALIGNED and one or more DEGRADED copies of it, and for every "
                       "selected linear weight keep a randomized-SVD low-rank factorization of "
                       "ALIGNED - mean(DEGRADED). The gene is written as a PEFT LoRA adapter folder "
                       "plus safegene.json (singular values, energy kept, provenance).")
    p.add_argument("--aligned", required=True, metavar="A", help="the aligned checkpoint")
    p.add_argument("--degraded", required=True, action="append", metavar="D",
                   help="a degraded counterpart (repeat for several; their mean is used)")
    p.add_argument("--out", required=True, metavar="GENE", help="output gene folder")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--rank", type=positive_int, default=16, help="fixed rank per module (default 16)")
    size.add_argument("--energy", type=finite_float, metavar="E",
                      help="smallest rank keeping this fraction of each delta's squared Frobenius norm")
    p.add_argument("--max-rank", type=positive_int, help="cap on the rank chosen by --energy")
    p.add_argument("--oversample", type=int, default=8, help="extra sketch columns (default 8)")
    p.add_argument("--power-iters", type=int, default=2, help="power iterations (default 2)")
    p.add_argument("--seed", type=int, default=0, help="sketch seed; same seed, same gene (default 0)")
    p.add_argument("--include", metavar="REGEX",
                   help=r"weights to factor (default: 2-D weights matching \.layers\.N\..*\.weight$)")
    p.add_argument("--exclude", metavar="REGEX", help="weights to leave out, e.g. 'mlp\\.'")
    _common(p, shards=False, nonfinite=True)
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("apply", help="re-apply a gene to a fine-tuned model (merged checkpoint or PEFT adapter)",
                       description="Add alpha * B @ A of every gene module to MODEL. --format merged "
                       "streams MODEL and writes the merged checkpoint; --format peft writes a LoRA "
                       "adapter for MODEL with the coefficients folded in (PEFT's merge_and_unload "
                       "gives the merged weights).")
    p.add_argument("--model", required=True, metavar="T", help="the fine-tuned target checkpoint")
    p.add_argument("--gene", required=True, metavar="GENE", help="a gene folder written by extract")
    coeff = p.add_mutually_exclusive_group()
    coeff.add_argument("--coeffs", metavar="JSON",
                       help='per-layer or per-module coefficients, e.g. {"12": 0.8, "13": 1.1}; absent layers get 0')
    coeff.add_argument("--alpha", type=finite_float, default=1.0, help="one coefficient for every module (default 1)")
    p.add_argument("--out", required=True, metavar="OUT", help="output folder")
    p.add_argument("--format", choices=["merged", "peft"], default="merged", help="output kind (default merged)")
    _common(p)
    p.set_defaults(func=cmd_apply)

    p = sub.add_parser("resta", help="the dense RESTA baseline T + alpha * (A - D)",
                       description="Stream T, A and D and write T + alpha * (A - D) for every floating "
                       "tensor (the dense safety vector of RESTA), for comparison with the gene.")
    p.add_argument("--model", required=True, metavar="T", help="the fine-tuned target checkpoint")
    p.add_argument("--aligned", required=True, metavar="A", help="the aligned checkpoint")
    p.add_argument("--degraded", required=True, metavar="D", help="the degraded counterpart")
    p.add_argument("--alpha", required=True, type=finite_float, help="the global coefficient")
    p.add_argument("--out", required=True, metavar="OUT", help="output folder")
    _common(p, nonfinite=True)
    p.set_defaults(func=cmd_resta)

    p = sub.add_parser("bench", help="measure extract/apply/resta throughput and peak RSS against the copy floor",
                       description="Time extract, apply (merged), resta and a plain streaming copy of the "
                       "same bytes, each stage in its own process so its peak RSS is its own, on your "
                       "checkpoints or on a generated Llama-shaped one, and print the GB/s, the ratio to "
                       "the copy floor and, for --synthetic, the projected time for the full model.")
    p.add_argument("--model", metavar="T", help="your target checkpoint")
    p.add_argument("--gene", metavar="GENE", help="your gene (else extracted from --aligned/--degraded)")
    p.add_argument("--aligned", metavar="A", help="aligned checkpoint, to time extract and resta")
    p.add_argument("--degraded", metavar="D", help="degraded checkpoint, to time extract and resta")
    p.add_argument("--synthetic", metavar="SHAPE",
                   help="a generated model instead, e.g. llama-7b-2layers or llama-70b-2layers")
    p.add_argument("--rank", type=positive_int, default=16, help="gene rank (default 16)")
    p.add_argument("--alpha", type=finite_float, default=1.0, help="coefficient for apply and resta (default 1)")
    p.add_argument("--work", metavar="DIR", help="folder for outputs (default: a temporary folder)")
    p.add_argument("--repeat", type=positive_int, default=3, help="rounds of stages; the median is reported (default 3)")
    p.add_argument("--keep", action="store_true", help="keep the outputs (of the last round)")
    _common(p, shards=False, overwrite=False)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("eval", help="evaluation harness (for now: check the refusal judge)",
                       description="--judge-check measures the keyword/prefix refusal judge against "
                       "PyRIT's human-labelled refusal/compliance responses (refusal.csv, refusal_extra.csv): "
                       "accuracy, precision and recall, refusal = positive. PyRIT labels an answer that "
                       "ignores the request as a refusal too, which no keyword judge can see. Evaluating a "
                       "model (harmful rate, task accuracy) is not built yet (issue 4).")
    p.add_argument("--judge-check", action="store_true", required=True,
                   help="measure the refusal judge on the labelled sets")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("doctor", help="print what was built and what this machine can run",
                       description="Print the package and torch versions, the CPU instruction set the "
                       "kernels use, and whether CUDA kernels were built (and for which architectures).")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_doctor)
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


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    print(f"safegene: warning: {message}", file=file or sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    fix_mmap_threshold()
    warnings.showwarning = _one_line_warning
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("safegene: interrupted; partial outputs were removed.", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError) as exc:  # CheckpointError is a ValueError
        if os.environ.get("SAFEGENE_TRACEBACK"):
            raise
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"safegene: error: {message}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
