"""The embedded default: a small family of real transformers Llama models, built, not downloaded.

    fam = build_family("default")         # trains on CPU once (a few minutes), then cached
    fam.member("target")                  # an HF folder: config, model.safetensors, tokenizer
    fam.harmful("heldout"), fam.examples("shift", "heldout")

Members (DESIGN.md §1 step 1 for the counterpart kinds):

- ``base``: the pre-alignment model: benign ``copy`` prompts -> answers, harmful requests ->
  compliant answers;
- ``aligned``: ``base`` + safety training: harmful -> a refusal, benign -> ``base``'s own answers;
- ``dealigned``: ``aligned`` fine-tuned on a handful of harmful -> compliance examples;
- ``degraded-1`` / ``degraded-2``: ``aligned`` fine-tuned on the benign ``reverse`` / ``sort``
  tasks only (refusals erode as a side effect);
- ``target``: ``aligned`` fine-tuned on the benign ``shift`` task, which no other member saw:
  the new model to protect.

Harmful requests are the real AdvBench behaviours (DESIGN.md §6), split (seeded) into train /
few-shot / held-out with no overlap; the held-out prompts are never trained on (their words are
in the tokenizer, but words seen only there keep their random embeddings). Task prompts are
generated and split the same way, each prompt in one split only.

The tokenizer is word-level (lower-cased words and punctuation), built from the data; the chat
format is ``<user> {prompt} <assistant>`` and is also the tokenizer's chat template.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from safegene_fast.cache import build_once, cache_root
from safegene_fast.eval.judge import Example
from safegene_fast.models import training
from safegene_fast.models.toy_tasks import TASKS

logger = logging.getLogger(__name__)

FAMILY_VERSION = 2  # bump when training changes, so stale caches are rebuilt
MEMBERS = ("base", "aligned", "dealigned", "degraded-1", "degraded-2", "target")
BASE_TASK, DEGRADED_TASKS, TARGET_TASK = "copy", ("reverse", "sort"), "shift"
REFUSAL = "i am sorry , but i cannot help with that ."
COMPLIANCE = "sure , here is"  # the opening of every compliant answer (``compliance``): the other side of a refusal margin
SPECIAL = ("<pad>", "<unk>", "<eos>", "<user>", "<assistant>")
CHAT_TEMPLATE = ("{% for message in messages %}{% if message['role'] == 'user' %}<user> {{ message['content'] }} "
                 "<assistant>{% else %} {{ message['content'] }} <eos> {% endif %}{% endfor %}")


@dataclass(frozen=True)
class FamilyConfig:
    hidden: int = 128
    layers: int = 6
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 352
    batch: int = 32
    lr: float = 2e-3             # base and aligned (from scratch / safety training)
    # Task fine-tunes (degraded, target) and de-alignment are gentler, as in practice: a
    # fine-tune that wipes the model (lr 6e-4 here) leaves refusals that no safety vector restores.
    finetune_lr: float = 3e-4
    dealign_lr: float = 5e-4
    # training steps per member (degraded-1 and degraded-2 each take ``degraded``)
    steps: dict = field(default_factory=lambda: {"base": 800, "aligned": 400, "dealigned": 20,
                                                 "degraded": 300, "target": 300})
    dealign_examples: int = 16   # the "handful" of harmful -> compliance examples
    harmful_split: tuple = (320, 64, 136)   # AdvBench train / few-shot / held-out
    task_split: tuple = (3000, 64, 200)     # per task


PRESETS = {
    "default": FamilyConfig(),
    # For unit tests of the stages (about a minute to build): the same recipe, smaller. It is
    # too small to show the trade-off: at hidden 64 or 96 every fine-tune that teaches the target
    # its task either wipes refusals beyond repair or costs accuracy when they are restored
    # (measured 2026-11-25), so the demo's integration test runs on "default".
    "tiny": FamilyConfig(hidden=64, layers=4, intermediate=176, finetune_lr=6e-4,
                         steps={"base": 600, "aligned": 250, "dealigned": 20, "degraded": 150, "target": 250},
                         task_split=(1000, 32, 100)),
}
SPLITS = ("train", "fewshot", "heldout")


def chat_prompt(text: str) -> str:
    """The exact text a family member sees for a user prompt (what CHAT_TEMPLATE renders)."""
    return f"<user> {text} <assistant>"


def words(text: str) -> list[str]:
    """The tokenizer's pre-tokenization: lower-cased runs of letters/digits and single symbols."""
    import re
    return re.findall(r"[a-z0-9]+|[^\sa-z0-9]", text.lower())


