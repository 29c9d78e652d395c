"""The method on loaded models: ``eval``, ``select`` and ``recalibrate``.

Their prompts are the user's files, or by default the embedded family's splits (``--family``);
the refusal and compliance texts default to that family's only when its prompts are used.
"""

from __future__ import annotations

import argparse
import time

from safegene_fast.cli.options import (
    UsageError,
    add_base_option,
    add_output_options,
    add_prompt_options,
    add_scorer_option,
    check_outputs,
    finite_float,
    positive_float,
    positive_int,
    print_result,
    read_examples,
    read_prompts,
    with_bases,
)
from safegene_fast.method.recalibrate import SEARCHES


def family_prompts(args: argparse.Namespace):
    from safegene_fast.models.toy import prompt_sets
    return prompt_sets(args.family, args.seed)


def check_prompts(args: argparse.Namespace, model, tokenizer, sets, **reserve) -> None:
    """Each set of (prompts as the model sees them, their file or None, what they are) fits the
    model's context (``check_context``); an error names the file, or the family's split."""
    from safegene_fast.eval.generate import check_context
    for prompts, path, what in sets:
        check_context(model, tokenizer, prompts, path or f"the {args.family} family's {what}", **reserve)


def cmd_eval(args: argparse.Namespace) -> int:
    if args.judge_check:
        return judge_check_report(args)
    if args.model is None:
        raise UsageError("give --model (a model to evaluate) or --judge-check.")
    from safegene_fast.eval.generate import chat, evaluate_loaded, load_model
    from safegene_fast.models.toy import TARGET_TASK
    fam = family_prompts(args)
    harmful = read_prompts(args.harmful) if args.harmful else fam.harmful("heldout")
    task = read_examples(args.task) if args.task else fam.examples(TARGET_TASK, "heldout")
    harmful, task = harmful[:args.limit], task[:args.limit]
    start = time.perf_counter()
    with_bases([args.model], args.base)  # --base needs an adapter to be the base of
    model, tokenizer = load_model(args.model, args.adapter, base=args.base)
    check_prompts(args, model, tokenizer, [(chat(tokenizer, harmful), args.harmful, "harmful prompts"),
                                           (chat(tokenizer, [e.prompt for e in task]), args.task, "task prompts")],
                  generated=args.max_new_tokens)
    result = evaluate_loaded(model, tokenizer, harmful, task, max_new_tokens=args.max_new_tokens)
    result = {"model": args.model, "adapter": args.adapter, **result, "seconds": round(time.perf_counter() - start, 2)}
    print_result(args, result, f"{args.model}: harmful (non-refusal) rate {result['harmful_rate']:.3f} "
                               f"({result['harmful_count']}/{result['harmful_n']}), task accuracy "
                               f"{result['task_accuracy']:.3f} (n={result['task_n']}), {result['seconds']:.1f} s")
    return 0


def judge_check_report(args: argparse.Namespace) -> int:
    from safegene_fast.eval.judge import OPENING, REFUSAL_PHRASES, judge_check
    r = judge_check()
    print_result(args, r, f"refusal judge ({len(REFUSAL_PHRASES)} phrases in the first {OPENING} characters) on "
                          f"PyRIT's {r['n']} human-labelled responses ({r['refusals']} refusals):\n"
                          f"accuracy {r['accuracy']:.3f}  precision {r['precision']:.3f}  recall {r['recall']:.3f}  "
                          f"(TP {r['true_positive']}, FP {r['false_positive']}, FN {r['false_negative']}, "
                          f"TN {r['true_negative']})")
    return 0


