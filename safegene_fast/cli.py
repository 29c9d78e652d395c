"""The ``safegene`` command: extract, apply, resta, bench, eval, select, recalibrate, demo, study and doctor.

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


def read_prompts(path: str) -> list[str]:
    """A prompts file: a JSON list of strings, or one prompt per line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: cannot read the prompts file ({getattr(exc, 'strerror', None) or exc}).") from None
    if text.lstrip().startswith("["):
        try:
            prompts = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{path}: the prompts file is not valid JSON ({exc}).") from None
        if not all(isinstance(p, str) for p in prompts):
            raise UsageError(f"{path}: a JSON prompts file must be a list of strings.")
    else:
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UsageError(f"{path}: the prompts file has no prompts.")
    return prompts


def read_examples(path: str):
    """A task file: JSON lines {"prompt": ..., "answer": ...}."""
    from safegene_fast.tasks import Example
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


def family_prompts(args: argparse.Namespace):
    from safegene_fast.family import prompt_sets
    return prompt_sets(args.family, args.seed)


def cmd_eval(args: argparse.Namespace) -> int:
    if args.judge_check:
        return judge_check_report(args)
    if args.model is None:
        raise UsageError("give --model (a model to evaluate) or --judge-check.")
    from safegene_fast.evaluate import evaluate_model
    from safegene_fast.family import TARGET_TASK
    fam = family_prompts(args)
    harmful = read_prompts(args.harmful) if args.harmful else fam.harmful("heldout")
    task = read_examples(args.task) if args.task else fam.examples(TARGET_TASK, "heldout")
    start = time.perf_counter()
    result = evaluate_model(args.model, harmful[:args.limit], task[:args.limit], adapter=args.adapter,
                            max_new_tokens=args.max_new_tokens)
    result = {"model": args.model, "adapter": args.adapter, **result, "seconds": round(time.perf_counter() - start, 2)}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.model}: harmful (non-refusal) rate {result['harmful_rate']:.3f} "
              f"({result['harmful_count']}/{result['harmful_n']}), task accuracy {result['task_accuracy']:.3f} "
              f"(n={result['task_n']}), {result['seconds']:.1f} s")
    return 0


def judge_check_report(args: argparse.Namespace) -> int:
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


def cmd_select(args: argparse.Namespace) -> int:
    from safegene_fast.evaluate import chat, load_model
    from safegene_fast.family import BASE_TASK, REFUSAL
    from safegene_fast.gene import SafetyGene
    from safegene_fast.selection import plot_scores, select_layers
    gene = SafetyGene.load(args.gene)
    if args.layers is not None and args.layers > len(gene.layers):
        raise UsageError(f"--layers {args.layers}: the gene has only {len(gene.layers)} layers.")
    fam = family_prompts(args)
    harmful = read_prompts(args.harmful) if args.harmful else fam.harmful("fewshot")
    harmless = read_prompts(args.harmless) if args.harmless else [e.prompt for e in fam.examples(BASE_TASK, "fewshot")]
    start = time.perf_counter()
    aligned, tokenizer = load_model(args.aligned)
    degraded = [load_model(d)[0] for d in args.degraded]
    refusal = args.refusal or (REFUSAL if not args.harmful else None)
    if refusal is None:
        raise UsageError("with --harmful prompts, give --refusal (the refusal text the aligned model says).")
    gene.selection = select_layers(gene, aligned, degraded, tokenizer, chat(tokenizer, harmful[:args.shots]),
                                   chat(tokenizer, harmless[:args.shots]), refusal=refusal,
                                   compliance=args.compliance, scorer=args.scorer, k=args.layers,
                                   threshold=args.threshold)
    out = args.out or args.gene
    gene.save(out, overwrite=True if out == args.gene else args.overwrite,
              base_model=gene.provenance.get("aligned", ""))
    if args.plot:
        plot_scores(gene.selection, args.plot)
    result = {"gene": str(out), **gene.selection, "seconds": round(time.perf_counter() - start, 2)}
    if args.json:
        print(json.dumps(result))
    else:
        scores = gene.selection["scores"][args.scorer]
        print("layer  " + "  ".join(f"{k:>7}" for k in scores))
        print("score  " + "  ".join(f"{v:>7.3f}" for v in scores.values()))
        print(f"selected layers ({args.scorer}): {gene.selection['layers']} -> written to {out}")
    return 0


