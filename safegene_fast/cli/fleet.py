"""Fine-tunes one at a time or by the fleet: ``protect`` and ``batch``."""

from __future__ import annotations

import argparse
import json
import sys

from safegene_fast.cli.options import (
    UsageError,
    add_base_option,
    add_output_options,
    check_outputs,
    finite_float,
    load_coeffs,
    positive_float,
    positive_int,
    print_result,
    read_prompts,
    with_bases,
)

def cmd_protect(args: argparse.Namespace) -> int:
    from safegene_fast.fleet.protect import Settings, Shots, protect
    if bool(args.harmful) != bool(args.keep):
        raise UsageError("--harmful and --keep go together: the refusals to make likely and the task answers to keep.")
    if args.harmful and (args.coeffs or args.alpha is not None):
        raise UsageError("give --alpha/--coeffs, or --harmful and --keep to recalibrate them, not both.")
    check_outputs(args, [*with_bases([args.model], args.base), args.gene], folders=[args.out])
    shots = None
    if args.harmful:
        from safegene_fast.eval.generate import REFUSAL
        shots = Shots(read_prompts(args.harmful), read_prompts(args.keep), args.refusal or REFUSAL, args.shots,
                      args.steps, args.lr, args.alpha_max)
    coeffs = None if shots else load_coeffs(args.coeffs) if args.coeffs else 1.0 if args.alpha is None else args.alpha
    settings = Settings(format=args.format, coeffs=coeffs, recalibrate=shots,
                        evaluate=read_prompts(args.evaluate)[:args.limit] if args.evaluate else None)
    done = protect(args.model, args.gene, args.out, base=args.base, overwrite=args.overwrite, progress=not args.quiet,
                   settings=settings)
    evaluation = done.record["evaluation"]
    line = f"wrote {args.out} ({args.format}, {done.seconds:.1f} s): coefficients {summary(done.coefficients)}"
    if evaluation:
        line += f"; harmful rate {evaluation['before']:.3f} -> {evaluation['after']:.3f} (n={evaluation['harmful_n']})"
    print_result(args, {"out": args.out, "seconds": done.seconds, "bytes": done.nbytes, **done.record}, line)
    return 0


def summary(coeffs) -> str:
    """Coefficients in a few characters: one number, or count and range."""
    if not isinstance(coeffs, dict):
        return f"{coeffs:g}"
    values = list(coeffs.values())
    return f"{len(values)} keys, {min(values):.2f}-{max(values):.2f}" if values else "none"


def table(rows: list[dict]) -> str:
    head = ["target", "status", "seconds", "GB", "coefficients", "harmful before -> after"]
    lines = []
    for r in rows:
        e = r.get("evaluation")
        lines.append([r["target"], r["status"], "-" if r.get("seconds") is None else f"{r['seconds']:.1f}",
                      f"{r['gb']:.2f}" if "gb" in r else "-", summary(r["coefficients"]) if "coefficients" in r else "-",
                      f"{e['before']:.3f} -> {e['after']:.3f}" if e else "-"])
    widths = [max(len(str(x[i])) for x in [head, *lines]) for i in range(len(head))]
    out = ["  ".join(str(c).ljust(w) for c, w in zip(x, widths)).rstrip() for x in [head, *lines]]
    out.insert(1, "  ".join("-" * w for w in widths))
    failed = [r for r in rows if r["status"] == "failed"]
    out += [f"{r['target']}: {r['error']}" for r in failed]
    return "\n".join(out)