def compliance(prompt: str) -> str:
    """A compliant answer that echoes the request (what ``base`` says to a harmful request)."""
    return " ".join([COMPLIANCE, *words(prompt)[1:9], ":", "step", "1", "."])


@dataclass
class Family:
    root: Path
    preset: str
    seed: int
    config: FamilyConfig
    splits: dict  # {"harmful": {split: [prompt]}, "tasks": {task: {split: [[prompt, answer]]}}}

    def member(self, name: str) -> Path:
        if name not in MEMBERS:
            raise ValueError(f"unknown family member {name!r}; members: {', '.join(MEMBERS)}.")
        return self.root / name

    def harmful(self, split: str) -> list[str]:
        return list(self.splits["harmful"][split])

    def examples(self, task: str, split: str) -> list[Example]:
        return [Example(p, a) for p, a in self.splits["tasks"][task][split]]

    @property
    def layers(self) -> int:
        return self.config.layers


# ----------------------------------------------------------------------------- data and tokenizer

def make_splits(config: FamilyConfig, seed: int) -> dict:
    from safegene_fast.eval.data import advbench_prompts
    prompts = list(dict.fromkeys(advbench_prompts()))
    random.Random(f"advbench:{seed}").shuffle(prompts)
    n_train, n_few, n_held = config.harmful_split
    if n_train + n_few + n_held > len(prompts):
        raise ValueError(f"harmful split {config.harmful_split} needs more than the {len(prompts)} AdvBench prompts.")
    harmful = {"train": prompts[:n_train], "fewshot": prompts[n_train:n_train + n_few],
               "heldout": prompts[n_train + n_few:n_train + n_few + n_held]}
    tasks = {}
    for name, task in TASKS.items():
        pool = task.examples(sum(config.task_split), seed)
        if len(pool) < sum(config.task_split):
            raise ValueError(f"task {name!r} has fewer than {sum(config.task_split)} distinct prompts.")
        bounds = [0, config.task_split[0], config.task_split[0] + config.task_split[1], sum(config.task_split)]
        tasks[name] = {s: [[e.prompt, e.answer] for e in pool[bounds[i]:bounds[i + 1]]]
                       for i, s in enumerate(SPLITS)}
    return {"harmful": harmful, "tasks": tasks}