def cmd_recalibrate(args: argparse.Namespace) -> int:
    from safegene_fast import recalibrate as rc
    from safegene_fast.evaluate import REFUSAL as GENERIC_REFUSAL, chat, load_model
    from safegene_fast.family import REFUSAL, TARGET_TASK
    from safegene_fast.gene import SafetyGene
    if Path(args.out).exists() and not args.overwrite:
        raise UsageError(f"{args.out}: already exists; pass --overwrite to replace it.")
    gene = SafetyGene.load(args.gene)
    fam = family_prompts(args)
    harmful = read_prompts(args.harmful) if args.harmful else fam.harmful("fewshot")
    task = read_prompts(args.task_prompts) if args.task_prompts else [e.prompt for e in fam.examples(TARGET_TASK, "fewshot")]
    refusal = args.refusal or (GENERIC_REFUSAL if args.harmful else REFUSAL)
    start = time.perf_counter()
    model, tokenizer = load_model(args.model)
    shots = rc.FewShot(chat(tokenizer, harmful[:args.shots]), refusal, chat(tokenizer, task[:args.shots]))
    layers = gene.selected_layers
    if args.mode == "gradient":
        cal = rc.gradient(model, tokenizer, gene, layers, shots, alpha_max=args.alpha_max, steps=args.steps,
                          lr=args.lr, per_module=args.per_module, progress=not args.quiet)
    else:
        cal = rc.grid(model, tokenizer, gene, layers, shots, alpha_max=args.alpha_max,
                      per_module=args.per_module, progress=not args.quiet)
    seconds = time.perf_counter() - start
    write_json_atomic(args.out, cal.coefficients)
    if args.log:
        write_json_atomic(args.log, {"mode": cal.mode, "log": cal.log})
    if args.plot:
        rc.plot_tradeoff(rc.tradeoff_curve(model, tokenizer, gene, cal.coefficients, shots), args.plot)
    result = {"coefficients": cal.coefficients, "mode": cal.mode, "layers": layers, "shots": len(shots.harmful),
              "seconds": round(seconds, 2), "out": args.out}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"recalibrated {len(cal.coefficients)} coefficients ({cal.mode}, {len(shots.harmful)} shots, "
              f"{seconds:.1f} s): " + ", ".join(f"{k}: {v:.3f}" for k, v in cal.coefficients.items()))
        print(f"wrote {args.out}")
    return 0


def write_json_atomic(path, data) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(data, indent=2))
        tmp.rename(path)
    finally:
        tmp.unlink(missing_ok=True)