def cmd_batch(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from safegene_fast.fleet.batch import run_batch
    from safegene_fast.fleet.recipe import load_recipe
    total = len(load_recipe(args.recipe).targets)  # the recipe's errors come before the bar
    bar = tqdm(total=total, desc="batch", unit="target", disable=args.quiet, file=sys.stderr, leave=False)

    def on_row(row: dict, done: int, total: int) -> None:
        bar.n = done
        bar.refresh()
        if not args.quiet:
            tail = f": {row['error']}" if row["status"] == "failed" else f" in {row['seconds']:.1f} s"
            bar.write(f"{row['target']}: {row['status']}{tail}", file=sys.stderr)

    try:
        rows = run_batch(args.recipe, executor=args.executor, workers=args.workers, address=args.ray_address,
                         resume=args.resume, overwrite=args.overwrite, progress=not args.quiet, on_row=on_row)
    finally:
        bar.close()
    failed = sum(r["status"] == "failed" for r in rows)
    if args.json:
        print(json.dumps({"rows": rows, "failed": failed}))
    else:
        print(table(rows))
    return min(failed, 125)  # how many targets failed (0: all protected)


def register(sub) -> None:
    p = sub.add_parser("protect", help="protect one fine-tune: recalibrate (or take coefficients), apply, record",
                       description="Protect fine-tune MODEL with GENE in one command: coefficients recalibrated on "
                       "MODEL from a few shots (--harmful and --keep), or given (--alpha, --coeffs); the gene "
                       "applied (merged checkpoint, PEFT adapter, or for a LoRA target one combined adapter); "
                       "optionally the harmful rate before and after (--evaluate); and, inside OUT, "
                       "safegene-run.json: inputs and their fingerprints, the gene's provenance, coefficients, "
                       "settings, versions, timings and evaluation.")
    p.add_argument("--model", required=True, metavar="T", help="the fine-tune: a checkpoint or a LoRA adapter folder")
    add_base_option(p)
    p.add_argument("--gene", required=True, metavar="GENE", help="a gene folder (its selected layers are used)")
    p.add_argument("--out", required=True, metavar="OUT", help="output folder")
    coeff = p.add_mutually_exclusive_group()
    coeff.add_argument("--alpha", type=finite_float, help="one coefficient for every module (default 1)")
    coeff.add_argument("--coeffs", metavar="JSON", help="per-layer or per-module coefficients")
    p.add_argument("--harmful", metavar="FILE", help="harmful prompts whose refusal recalibration makes likely")
    p.add_argument("--keep", metavar="FILE", help="task prompts whose own answers recalibration keeps")
    p.add_argument("--refusal", help="the refusal text (default: a generic one, as recalibrate's)")
    p.add_argument("--shots", type=positive_int, default=16, help="prompts of each kind used (default 16)")
    p.add_argument("--steps", type=positive_int, default=40, help="gradient steps (default 40)")
    p.add_argument("--lr", type=positive_float, default=0.1, help="Adam learning rate (default 0.1)")
    p.add_argument("--alpha-max", type=positive_float, default=2.0, help="upper bound of a coefficient (default 2)")
    p.add_argument("--format", choices=["merged", "peft", "combined"], default="merged",
                   help="output kind (default merged)")
    p.add_argument("--evaluate", metavar="FILE", help="held-out harmful prompts: harmful rate before and after")
    p.add_argument("--limit", type=positive_int, help="use only the first N --evaluate prompts")
    add_output_options(p, overwrite="replace an earlier output at OUT (only once the new one is complete)")
    p.set_defaults(func=cmd_protect)

    p = sub.add_parser("batch", help="protect every fine-tune of a recipe, in a local process pool or on Ray",
                       description="Run RECIPE.yaml: one gene (a folder, or extracted once), one way to get "
                       "coefficients (alpha, coeffs or recalibrate), an output format, and a list of targets "
                       "(checkpoints, Hub ids or LoRA adapter folders), each protected as by 'safegene protect'. "
                       "The recipe and every output are checked before anything runs; a target that fails is "
                       "reported and the others go on; the exit status is the number that failed (0: all were protected). "
                       "See docs/fleet.md.")
    p.add_argument("recipe", metavar="RECIPE.yaml", help="the recipe")
    p.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="local: a process pool on this machine (default); ray: one Ray task per target")
    p.add_argument("--workers", type=positive_int, default=1,
                   help="targets at a time (local), or the CPUs of the local Ray started when no cluster is given")
    p.add_argument("--ray-address", metavar="ADDR", help="a running Ray cluster (default: RAY_ADDRESS, else a local one)")
    p.add_argument("--resume", action="store_true",
                   help="skip targets whose output is complete and was made from this recipe and these inputs")
    add_output_options(p, json_help="print the rows as JSON on stdout",
                       overwrite="replace earlier outputs of the targets (only once each new one is complete)")
    p.set_defaults(func=cmd_batch)
