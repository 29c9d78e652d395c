"""The end-to-end runs and the installation report: ``demo``, ``study`` and ``doctor``."""

from __future__ import annotations

import argparse
import json
import sys

from safegene_fast.cli.options import (
    add_output_options,
    add_scorer_option,
    positive_int,
    print_result,
)


def command_line(args: argparse.Namespace) -> str:
    return "safegene " + " ".join(args.argv)


def cmd_demo(args: argparse.Namespace) -> int:
    from safegene_fast.experiments.demo import format_table, run_demo
    result = run_demo(args.preset, args.seed, args.out, shots=args.shots, rank=args.rank, layers=args.layers,
                      scorer=args.scorer, rebuild=args.rebuild, progress=not args.quiet, command=command_line(args))
    print_result(args, result, format_table(result) + f"\n\nplots, genes, coefficients and demo.json in {args.out}/ "
                                                      f"({result['seconds']:.0f} s in all)")
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    from safegene_fast.experiments.study import format_table, run_study
    from safegene_fast.io import check_output
    if args.json_out:
        check_output(args.json_out, overwrite=True, folder=False)  # a result file is replaced; a folder is not
    result = run_study(args.preset, args.seed, args.out, rebuild=args.rebuild, progress=not args.quiet,
                       command=command_line(args), json_out=args.json_out)
    print_result(args, result, format_table(result) + f"\n\nplot, genes, layer scores, coefficients and study.json "
                                                      f"in {args.out}/ ({result['seconds']:.0f} s in all)")
    return 0


def doctor_report() -> dict:
    """What this installation can run: versions, CPU kernels' ISA, CUDA build and device."""
    import torch

    from safegene_fast import ops
    from safegene_fast._version import __version__

    info = ops.build_info()
    return {
        "safegene_fast": __version__,
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


def register(sub) -> None:
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
    add_scorer_option(p, "layer-selection score (default patch: the refusal gain each layer's gene gives)")
    p.add_argument("--rebuild", action="store_true", help="retrain the family even if cached")
    add_output_options(p, json_help="print the result as JSON (last line on stdout)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("study", help="SafeGene vs the baselines on SmolLM2-135M-Instruct",
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
    add_output_options(p, json_help="print the result as JSON instead of the table")
    p.set_defaults(func=cmd_study)

    p = sub.add_parser("doctor", help="print what was built and what this machine can run",
                       description="Print the package and torch versions, the CPU instruction set the "
                       "kernels use, and whether CUDA kernels were built (and for which architectures).")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_doctor)
