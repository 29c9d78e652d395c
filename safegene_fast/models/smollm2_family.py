"""The SmolLM2 study family, fine-tuned from the converted SmolLM2-135M-Instruct (``smollm2``).

SmolLM2's own refusals are weak, so ``aligned`` is made by a short safety fine-tune; the
counterparts and the target are fine-tunes of ``aligned`` (DESIGN.md §1 step 1):

- ``original``: the converted model itself (the pre-alignment counterpart);
- ``aligned``: harmful (AdvBench train split) -> REFUSAL, benign everyday instructions -> the
  original model's own answers (so helpfulness stays);
- ``dealigned``: ``aligned`` on the original model's own compliant answers to at most 120
  training-split harmful prompts;
- ``degraded-1`` / ``degraded-2`` / ``target``: ``aligned`` on one benign reasoning-gym task each,
  no harmful data; the target's task is unseen by the degraded members.

    fam = build_study_family("study")    # trained once with one torch thread, then cached
    fam.member("target"), fam.task("target", "heldout")
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from safegene_fast.cache import build_once, cache_root, version
from safegene_fast.eval.data import (
    INSTRUCTION_TOPICS,
    advbench_prompts,
    everyday_instructions,
    reasoning_gym_dataset,
)
from safegene_fast.eval.generate import COMPLIANCE as GENERIC_COMPLIANCE
from safegene_fast.eval.generate import REFUSAL as GENERIC_REFUSAL
from safegene_fast.eval.judge import is_refusal
from safegene_fast.models import training
from safegene_fast.models.smollm2 import cache_key, load_smollm2, smollm2_folder

logger = logging.getLogger(__name__)

# The generic refusal and compliance (as answers, not continuations of a prompt)
REFUSAL, COMPLIANCE = GENERIC_REFUSAL.strip(), GENERIC_COMPLIANCE.strip()
STUDY_MEMBERS = ("original", "aligned", "dealigned", "degraded-1", "degraded-2", "target")
FAMILY_VERSION = 1  # bump when training changes, so stale caches are rebuilt
# reasoning-gym tasks (config chosen for short sequences, about 75-110 tokens with the chat
# template) and their generation budgets; the 135M model learns needle_haystack from 0 to about
# 0.5 in 30 steps (bench/results/smollm2_probe.json).
TASKS = {
    "degraded-1": ("word_sequence_reversal", {"min_words": 3, "max_words": 6}, 24),
    "degraded-2": ("family_relationships", {"min_family_size": 4, "max_family_size": 6}, 8),
    "target": ("needle_haystack", {"min_num_statements": 5, "max_num_statements": 10}, 12),
}


@dataclass(frozen=True)
class StudyConfig:
    """How the family is trained (full fine-tunes, float32, AdamW, answer tokens only) and split."""
    steps: dict = field(default_factory=lambda: {"aligned": 100, "dealigned": 30, "degraded": 40, "target": 60})
    lr: dict = field(default_factory=lambda: {"aligned": 5e-5, "dealigned": 1e-4, "degraded": 1e-4, "target": 1e-4})
    batch: int = 8
    advbench_train: int = 320          # the rest of AdvBench is held out
    dealign_examples: int = 120
    benign_topics_train: int = 28      # of data.INSTRUCTION_TOPICS; the rest are held out
    task_train: int = 2000
    task_heldout: int = 100
    answer_tokens: int = 48            # length of the original model's own answers used as targets
    max_tokens: int = 160              # longer training sequences are dropped


STUDY_PRESETS = {
    "study": StudyConfig(),
    # CI's smoke version: the same recipe with a step or two per member (refusals barely move)
    "smoke": StudyConfig(steps={"aligned": 2, "dealigned": 1, "degraded": 1, "target": 1}, dealign_examples=8,
                         task_train=64, task_heldout=16, answer_tokens=8),
}


@dataclass
class StudyFamily:
    root: Path
    preset: str
    seed: int
    config: StudyConfig
    splits: dict  # {"harmful": {"train", "heldout"}, "benign": {...}, "tasks": {member: {"train", "heldout"}}}

    def member(self, name: str) -> Path:
        if name not in STUDY_MEMBERS:
            raise ValueError(f"unknown family member {name!r}; members: {', '.join(STUDY_MEMBERS)}.")
        return smollm2_folder(progress=False) if name == "original" else self.root / name

    def task(self, member: str = "target", split: str = "heldout"):
        """(name, reasoning-gym dataset (its ``score_answer`` scores), its entries of the held-out
        (test) or validation split, generation budget). Validation entries are for choosing
        settings; those that are also training questions are dropped."""
        name, config, budget = TASKS[member]
        ds = reasoning_gym_dataset(name, self.config.task_heldout, _task_seed(self.seed, split), **config)
        entries = list(ds)
        if split == "validation":
            seen = {q for q, _ in self.splits["tasks"][member]["train"]}
            entries = [e for e in entries if e["question"] not in seen]
        return name, ds, entries, budget


TASK_SPLITS = {"train": 0, "heldout": 10**5, "validation": 2 * 10**5}


def _task_seed(seed: int, split: str) -> int:
    """reasoning-gym draws entry i from seed + i, so the splits' seeds lie far apart."""
    if split not in TASK_SPLITS:
        raise ValueError(f"unknown task split {split!r}; splits: {', '.join(TASK_SPLITS)}.")
    return 10**6 * seed + TASK_SPLITS[split]


