"""Selection / recalibration trials on the SmolLM2 study family, one counterpart's gene, patched
into the target through forward hooks (no merged checkpoint), on a smaller evaluation (50
AdvBench, 50 Do-Not-Answer, 32 benign, 50 task prompts of the study's held-out sets).

    .venv/bin/python bench/safety/smollm2_selection_trials.py [--kind dealigned] [--json FILE]

Needs the study's genes (``safegene study`` writes them under safegene-study/genes/). This is how
the study's selection was chosen (README, SmolLM2 section): the harmful-only first-order slope
kept the last layers, which refuse benign prompts almost as readily; harmful-minus-harmless
keeps specific ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch

from safegene_fast.io import write_text
from safegene_fast.eval.generate import chat, load_model
from safegene_fast.experiments.study import (
    COMPLIANCE,
    COUNTERPARTS,
    SETTINGS,
    evaluator,
    few_shot_pools,
    rates,
)
from safegene_fast.gene import SafetyGene
from safegene_fast.method.patch import GenePatch
from safegene_fast.method.recalibrate import FewShot, gradient
from safegene_fast.method.selection import choose, patch_slope
from safegene_fast.models.smollm2_family import REFUSAL, build_study_family


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kind", default="dealigned", choices=list(COUNTERPARTS))
    ap.add_argument("--genes", default="safegene-study/genes", type=Path)
    ap.add_argument("--shots", type=int, default=16)
    ap.add_argument("--layers", type=int, nargs="+", default=[15], help="layers kept (default 15)")
    ap.add_argument("--all-layers", action="store_true", help="also recalibrate every layer (no selection)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    from transformers.utils import logging
    logging.disable_progress_bar()
    fam = build_study_family("study")
    ev = evaluator(fam, dataclasses.replace(SETTINGS["study"], advbench=50, donotanswer=50, benign=32, task=50))
    t_model, tok = load_model(fam.member("target"))
    d_models = [load_model(fam.member(m))[0] for m in COUNTERPARTS[args.kind]]
    gene = SafetyGene.load(args.genes / args.kind)
    pool, harmless, keep = few_shot_pools(fam, SETTINGS["study"])
    harm, benign = chat(tok, pool[:args.shots]), chat(tok, harmless[:args.shots])
    rows = []

    def evaluate(coeffs: dict) -> dict:
        with GenePatch(t_model, gene, sorted({int(k) for k in coeffs})) as patch:
            patch.set(coeffs)
            return rates(ev.model(t_model, tok))

    def trial(name: str, layers: list[int] | None, **kw) -> None:
        start = time.perf_counter()
        if layers is None:
            coeffs = {str(layer): 1.0 for layer in gene.layers}
        else:
            settings = {"steps": 20, "alpha_max": 3.0, **kw}
            coeffs = gradient(t_model, tok, gene, layers, FewShot(harm, REFUSAL, chat(tok, keep)), lr=0.1, init=1.0,
                              batch=8, max_new_tokens=12, **settings).coefficients
        rows.append({"trial": name, "layers": layers, **evaluate(coeffs), "coefficients": coeffs,
                     "seconds": round(time.perf_counter() - start, 1)})
        print(json.dumps(rows[-1]), flush=True)

    sh = patch_slope(d_models, gene, tok, harm, REFUSAL, COMPLIANCE)
    sb = patch_slope(d_models, gene, tok, benign, REFUSAL, COMPLIANCE)
    harmful_only = dict(zip(gene.layers, sh))
    specific = {layer: a - b for layer, a, b in zip(gene.layers, sh, sb)}
    trial("gene at 1.0 on all layers", None)
    for k in args.layers:
        trial(f"harmful-only slope, k={k}", choose(harmful_only, k=k))
        trial(f"harmful-minus-harmless slope, k={k}", choose(specific, k=k))
    if args.all_layers:
        trial("recalibrate all layers", list(gene.layers))
    if args.json:
        write_text(args.json, json.dumps({
            "command": "bench/safety/smollm2_selection_trials.py " + " ".join(sys.argv[1:]),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "versions": {"python": platform.python_version(), "torch": torch.__version__},
            "kind": args.kind, "shots": args.shots, "slope_harmful": sh, "slope_harmless": sb,
            "prompts": {"advbench": 50, "donotanswer": 50, "benign": 32, "task": 50}, "trials": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