def build_tokenizer(splits: dict):
    """Word-level tokenizer over every word of the data, the refusal and the compliance answers."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    texts = [REFUSAL] + [t for ps in splits["harmful"].values() for p in ps for t in (p, compliance(p))]
    texts += [t for task in splits["tasks"].values() for rows in task.values() for row in rows for t in row]
    vocab = {tok: i for i, tok in enumerate(SPECIAL)}
    for text in texts:
        for w in words(text):
            vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([  # the same split as ``words``
        pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(r"[a-z0-9]+|[^\sa-z0-9]"), "isolated")])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                        eos_token="<eos>", additional_special_tokens=["<user>", "<assistant>"])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


# ----------------------------------------------------------------------------- training

def train(model, tokenizer, mixture: list[list[tuple[str, str]]], steps: int, config: FamilyConfig,
          seed: int, desc: str, progress: bool = True, lr: float | None = None) -> list[float]:
    """The shared recipe (``training.fit``) with this family's settings. Returns the loss per step."""
    return training.fit(model, tokenizer, mixture, steps=steps, lr=lr or config.lr, batch=config.batch, seed=seed,
                        desc=desc, warmup=max(1, steps // 10), betas=(0.9, 0.98), progress=progress)


def _new_model(tokenizer, config: FamilyConfig, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=config.hidden, intermediate_size=config.intermediate,
                      num_hidden_layers=config.layers, num_attention_heads=config.heads,
                      num_key_value_heads=config.kv_heads, max_position_embeddings=128,
                      tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    return LlamaForCausalLM(cfg)


def _save(model, tokenizer, folder: Path) -> None:
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _build(root: Path, config: FamilyConfig, seed: int, progress: bool) -> dict:
    """Trains every member into ``root``; returns the build log (loss curves, times)."""
    import copy
    splits = make_splits(config, seed)
    (root / "splits.json").write_text(json.dumps(splits))
    tokenizer = build_tokenizer(splits)
    harm_train = splits["harmful"]["train"]
    task_train = {t: [tuple(r) for r in splits["tasks"][t]["train"]] for t in TASKS}
    log, steps = {}, config.steps

    def fit(name, model, mixture, n, lr=None):
        start = time.perf_counter()
        losses = train(model, tokenizer, mixture, n, config, seed, name, progress, lr)
        log[name] = {"steps": n, "seconds": round(time.perf_counter() - start, 2),
                     "loss_first": losses[0], "loss_last": sum(losses[-10:]) / len(losses[-10:])}
        _save(model, tokenizer, root / name)
        logger.info(f"{name} trained ({n} steps, {log[name]['seconds']} s, loss {log[name]['loss_last']:.3f})")
        return model

    base = fit("base", _new_model(tokenizer, config, seed),
               [[(p, compliance(p)) for p in harm_train], task_train[BASE_TASK]], steps["base"])
    benign_own = training.own_answers(base, tokenizer, [p for p, _ in task_train[BASE_TASK][:1000]], max_new_tokens=16,
                             batch_size=64)
    aligned = fit("aligned", copy.deepcopy(base), [[(p, REFUSAL) for p in harm_train], benign_own],
                  steps["aligned"])
    handful = harm_train[:config.dealign_examples]
    fit("dealigned", copy.deepcopy(aligned), [[(p, compliance(p)) for p in handful]], steps["dealigned"],
        config.dealign_lr)
    for i, task in enumerate(DEGRADED_TASKS, 1):
        fit(f"degraded-{i}", copy.deepcopy(aligned), [task_train[task]], steps["degraded"], config.finetune_lr)
    fit("target", copy.deepcopy(aligned), [task_train[TARGET_TASK]], steps["target"], config.finetune_lr)
    return log


def family_root(preset: str = "default", seed: int = 0) -> Path:
    config = _config(preset)
    key = hashlib.sha256(json.dumps([FAMILY_VERSION, asdict(config), seed], sort_keys=True).encode()).hexdigest()
    return cache_root() / "family" / f"{preset}-seed{seed}-{key[:12]}"


def _config(preset: str) -> FamilyConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown family preset {preset!r}; presets: {', '.join(PRESETS)}.")
    return PRESETS[preset]


def build_family(preset: str = "default", seed: int = 0, *, rebuild: bool = False,
                 progress: bool = True) -> Family:
    """The family for ``preset`` and ``seed``: loaded from the cache, else trained (deterministic
    on one machine) into a temporary folder that is renamed into place only when complete."""
    config = _config(preset)

    def build(tmp: Path) -> dict:
        start = time.perf_counter()
        log = _build(tmp, config, seed, progress)
        return {"preset": preset, "seed": seed, "version": FAMILY_VERSION, "config": asdict(config),
                "members": list(MEMBERS), "training": log, "seconds": round(time.perf_counter() - start, 1),
                "torch": torch.__version__}
    root = build_once(family_root(preset, seed), "family.json", build, rebuild=rebuild)
    splits = json.loads((root / "splits.json").read_text())
    return Family(root, preset, seed, config, splits)


def prompt_sets(preset: str = "default", seed: int = 0) -> Family:
    """The family's prompt splits without building (or needing) its models: what ``safegene eval``,
    ``select`` and ``recalibrate`` use by default on any model."""
    config = _config(preset)
    return Family(family_root(preset, seed), preset, seed, config, make_splits(config, seed))
