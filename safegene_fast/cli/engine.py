"""The streamed passes: ``extract``, ``apply``, ``resta`` and ``bench``."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from safegene_fast.cli.options import (
    UsageError,
    add_base_option,
    add_engine_options,
    check_outputs,
    finite_float,
    load_coeffs,
    positive_int,
    report,
    summary,
    with_bases,
)
from safegene_fast.pipeline import FORMATS, MAX_OVERSAMPLE, MAX_POWER_ITERS


def checkpoint_bytes(path, names=None, base=None) -> int:
    """Bytes of the checkpoint's tensors (a LoRA adapter's: its base's), or of those named."""
    from safegene_fast.lora import open_checkpoint
    with open_checkpoint(path, base) as ckpt:
        return sum(ckpt.tensors[n].nbytes for n in (ckpt.tensors if names is None else names))


def cmd_extract(args: argparse.Namespace) -> int:
    from safegene_fast.pipeline import extract, model_reference
    if args.energy is not None and not 0 < args.energy <= 1:
        raise UsageError(f"--energy must be in (0, 1], got {args.energy}.")
    inputs = [args.aligned, *args.degraded]
    check_outputs(args, with_bases(inputs, args.base), folders=[args.out])
    rank = args.rank if args.energy is None else None
    start = time.perf_counter()
    gene = extract(args.aligned, args.degraded, rank=rank, energy=args.energy, max_rank=args.max_rank,
                   oversample=args.oversample, power_iters=args.power_iters, seed=args.seed,
                   include=args.include, exclude=args.exclude, device=args.device,
                   allow_nonfinite=args.allow_nonfinite, base=args.base, progress=not args.quiet)
    gene.save(args.out, overwrite=args.overwrite, base_model=model_reference(args.aligned),
              inputs=with_bases(inputs, args.base))
    seconds = time.perf_counter() - start
    ranks = [m.rank for m in gene.modules.values()]
    energies = [m.energy for m in gene.modules.values()]
    gene_bytes = sum(m.A.nbytes + m.B.nbytes for m in gene.modules.values())
    nbytes = checkpoint_bytes(args.aligned, [f"{m}.weight" for m in gene.modules], args.base)  # what it read of A
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
    check_outputs(args, [*with_bases([args.model], args.base), args.gene], folders=[args.out])
    start = time.perf_counter()
    apply(args.model, args.gene, args.out, coeffs, format=args.format, max_shard_size=args.max_shard_size,
          device=args.device, overwrite=args.overwrite, allow_nonfinite=args.allow_nonfinite, base=args.base,
          progress=not args.quiet)
    seconds = time.perf_counter() - start
    nbytes = checkpoint_bytes(args.model, base=args.base) if args.format == "merged" else checkpoint_bytes(
        Path(args.out) / "adapter_model.safetensors")
    result = summary("apply", seconds, nbytes, args.out, format=args.format,
                     coefficients=coeffs if isinstance(coeffs, dict) else {"*": coeffs})
    kind = {"merged": "merged checkpoint", "peft": "PEFT adapter", "combined": "combined PEFT adapter"}[args.format]
    report(args, result, f"wrote {kind} {args.out}")
    return 0


