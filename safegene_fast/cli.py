"""The ``safegene`` command."""

from __future__ import annotations

import argparse
import json
import sys

import torch


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="safegene",
        description="Extract a low-rank safety gene from aligned/degraded LLM checkpoints and "
        "re-apply it to fine-tunes of the same family.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    doctor = sub.add_parser("doctor", help="print what was built and what this machine can run",
                            description="Print the package and torch versions, the CPU "
                            "instruction set the kernels use, and whether CUDA kernels were "
                            "built (and for which architectures).")
    doctor.add_argument("--json", action="store_true", help="print JSON instead of a table")
    doctor.set_defaults(func=cmd_doctor)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
