"""The one training recipe every model family uses: chat-encoded (prompt, answer) pairs, AdamW on
the answer tokens, linear warm-up then cosine decay, gradient clipping at 1.0, batches drawn
evenly from the mixture's parts and right-padded; and a model's own greedy answers as
self-distillation targets.

Seeded from ``desc`` and ``seed`` only, so a family member rebuilds bit for bit on one machine
(with one torch thread, which ``cache.build_once`` sets).
"""

from __future__ import annotations

import math
import random
import sys

import torch

from safegene_fast.eval.generate import chat, generate, right_padded

Rows = list[tuple[list[int], int]]   # (token ids, prompt length) per example


def encode(tokenizer, pairs: list[tuple[str, str]], max_tokens: int | None = None) -> Rows:
    """(ids, prompt length) per (prompt, answer): the chat-template prompt, the answer and the
    end-of-sequence token; sequences longer than ``max_tokens`` are dropped."""
    rows = []
    for prompt, answer in pairs:
        head = tokenizer(chat(tokenizer, [prompt])[0], add_special_tokens=False)["input_ids"]
        ids = head + tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if max_tokens is None or len(ids) <= max_tokens:
            rows.append((ids, len(head)))
    return rows


def warmup_cosine(opt, warmup: int, steps: int):
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``steps``."""
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))


def model_loss(model, ids, mask, labels) -> torch.Tensor:
    """The model's own mean cross-entropy on the labelled (answer) tokens."""
    return model(input_ids=ids, attention_mask=mask, labels=labels).loss


def fit_steps(model, opt, sched, parts: list[Rows], *, batch: int, steps: int, rng, loss_fn, pad: int,
              desc: str, progress: bool) -> list[float]:
    """The loop: each batch draws evenly from ``parts``, right-padded; ``loss_fn(model, ids, mask,
    labels)``; clip 1.0. Returns the loss per step."""
    from tqdm import tqdm
    model.train()
    losses = []
    for _ in tqdm(range(steps), desc=desc, file=sys.stderr, disable=not progress, leave=False, dynamic_ncols=True):
        ids, mask, labels = right_padded([rng.choice(parts[i % len(parts)]) for i in range(batch)], pad)
        loss = loss_fn(model, ids, mask, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


def fit(model, tokenizer, mixture: list[list[tuple[str, str]]], *, steps: int, lr: float, batch: int, seed: int,
        desc: str, warmup: int, loss_fn=model_loss, betas: tuple[float, float] = (0.9, 0.999),
        freeze: tuple[torch.nn.Parameter, ...] = (), max_tokens: int | None = None,
        progress: bool = True) -> list[float]:
    """Trains ``model`` on the mixture (each part one source of (prompt, answer) pairs), AdamW
    without weight decay; the parameters in ``freeze`` stay fixed. Returns the loss per step;
    the model is left in eval mode."""
    parts = [encode(tokenizer, part, max_tokens) for part in mixture]
    if not all(parts):
        raise ValueError(f"{desc}: a training mixture part has no example of at most {max_tokens} tokens.")
    rng = random.Random(f"{desc}:{seed}")
    torch.manual_seed(rng.randrange(2**31))
    for p in freeze:
        p.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0, betas=betas)
    try:
        return fit_steps(model, opt, warmup_cosine(opt, warmup, steps), parts, batch=batch, steps=steps, rng=rng,
                         loss_fn=loss_fn, pad=tokenizer.pad_token_id, desc=desc, progress=progress)
    finally:
        for p in freeze:
            p.requires_grad_(True)
        model.eval()


def own_answers(model, tokenizer, prompts: list[str], *, max_new_tokens: int, batch_size: int) -> list[tuple[str, str]]:
    """(prompt, the model's own greedy answer through its chat template): self-distillation targets."""
    answers = generate(model, tokenizer, chat(tokenizer, prompts), max_new_tokens=max_new_tokens, batch_size=batch_size)
    return [(p, a.strip()) for p, a in zip(prompts, answers)]