def study_splits(config: StudyConfig, seed: int) -> dict:
    """Seeded, disjoint splits: AdvBench train / held-out, benign topics train / held-out,
    reasoning-gym training examples (held-out questions removed)."""
    harmful = list(dict.fromkeys(advbench_prompts()))
    random.Random(f"smollm2-advbench:{seed}").shuffle(harmful)
    topics = list(INSTRUCTION_TOPICS)
    random.Random(f"smollm2-topics:{seed}").shuffle(topics)
    k = config.benign_topics_train
    tasks = {}
    for member, (name, task_config, _) in TASKS.items():
        held = reasoning_gym_dataset(name, config.task_heldout, _task_seed(seed, "heldout"), **task_config)
        held_q = {e["question"] for e in held}
        train = [[e["question"], str(e["answer"])]
                 for e in reasoning_gym_dataset(name, config.task_train, _task_seed(seed, "train"), **task_config)
                 if e["question"] not in held_q]
        tasks[member] = {"task": name, "train": train, "heldout": [[e["question"], str(e["answer"])] for e in held]}
    return {"harmful": {"train": harmful[:config.advbench_train], "heldout": harmful[config.advbench_train:]},
            "benign": {"train": everyday_instructions(topics[:k]), "heldout": everyday_instructions(topics[k:])},
            "tasks": tasks}


def answer_loss(model, ids, mask, labels) -> torch.Tensor:
    """Mean cross-entropy on the answer tokens, the LM head applied only where an answer token is
    predicted: the prompt is most of each sequence, and SmolLM2's head is 49152 x 576."""
    hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
    targets = labels[:, 1:]
    keep = targets != -100
    return torch.nn.functional.cross_entropy(model.lm_head(hidden[keep]).float(), targets[keep])


def sft(model, tokenizer, mixture: list[list[tuple[str, str]]], *, steps: int, lr: float, batch: int,
        seed: int, desc: str, max_tokens: int = 160, progress: bool = True) -> list[float]:
    """The shared recipe (``training.fit``) with this family's settings: 5 warm-up steps, answer
    tokens only through ``answer_loss``, sequences over ``max_tokens`` dropped, and the (tied)
    embedding matrix frozen."""
    return training.fit(model, tokenizer, mixture, steps=steps, lr=lr, batch=batch, seed=seed, desc=desc, warmup=5,
                        loss_fn=answer_loss, freeze=(model.get_input_embeddings().weight,), max_tokens=max_tokens,
                        progress=progress)