def cmd_demo(args: argparse.Namespace) -> int:
    from safegene_fast.demo import format_table, run_demo
    result = run_demo(args.preset, args.seed, args.out, shots=args.shots, rank=args.rank, layers=args.layers,
                      scorer=args.scorer, rebuild=args.rebuild, progress=not args.quiet)
    if args.json:
        print(json.dumps(result))
    else:
        print(format_table(result))
        print(f"\nplots, genes, coefficients and demo.json in {args.out}/ ({result['seconds']:.0f} s in all)")
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    from safegene_fast.study import format_table, run_study
    result = run_study(args.preset, args.seed, args.out, rebuild=args.rebuild, progress=not args.quiet,
                       command="safegene " + " ".join(args.argv))
    if args.json_out:
        write_json_atomic(args.json_out, result)
    if args.json:
        print(json.dumps(result))
    else:
        print(format_table(result))
        print(f"\nplot, genes, layer scores, coefficients and study.json in {args.out}/ ({result['seconds']:.0f} s in all)")
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

    def prompt_options(p, harmful_help: str) -> None:
        p.add_argument("--family", default="default", metavar="PRESET",
                       help="take default prompts from the embedded family's splits (default: default)")
        p.add_argument("--seed", type=int, default=0, help="the family's seed (default 0)")
        p.add_argument("--harmful", metavar="FILE", help=harmful_help + " (one per line, or a JSON list)")

    p = sub.add_parser("eval", help="evaluate a model: harmful (non-refusal) rate and task accuracy",
                       description="Generate greedily on held-out harmful prompts and judge each answer with "
                       "the keyword refusal judge (the harmful rate is the share not refused: it measures "
                       "non-refusal, not harm), and score task accuracy by exact match. Prompts default to the "
                       "embedded family's held-out splits and go through the model's chat template. "
                       "--judge-check instead measures the judge against PyRIT's human-labelled refusal "
                       "responses (accuracy, precision, recall).")
    p.add_argument("--model", metavar="M", help="a transformers causal LM folder (or merged checkpoint)")
    p.add_argument("--adapter", metavar="PEFT", help="a PEFT adapter to load on top of --model")
    prompt_options(p, "harmful prompts")
    p.add_argument("--task", metavar="JSONL", help='task examples, one {"prompt": ..., "answer": ...} a line')
    p.add_argument("--limit", type=positive_int, help="use only the first N prompts of each set")
    p.add_argument("--max-new-tokens", type=positive_int, default=16, help="generation length (default 16)")
    p.add_argument("--judge-check", action="store_true", help="measure the refusal judge on the labelled sets")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("select", help="score the gene's layers and keep the ones that carry safety",
                       description="Score every layer of GENE with activation contrast (aligned vs degraded "
                       "hidden states on harmful minus harmless prompts) and patch gain (refusal-margin gain when "
                       "the layer's gene alone is added to the degraded model), keep the top --layers K or those "
                       "scoring >= --threshold, and write the scores and the kept layers into the gene's "
                       "safegene.json (or a copy with --out).")
    p.add_argument("--gene", required=True, metavar="GENE", help="a gene folder written by extract")
    p.add_argument("--aligned", required=True, metavar="A", help="the aligned model")
    p.add_argument("--degraded", required=True, action="append", metavar="D",
                   help="the degraded counterpart(s) the gene came from (repeat for several)")
    keep = p.add_mutually_exclusive_group(required=True)
    keep.add_argument("--layers", type=positive_int, metavar="K", help="keep the K best layers")
    keep.add_argument("--threshold", type=finite_float, help="keep layers scoring at least this")
    p.add_argument("--scorer", choices=["contrast", "patch", "slope", "combined"], default="patch",
                   help="which score decides (default patch; slope: its first-order version on harmful minus harmless prompts, one backward pass each; combined: contrast and patch, each scaled by its largest value)")
    prompt_options(p, "harmful prompts")
    p.add_argument("--harmless", metavar="FILE", help="harmless prompts (one per line, or a JSON list)")
    p.add_argument("--shots", type=positive_int, default=32, help="prompts of each kind used (default 32)")
    p.add_argument("--refusal", help="refusal text for the margin (default: the family's refusal)")
    p.add_argument("--compliance", default="sure , here is", help="compliance text for the margin")
    p.add_argument("--plot", metavar="PNG", help="write a bar plot of the scores")
    p.add_argument("--out", metavar="GENE2", help="write the selected gene here instead of updating GENE")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--json", action="store_true", help="print the selection as JSON")
    p.set_defaults(func=cmd_select)

    p = sub.add_parser("recalibrate", help="learn per-layer coefficients for a target from a few shots",
                       description="For target model T and a gene (with its selected layers), find one "
                       "coefficient per layer (or per module) in [0, --alpha-max]: gradient mode trains them "
                       "through the low-rank path (hooks add alpha * B(A x), no full weights) to make the "
                       "refusal likely on harmful prompts while keeping T's own answers on task prompts; grid "
                       "mode searches a global scale, then each layer, scoring generations with the judge. "
                       "Writes coeffs.json for apply --coeffs.")
    p.add_argument("--model", required=True, metavar="T", help="the fine-tuned target model")
    p.add_argument("--gene", required=True, metavar="GENE", help="a gene (selected layers are used if present)")
    p.add_argument("--out", required=True, metavar="JSON", help="coefficients file to write")
    p.add_argument("--mode", choices=["gradient", "grid"], default="gradient", help="search mode (default gradient)")
    prompt_options(p, "harmful few-shot prompts")
    p.add_argument("--task-prompts", metavar="FILE", help="task prompts (targets: the model's own answers)")
    p.add_argument("--refusal", help="the refusal text to make likely (default: the family's, or a generic one "
                   "with --harmful)")
    p.add_argument("--shots", type=positive_int, default=32, help="prompts of each kind (default 32)")
    p.add_argument("--alpha-max", type=finite_float, default=2.0, help="upper bound of a coefficient (default 2)")
    p.add_argument("--steps", type=positive_int, default=40, help="gradient steps (default 40)")
    p.add_argument("--lr", type=finite_float, default=0.1, help="Adam learning rate (default 0.1)")
    p.add_argument("--per-module", action="store_true", help="one coefficient per module, not per layer")
    p.add_argument("--log", metavar="JSON", help="write the loss (or score) of every step")
    p.add_argument("--plot", metavar="PNG", help="write the safety-utility curve")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_recalibrate)

    p = sub.add_parser("demo", help="the main job: SafeGene vs the baselines on the embedded model family",
                       description="Build (or load from the cache) the embedded family of small Llama models, "
                       "extract a gene from each counterpart kind (de-aligned, pre-alignment, mean of two "
                       "benign-degraded), select layers, recalibrate on the target from a few shots, apply, and "
                       "evaluate no defence, RESTA (best global b), the gene at one global coefficient and "
                       "SafeGene on the same held-out prompts. Prints one table; --json prints the result.")
    p.add_argument("--preset", default="default", choices=["default", "tiny"], help="family size (default default)")
    p.add_argument("--seed", type=int, default=0, help="family seed (default 0)")
    p.add_argument("--out", default="safegene-demo", metavar="DIR", help="plots, genes, coefficients (default safegene-demo)")
    p.add_argument("--shots", type=positive_int, default=32, help="few-shot prompts of each kind (default 32)")
    p.add_argument("--rank", type=positive_int, default=8, help="gene rank (default 8)")
    p.add_argument("--layers", type=positive_int, metavar="K", help="layers to keep (default half)")
    p.add_argument("--scorer", choices=["contrast", "patch", "slope", "combined"], default="patch",
                   help="layer-selection score (default patch: the refusal gain each layer's gene gives)")
    p.add_argument("--rebuild", action="store_true", help="retrain the family even if cached")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--json", action="store_true", help="print the result as JSON (last line on stdout)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("study", help="SafeGene vs the baselines on SmolLM2-135M-Instruct (issue 5's study)",
                       description="Build (or load from the cache) the SmolLM2-135M-Instruct family (aligned by a "
                       "short safety fine-tune; de-aligned, two benign-degraded and a target fine-tuned from it), "
                       "then evaluate the members, no defence, RESTA over a b sweep, the gene at one global "
                       "coefficient and SafeGene (selection + recalibration) at 8, 16 and 32 shots for each "
                       "counterpart kind: harmful rate on held-out AdvBench and Do-Not-Answer, target-task "
                       "accuracy, over-refusal and stage times. About 80 minutes on 2 cores from scratch; the "
                       "smoke preset (a few prompts, 2 shots) takes about 5.")
    p.add_argument("--preset", default="study", choices=["study", "smoke"], help="study size (default study)")
    p.add_argument("--seed", type=int, default=0, help="family and prompt-split seed (default 0)")
    p.add_argument("--out", default="safegene-study", metavar="DIR",
                   help="plot, genes, layer scores, coefficients, study.json (default safegene-study)")
    p.add_argument("--json-out", metavar="FILE", help="also write the result JSON to FILE")
    p.add_argument("--rebuild", action="store_true", help="retrain the family even if cached")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of the table")
    p.set_defaults(func=cmd_study)

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
    args.argv = sys.argv[1:] if argv is None else list(argv)
    fix_mmap_threshold()
    warnings.showwarning = _one_line_warning
    if args.command in ("eval", "select", "recalibrate", "demo", "study"):
        # transformers draws a bar for every model it loads: noise next to ours
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
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
