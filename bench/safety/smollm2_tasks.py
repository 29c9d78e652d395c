"""Candidate benign tasks for the SmolLM2 family: reasoning-gym generators that
import offline, the original model's zero-shot accuracy on each, and optionally one short full
fine-tune trial on one task with its before / after held-out accuracy.

    .venv/bin/python bench/safety/smollm2_tasks.py --zero-shot [--n 48]
    .venv/bin/python bench/safety/smollm2_tasks.py --finetune needle_haystack --minutes 5 --steps 200 --lr 1e-4
    .venv/bin/python bench/safety/smollm2_tasks.py --step-time needle_haystack
    (add --json bench/results/smollm2_probe.json to merge the results into that file's "tasks" key)

reasoning-gym 0.1.25 is installed with --no-deps and loaded by safegene_fast.eval.data.load_reasoning_gym
(its import-all needs packages we do not install). This was the groundwork for the study family
(safegene_fast/smollm2.py), which now owns the loader, the chat encoding and the answer-only loss.

Scoring: a hit is the dataset's own ``score_answer`` returning exactly 1.0 on the stripped greedy
answer (the default scorer gives partial credit to an answer that contains the oracle; that is not
counted). Prompts go through the model's chat template (evaluate.chat). One torch thread.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.metadata
import importlib.util
import json
import math
import platform
import random
import sys
import time
from pathlib import Path

import torch
from safegene_fast.io import write_text

ROOT = Path(__file__).resolve().parents[2]  # the checkout, for its git commit

# Candidate tasks with configs chosen for short sequences (prompt + answer well under 160 tokens)
# and answers a greedy 135M model could produce verbatim. new_tokens: generation budget.
CANDIDATES = {
    "word_sequence_reversal": ({"min_words": 3, "max_words": 6}, 24),
    "family_relationships": ({"min_family_size": 4, "max_family_size": 6}, 8),
    "needle_haystack": ({"min_num_statements": 5, "max_num_statements": 10}, 12),
    "number_sorting": ({"min_numbers": 3, "max_numbers": 5, "min_decimals": 0, "max_decimals": 0}, 32),
    "number_filtering": ({"min_numbers": 3, "max_numbers": 5, "min_decimals": 0, "max_decimals": 1}, 32),
    "letter_counting": ({"min_words": 3, "max_words": 6}, 6),
    "spell_backward": ({"min_word_len": 3, "max_word_len": 6}, 8),
    "sentence_reordering": ({"min_words_in_sentence": 3, "max_words_in_sentence": 8}, 16),
    "color_cube_rotation": ({"min_rotations": 1, "max_rotations": 1}, 6),
    "calendar_arithmetic": ({}, 8),
    "basic_arithmetic": ({}, 12),
}


def dataset(name: str, size: int, seed: int):
    from reasoning_gym.factory import create_dataset
    return create_dataset(name, size=size, seed=seed, **CANDIDATES[name][0])


def accuracy(model, tokenizer, ds, entries, new_tokens: int, batch: int = 16) -> tuple[float, list[str]]:
    from safegene_fast.eval.generate import chat, generate
    answers = generate(model, tokenizer, chat(tokenizer, [e["question"] for e in entries]),
                       max_new_tokens=new_tokens, batch_size=batch)
    hits = sum(ds.score_answer(a.strip(), e) == 1.0 for a, e in zip(answers, entries))
    return hits / len(entries), answers


def encode(tokenizer, question: str, answer: str) -> tuple[list[int], int]:
    from safegene_fast.models.training import encode as encode_pairs
    return encode_pairs(tokenizer, [(question, answer)])[0]


def make_batch(rows: list[tuple[list[int], int]], pad: int):
    """(ids, labels, mask), right-padded; labels only on the answer tokens."""
    from safegene_fast.eval.generate import right_padded
    ids, mask, labels = right_padded(rows, pad)
    return ids, labels, mask


def answer_loss(model, ids, labels, mask, fast: bool):
    """Mean cross-entropy on the answer tokens; ``fast``: smollm2_family.answer_loss (LM head only
    where an answer token is predicted)."""
    if not fast:
        return model(input_ids=ids, attention_mask=mask, labels=labels).loss
    from safegene_fast.models.smollm2_family import answer_loss as fast_loss
    return fast_loss(model, ids, mask, labels)


def trainable(model, fast: bool) -> list:
    """All parameters, or with ``fast`` all but the (tied) embedding matrix, which is then frozen."""
    model.get_input_embeddings().weight.requires_grad_(not fast)
    return [p for p in model.parameters() if p.requires_grad]


def finetune(model, tokenizer, pairs: list[tuple[list[int], int]], *, steps: int, minutes: float, lr: float,
             batch: int, seed: int, fast: bool = False) -> dict:
    """Full fine-tune, AdamW, loss on the answer tokens only, 5 warm-up steps then cosine decay over
    ``steps`` or ``minutes``, whichever runs out first. ``fast``: see ``answer_loss`` and ``trainable``."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(trainable(model, fast), lr=lr, weight_decay=0.0)
    pad = tokenizer.pad_token_id
    model.train()
    losses, start, done = [], time.perf_counter(), 0
    order = list(range(len(pairs)))
    rng.shuffle(order)
    for step in range(steps):
        # progress: of the step budget or of the time budget, whichever is further along, so the
        # cosine decay ends when the run ends
        progress = max(step / steps, (time.perf_counter() - start) / (minutes * 60))
        if progress >= 1.0:
            break
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 5) * 0.5 * (1 + math.cos(math.pi * progress))
        rows = [pairs[order[(step * batch + i) % len(order)]] for i in range(batch)]
        loss = answer_loss(model, *make_batch(rows, pad), fast)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        done = step + 1
        if done % 10 == 0:
            print(f"  step {done}: loss {sum(losses[-10:]) / 10:.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
    model.eval()
    trainable(model, False)
    return {"steps_done": done, "steps_planned": steps, "seconds": round(time.perf_counter() - start, 1),
            "loss_first": round(losses[0], 4), "loss_last10": round(sum(losses[-10:]) / len(losses[-10:]), 4),
            "examples_seen": done * batch}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zero-shot", action="store_true", help="zero-shot accuracy of every candidate")
    ap.add_argument("--tasks", nargs="*", default=list(CANDIDATES))
    ap.add_argument("--finetune", metavar="TASK", help="one short fine-tune trial on TASK")
    ap.add_argument("--n", type=int, default=48, help="held-out examples per task")
    ap.add_argument("--train", type=int, default=2000, help="training examples (fine-tune)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--fast", action="store_true", help="fine-tune with answer-only LM head and frozen embeddings")
    ap.add_argument("--step-time", metavar="TASK", help="time a few AdamW steps, plain vs --fast, on TASK")
    ap.add_argument("--json", type=Path, default=None, help="merge results into this JSON's 'tasks' key")
    args = ap.parse_args()
    torch.set_num_threads(1)

    start = time.perf_counter()
    from safegene_fast.eval.data import load_reasoning_gym
    registry = load_reasoning_gym()
    out: dict = {"reasoning_gym": {"registered": len(registry), "import_seconds": round(time.perf_counter() - start, 1)}}
    from safegene_fast.models.smollm2 import load_smollm2
    model, tokenizer = load_smollm2()
    # Held-out seed 1, training seed 0 (reasoning-gym draws each example from its seed and index);
    # training prompts that also appear in the held-out set are dropped.
    if args.zero_shot:
        out["zero_shot"] = {}
        for name in args.tasks:
            ds = dataset(name, args.n, seed=1)
            entries = list(ds)
            t = time.perf_counter()
            acc, answers = accuracy(model, tokenizer, ds, entries, CANDIDATES[name][1])
            lengths = [len(encode(tokenizer, e["question"], e["answer"])[0]) for e in entries]
            out["zero_shot"][name] = {
                "config": CANDIDATES[name][0], "n": len(entries), "accuracy": round(acc, 4),
                "seconds": round(time.perf_counter() - t, 1), "tokens_mean": round(sum(lengths) / len(lengths), 1),
                "tokens_max": max(lengths),
                "samples": [{"question": e["question"][-160:], "oracle": e["answer"], "answer": a}
                            for e, a in zip(entries[:2], answers[:2])]}
            print(f"{name}: zero-shot {acc:.3f} on {len(entries)} ({out['zero_shot'][name]['seconds']} s; "
                  f"tokens mean {out['zero_shot'][name]['tokens_mean']}, max {max(lengths)})", flush=True)
            for e, a in zip(entries[:2], answers[:2]):
                print(f"    oracle {e['answer']!r}  got {a!r}", flush=True)
    if args.step_time:
        # lr 0: the weights do not move, so both variants see the same model and must give the same loss
        pairs = [encode(tokenizer, e["question"], e["answer"]) for e in dataset(args.step_time, 6 * args.batch, seed=0)]
        timing = {"plain": [], "fast": [], "max_loss_difference": 0.0}
        model.train()
        for i in range(6):
            batch = make_batch(pairs[i * args.batch:(i + 1) * args.batch], tokenizer.pad_token_id)
            losses = {}
            for variant in ("plain", "fast"):
                opt = torch.optim.AdamW(trainable(model, variant == "fast"), lr=0.0)
                t = time.perf_counter()
                loss = answer_loss(model, *batch, variant == "fast")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if i:  # step 0 warms up
                    timing[variant].append(round(time.perf_counter() - t, 2))
                losses[variant] = loss.item()
            timing["max_loss_difference"] = max(timing["max_loss_difference"], abs(losses["plain"] - losses["fast"]))
            print(f"  step {i}: {timing['plain'][-1:]} s plain, {timing['fast'][-1:]} s fast", flush=True)
        trainable(model, False)
        model.eval()
        out["step_time"] = {"task": args.step_time, "batch": args.batch, "threads": 1,
                            "plain": "all parameters, LM head over every position",
                            "fast": "embeddings (tied with the LM head) frozen, LM head only where an answer "
                                    "token is predicted", **timing}
    if args.finetune:
        name = args.finetune
        held_ds = dataset(name, args.n, seed=1)
        held = list(held_ds)
        held_q = {e["question"] for e in held}
        train = [e for e in dataset(name, args.train, seed=0) if e["question"] not in held_q]
        pairs = [p for p in (encode(tokenizer, e["question"], e["answer"]) for e in train) if len(p[0]) <= 160]
        before, _ = accuracy(model, tokenizer, held_ds, held, CANDIDATES[name][1])
        print(f"{name}: before {before:.3f}; fine-tuning on {len(pairs)} examples", flush=True)
        log = finetune(model, tokenizer, pairs, steps=args.steps, minutes=args.minutes, lr=args.lr,
                       batch=args.batch, seed=0, fast=args.fast)
        after, answers = accuracy(model, tokenizer, held_ds, held, CANDIDATES[name][1])
        print(f"{name}: after {after:.3f} ({log})", flush=True)
        out["finetune_trial"] = {
            "task": name, "config": CANDIDATES[name][0], "held_out_n": len(held), "train_pool": len(pairs),
            "recipe": {"kind": "full fine-tune, float32, AdamW (wd 0), clip 1.0, 5 warm-up steps then cosine over the step or time budget",
                       "lr": args.lr, "batch": args.batch, "max_tokens": 160, "threads": 1, "fast": args.fast},
            "accuracy_before": round(before, 4), "accuracy_after": round(after, 4), **log,
            "samples_after": [{"oracle": e["answer"], "answer": a} for e, a in zip(held[:3], answers[:3])]}
    out["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    out["command"] = "bench/safety/smollm2_tasks.py " + " ".join(sys.argv[1:])
    out["versions"] = {"python": platform.python_version(), "torch": torch.__version__,
                       "reasoning-gym": importlib.metadata.version("reasoning-gym")}
    if args.json:
        doc = json.loads(args.json.read_text()) if args.json.is_file() else {}
        tasks = doc.setdefault("tasks", {})
        for key in ("zero_shot", "finetune_trial", "step_time"):
            if key in out:
                tasks[key] = {**out.pop(key), "date": out["date"], "command": out["command"]}
        tasks.update(out)
        write_text(args.json, json.dumps(doc, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