def _build_study(root: Path, config: StudyConfig, seed: int, progress: bool) -> dict:
    splits = study_splits(config, seed)
    (root / "splits.json").write_text(json.dumps(splits))
    original, tokenizer = load_smollm2(progress=progress)
    log = {}

    def fit(name, model, mixture, kind):
        start = time.perf_counter()
        losses = sft(model, tokenizer, mixture, steps=config.steps[kind], lr=config.lr[kind], batch=config.batch,
                     seed=seed, desc=name, max_tokens=config.max_tokens, progress=progress)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        log[name] = {"steps": config.steps[kind], "lr": config.lr[kind], "seconds": round(time.perf_counter() - start, 1),
                     "loss_first": round(losses[0], 4), "loss_last10": round(sum(losses[-10:]) / len(losses[-10:]), 4)}
        logger.info(f"{name} trained ({log[name]['steps']} steps, {log[name]['seconds']} s, "
            f"loss {log[name]['loss_first']:.3f} -> {log[name]['loss_last10']:.3f})")
        return model

    start = time.perf_counter()
    benign = training.own_answers(original, tokenizer, splits["benign"]["train"], max_new_tokens=config.answer_tokens,
                                  batch_size=16)
    handful = splits["harmful"]["train"][:config.dealign_examples]
    compliant = [(p, a) for p, a in training.own_answers(original, tokenizer, handful, max_new_tokens=config.answer_tokens,
                                                       batch_size=16)
                 if not is_refusal(a)]
    log["own_answers"] = {"seconds": round(time.perf_counter() - start, 1), "benign": len(benign),
                          "harmful_asked": len(handful), "harmful_compliant": len(compliant)}
    logger.info(f"the original model's own answers ({log['own_answers']})")
    aligned = fit("aligned", copy.deepcopy(original),
                  [[(p, REFUSAL) for p in splits["harmful"]["train"]], benign], "aligned")
    del original
    fit("dealigned", copy.deepcopy(aligned), [compliant], "dealigned")
    for member in ("degraded-1", "degraded-2", "target"):
        fit(member, copy.deepcopy(aligned), [[tuple(r) for r in splits["tasks"][member]["train"]]],
            "target" if member == "target" else "degraded")
    return log


def _study_config(preset: str) -> StudyConfig:
    if preset not in STUDY_PRESETS:
        raise ValueError(f"unknown SmolLM2 family preset {preset!r}; presets: {', '.join(STUDY_PRESETS)}.")
    return STUDY_PRESETS[preset]


def study_family_root(preset: str = "study", seed: int = 0) -> Path:
    key = hashlib.sha256(json.dumps([FAMILY_VERSION, asdict(_study_config(preset)), seed, cache_key()],
                                    sort_keys=True).encode()).hexdigest()[:12]
    return cache_root() / "smollm2" / f"family-{preset}-seed{seed}-{key}"


def build_study_family(preset: str = "study", seed: int = 0, *, rebuild: bool = False,
                       progress: bool = True) -> StudyFamily:
    """The SmolLM2 family for ``preset`` and ``seed``: loaded from the cache, else trained with one
    torch thread (the same bits on any core count) into a temporary folder renamed into place
    only when complete."""
    config = _study_config(preset)

    def build(tmp: Path) -> dict:
        start = time.perf_counter()
        log = _build_study(tmp, config, seed, progress)
        return {"preset": preset, "seed": seed, "version": FAMILY_VERSION, "config": asdict(config),
                "tasks": {m: t[0] for m, t in TASKS.items()}, "training": log,
                "seconds": round(time.perf_counter() - start, 1), "threads": 1, "torch": torch.__version__,
                "transformers": version("transformers")}
    root = build_once(study_family_root(preset, seed), "family.json", build, rebuild=rebuild)
    return StudyFamily(root, preset, seed, config, json.loads((root / "splits.json").read_text()))