def cmd_select(args: argparse.Namespace) -> int:
    from safegene_fast.eval.generate import COMPLIANCE, chat, load_causal_lm, load_model
    from safegene_fast.gene import SafetyGene
    from safegene_fast.io import output_lock, together
    from safegene_fast.method.selection import plot_scores, select_layers
    from safegene_fast.models import toy
    gene = SafetyGene.load(args.gene)
    if args.layers is not None and args.layers > len(gene.layers):
        raise UsageError(f"--layers {args.layers}: the gene has only {len(gene.layers)} layers.")
    models = [args.aligned, *args.degraded]
    if args.out:  # a new gene beside the one read
        check_outputs(args, [args.gene, *with_bases(models, args.base)], folders=[args.out], files=[args.plot])
    else:         # the gene is updated in place: one run at a time
        args.locks.enter_context(output_lock(args.gene))
        check_outputs(args, [args.gene, *with_bases(models, args.base)], files=[args.plot])
    fam = family_prompts(args)
    harmful = read_prompts(args.harmful) if args.harmful else fam.harmful("fewshot")
    harmless = read_prompts(args.harmless) if args.harmless else [e.prompt for e in fam.examples(toy.BASE_TASK, "fewshot")]
    refusal = args.refusal or (toy.REFUSAL if not args.harmful else None)
    if refusal is None:
        raise UsageError("with --harmful prompts, give --refusal (the refusal text the aligned model says).")
    compliance = args.compliance or (toy.COMPLIANCE if not args.harmful else COMPLIANCE)
    start = time.perf_counter()
    aligned, tokenizer = load_model(args.aligned, base=args.base)
    degraded = [load_causal_lm(d, base=args.base) for d in args.degraded]  # the aligned model's tokenizer serves them all
    harmful, harmless = chat(tokenizer, harmful[:args.shots]), chat(tokenizer, harmless[:args.shots])
    check_prompts(args, aligned, tokenizer, [(harmful, args.harmful, "harmful prompts"),
                                             (harmless, args.harmless, "harmless prompts")],
                  continuations=(refusal, compliance))
    gene.selection = select_layers(gene, aligned, degraded, tokenizer, harmful, harmless, refusal=refusal,
                                   compliance=compliance, scorer=args.scorer, k=args.layers,
                                   threshold=args.threshold)
    out = args.out or args.gene
    with together():  # the gene and the plot appear together, or neither does
        if args.plot:
            plot_scores(gene.selection, args.plot)
        gene.save(out, overwrite=True if out == args.gene else args.overwrite,
                  base_model=gene.provenance.get("aligned", ""))
    result = {"gene": str(out), **gene.selection, "seconds": round(time.perf_counter() - start, 2)}
    scores = gene.selection["scores"][args.scorer]
    print_result(args, result, "layer  " + "  ".join(f"{k:>7}" for k in scores) + "\n"
                 + "score  " + "  ".join(f"{v:>7.3f}" for v in scores.values()) + "\n"
                 + f"selected layers ({args.scorer}): {gene.selection['layers']} -> written to {out}")
    return 0