def cmd_resta(args: argparse.Namespace) -> int:
    from safegene_fast.pipeline import resta
    check_outputs(args, with_bases([args.model, args.aligned, args.degraded], args.base), folders=[args.out])
    start = time.perf_counter()
    resta(args.model, args.aligned, args.degraded, args.alpha, args.out, max_shard_size=args.max_shard_size,
          device=args.device, overwrite=args.overwrite, allow_nonfinite=args.allow_nonfinite, base=args.base,
          progress=not args.quiet)
    seconds = time.perf_counter() - start
    result = summary("resta", seconds, checkpoint_bytes(args.model, base=args.base), args.out, alpha=args.alpha)
    report(args, result, f"wrote RESTA checkpoint {args.out}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from safegene_fast.experiments.bench import format_table, run_bench
    if (args.model is None) == (args.synthetic is None):
        raise UsageError("give either --model (with --gene and/or --aligned/--degraded) or --synthetic SHAPE.")
    if args.model is not None and args.gene is None and not (args.aligned and args.degraded):
        raise UsageError("--model needs --gene, or --aligned and --degraded to extract one.")
    if bool(args.aligned) != bool(args.degraded):
        raise UsageError("--aligned and --degraded go together.")
    result = run_bench(model=args.model, gene=args.gene, aligned=args.aligned, degraded=args.degraded,
                       synthetic=args.synthetic, work=args.work, rank=args.rank, alpha=args.alpha,
                       device=args.device, keep=args.keep, repeat=args.repeat, lora_rank=args.lora_rank,
                       progress=not args.quiet)
    print(json.dumps(result) if args.json else format_table(result))
    return 0


def register(sub) -> None:
    p = sub.add_parser("extract", help="extract a safety gene: low-rank factors of aligned - mean(degraded)",
                       description="Stream ALIGNED and one or more DEGRADED copies of it, and for every "
                       "selected linear weight keep a randomized-SVD low-rank factorization of "
                       "ALIGNED - mean(DEGRADED). The gene is written as a PEFT LoRA adapter folder "
                       "plus safegene.json (singular values, energy kept, provenance).")
    p.add_argument("--aligned", required=True, metavar="A", help="the aligned checkpoint (or LoRA adapter folder)")
    p.add_argument("--degraded", required=True, action="append", metavar="D",
                   help="a degraded counterpart, a checkpoint or LoRA adapter folder (repeat for several; their "
                        "mean is used)")
    add_base_option(p)
    p.add_argument("--out", required=True, metavar="GENE", help="output gene folder")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--rank", type=positive_int, default=16, help="fixed rank per module (default 16)")
    size.add_argument("--energy", type=finite_float, metavar="E",
                      help="smallest rank keeping this fraction of each delta's squared Frobenius norm")
    p.add_argument("--max-rank", type=positive_int, help="cap on the rank chosen by --energy")
    p.add_argument("--oversample", type=int, default=8, help=f"extra sketch columns, 0 to {MAX_OVERSAMPLE} (default 8)")
    p.add_argument("--power-iters", type=int, default=2, help=f"power iterations, 0 to {MAX_POWER_ITERS} (default 2)")
    p.add_argument("--seed", type=int, default=0, help="sketch seed; same seed, same gene (default 0)")
    p.add_argument("--include", metavar="REGEX",
                   help=r"weights to factor, taken as written (default: 2-D weights matching \.layers\.N\..*\.weight$ "
                        "but MoE routers and a vision tower's layers)")
    p.add_argument("--exclude", metavar="REGEX", help="weights to leave out, e.g. 'mlp\\.'")
    add_engine_options(p, shards=False, nonfinite=True)
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("apply", help="re-apply a gene to a fine-tuned model (merged checkpoint or PEFT adapter)",
                       description="Add alpha * B @ A of every gene module to MODEL. --format merged "
                       "streams MODEL and writes the merged checkpoint; --format peft writes a LoRA "
                       "adapter for MODEL with the coefficients folded in (PEFT's merge_and_unload "
                       "gives the merged weights). MODEL may be a PEFT LoRA adapter folder (a task "
                       "fine-tune as LoRA): merged streams its base once, adding the task update and the "
                       "gene together; peft writes the gene for the merged task model; --format combined "
                       "writes one adapter on the base holding both, concatenated along the rank, for "
                       "multi-LoRA servers (PEFT's merge of it gives the merged weights).")
    p.add_argument("--model", required=True, metavar="T",
                   help="the fine-tuned target: a checkpoint, or a PEFT LoRA adapter folder")
    add_base_option(p)
    p.add_argument("--gene", required=True, metavar="GENE", help="a gene folder written by extract")
    coeff = p.add_mutually_exclusive_group()
    coeff.add_argument("--coeffs", metavar="JSON",
                       help='per-layer or per-module coefficients, e.g. {"12": 0.8, "13": 1.1}; absent layers get 0')
    coeff.add_argument("--alpha", type=finite_float, default=1.0, help="one coefficient for every module (default 1)")
    p.add_argument("--out", required=True, metavar="OUT", help="output folder")
    p.add_argument("--format", choices=list(FORMATS), default="merged",
                   help="output kind: merged, peft or (LoRA target) combined (default merged)")
    add_engine_options(p, nonfinite=True)
    p.set_defaults(func=cmd_apply)

    p = sub.add_parser("resta", help="the dense RESTA baseline T + alpha * (A - D)",
                       description="Stream T, A and D and write T + alpha * (A - D) for every floating "
                       "tensor (the dense safety vector of RESTA), for comparison with the gene.")
    p.add_argument("--model", required=True, metavar="T", help="the fine-tuned target checkpoint (or LoRA adapter)")
    p.add_argument("--aligned", required=True, metavar="A", help="the aligned checkpoint (or LoRA adapter)")
    p.add_argument("--degraded", required=True, metavar="D", help="the degraded counterpart (or LoRA adapter)")
    add_base_option(p)
    p.add_argument("--alpha", required=True, type=finite_float, help="the global coefficient")
    p.add_argument("--out", required=True, metavar="OUT", help="output folder")
    add_engine_options(p, nonfinite=True)
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
    p.add_argument("--work", metavar="DIR", help="where the outputs go, in a new subfolder that is removed at the end unless --keep "
                   "(default: the system's temporary folder); nothing else in DIR is touched")
    p.add_argument("--repeat", type=positive_int, default=3, help="rounds of stages; the median is reported (default 3)")
    p.add_argument("--lora-rank", type=positive_int, metavar="R",
                   help="also time apply on a task fine-tune given as a rank-R LoRA adapter on the model "
                        "(stage apply-lora; its floor is the copy of the base it streams)")
    p.add_argument("--keep", action="store_true", help="keep the outputs (of the last round)")
    add_engine_options(p, shards=False, overwrite=False)
    p.set_defaults(func=cmd_bench)