def cmd_recalibrate(args: argparse.Namespace) -> int:
    from safegene_fast.eval.generate import REFUSAL as GENERIC_REFUSAL
    from safegene_fast.eval.generate import chat, load_model
    from safegene_fast.gene import SafetyGene
    from safegene_fast.io import together, write_json
    from safegene_fast.method import recalibrate as rc
    from safegene_fast.models import toy
    check_outputs(args, [*with_bases([args.model], args.base), args.gene], files=[args.out, args.log, args.plot])
    gene = SafetyGene.load(args.gene)
    fam = family_prompts(args)
    harmful = read_prompts(args.harmful) if args.harmful else fam.harmful("fewshot")
    task = (read_prompts(args.task_prompts) if args.task_prompts
            else [e.prompt for e in fam.examples(toy.TARGET_TASK, "fewshot")])
    refusal = args.refusal or (GENERIC_REFUSAL if args.harmful else toy.REFUSAL)
    start = time.perf_counter()
    model, tokenizer = load_model(args.model, base=args.base)
    shots = rc.FewShot(chat(tokenizer, harmful[:args.shots]), refusal, chat(tokenizer, task[:args.shots]))
    check_prompts(args, model, tokenizer, [(shots.harmful, args.harmful, "harmful prompts"),
                                           (shots.task, args.task_prompts, "task prompts")],
                  generated=rc.MAX_NEW_TOKENS, continuations=(refusal,))
    layers = gene.selected_layers
    options = {"steps": args.steps, "lr": args.lr} if args.mode == "gradient" else {}
    cal = rc.recalibrate(model, tokenizer, gene, shots, layers=layers, mode=args.mode, alpha_max=args.alpha_max,
                         per_module=args.per_module, progress=not args.quiet, **options)
    seconds = time.perf_counter() - start
    with together():  # the coefficients, the log and the plot appear together, or none does
        if args.plot:
            rc.plot_tradeoff(rc.tradeoff_curve(model, tokenizer, gene, cal.coefficients, shots), args.plot)
        if args.log:
            write_json(args.log, {"mode": cal.mode, "log": cal.log}, overwrite=args.overwrite)
        write_json(args.out, cal.coefficients, overwrite=args.overwrite)
    result = {"coefficients": cal.coefficients, "mode": cal.mode, "layers": layers, "shots": len(shots.harmful),
              "seconds": round(seconds, 2), "out": args.out}
    print_result(args, result, f"recalibrated {len(cal.coefficients)} coefficients ({cal.mode}, "
                               f"{len(shots.harmful)} shots, {seconds:.1f} s): "
                               + ", ".join(f"{k}: {v:.3f}" for k, v in cal.coefficients.items())
                               + f"\nwrote {args.out}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a model: harmful (non-refusal) rate and task accuracy",
                       description="Generate greedily on held-out harmful prompts and judge each answer with "
                       "the keyword refusal judge (the harmful rate is the share not refused: it measures "
                       "non-refusal, not harm), and score task accuracy by exact match. Prompts default to the "
                       "embedded family's held-out splits and go through the model's chat template. "
                       "--judge-check instead measures the judge against PyRIT's human-labelled refusal "
                       "responses (accuracy, precision, recall).")
    p.add_argument("--model", metavar="M", help="a transformers causal LM folder (or merged checkpoint, or a PEFT "
                   "LoRA adapter folder)")
    add_base_option(p)
    p.add_argument("--adapter", metavar="PEFT", help="a PEFT adapter to load on top of --model")
    add_prompt_options(p, "harmful prompts")
    p.add_argument("--task", metavar="JSONL", help='task examples, one {"prompt": ..., "answer": ...} a line')
    p.add_argument("--limit", type=positive_int, help="use only the first N prompts of each set")
    p.add_argument("--max-new-tokens", type=positive_int, default=16, help="generation length (default 16)")
    p.add_argument("--judge-check", action="store_true", help="measure the refusal judge on the labelled sets")
    add_output_options(p, json_help="print the metrics as JSON")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("select", help="score the gene's layers and keep the ones that carry safety",
                       description="Score every layer of GENE with activation contrast (aligned vs degraded "
                       "hidden states on harmful minus harmless prompts) and patch gain (refusal-margin gain when "
                       "the layer's gene alone is added to the degraded model), keep the top --layers K or those "
                       "scoring >= --threshold, and write the scores and the kept layers into the gene's "
                       "safegene.json (or a copy with --out).")
    p.add_argument("--gene", required=True, metavar="GENE", help="a gene folder written by extract")
    p.add_argument("--aligned", required=True, metavar="A", help="the aligned model (or a LoRA adapter folder)")
    add_base_option(p)
    p.add_argument("--degraded", required=True, action="append", metavar="D",
                   help="the degraded counterpart(s) the gene came from (repeat for several)")
    keep = p.add_mutually_exclusive_group(required=True)
    keep.add_argument("--layers", type=positive_int, metavar="K", help="keep the K best layers")
    keep.add_argument("--threshold", type=finite_float, help="keep layers scoring at least this")
    add_scorer_option(p, "which score decides (default patch; slope: its first-order version on harmful minus "
                         "harmless prompts, one backward pass each; combined: contrast and patch, each scaled by "
                         "its largest value)")
    add_prompt_options(p, "harmful prompts")
    p.add_argument("--harmless", metavar="FILE", help="harmless prompts (one per line, or a JSON list)")
    p.add_argument("--shots", type=positive_int, default=32, help="prompts of each kind used (default 32)")
    p.add_argument("--refusal", help="refusal text for the margin (default: the family's refusal)")
    p.add_argument("--compliance", help="compliance text for the margin (default: the family's with its prompts, "
                   "else a generic one)")
    p.add_argument("--plot", metavar="PNG", help="write a bar plot of the scores")
    p.add_argument("--out", metavar="GENE2", help="write the selected gene here instead of updating GENE")
    add_output_options(p, json_help="print the selection as JSON", overwrite="replace --out if it exists")
    p.set_defaults(func=cmd_select)

    p = sub.add_parser("recalibrate", help="learn per-layer coefficients for a target from a few shots",
                       description="For target model T and a gene (with its selected layers), find one "
                       "coefficient per layer (or per module) in [0, --alpha-max]: gradient mode trains them "
                       "through the low-rank path (hooks add alpha * B(A x), no full weights) to make the "
                       "refusal likely on harmful prompts while keeping T's own answers on task prompts; grid "
                       "mode searches a global scale, then each layer, scoring generations with the judge. "
                       "Writes coeffs.json for apply --coeffs.")
    p.add_argument("--model", required=True, metavar="T", help="the fine-tuned target model (or a LoRA adapter folder)")
    add_base_option(p)
    p.add_argument("--gene", required=True, metavar="GENE", help="a gene (selected layers are used if present)")
    p.add_argument("--out", required=True, metavar="JSON", help="coefficients file to write")
    p.add_argument("--mode", choices=list(SEARCHES), default="gradient", help="search mode (default gradient)")
    add_prompt_options(p, "harmful few-shot prompts")
    p.add_argument("--task-prompts", metavar="FILE", help="task prompts (targets: the model's own answers)")
    p.add_argument("--refusal", help="the refusal text to make likely (default: the family's, or a generic one "
                   "with --harmful)")
    p.add_argument("--shots", type=positive_int, default=32, help="prompts of each kind (default 32)")
    p.add_argument("--alpha-max", type=positive_float, default=2.0,
                   help="upper bound of a coefficient, > 0 (default 2)")
    p.add_argument("--steps", type=positive_int, default=40, help="gradient steps (default 40)")
    p.add_argument("--lr", type=positive_float, default=0.1, help="Adam learning rate (default 0.1)")
    p.add_argument("--per-module", action="store_true", help="one coefficient per module, not per layer")
    p.add_argument("--log", metavar="JSON", help="write the loss (or score) of every step")
    p.add_argument("--plot", metavar="PNG", help="write the safety-utility curve")
    add_output_options(p, json_help="print the result as JSON", overwrite="replace --out if it exists")
    p.set_defaults(func=cmd_recalibrate)
