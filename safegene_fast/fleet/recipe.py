"""The batch recipe (YAML), validated before anything runs.

```yaml
gene: genes/llama3-8b            # a gene folder; or extract: {aligned: A, degraded: [D1, D2], rank: 16}
format: merged                   # merged | peft | combined
alpha: 0.8                       # or coeffs: coeffs.json, or recalibrate: {harmful, keep, shots, steps}
targets:                         # folders, Hub ids or LoRA adapter folders; out: default out_dir/<name>
  - {model: ft/support-bot, out: protected/support-bot}
  - {model: ft/sql-helper}
out_dir: protected
evaluate: {harmful: heldout.txt}  # optional
```

Relative paths are relative to the recipe's folder. Errors name the key: ``recipe.yaml: targets.1:
the field model is missing.``
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from safegene_fast.eval.generate import REFUSAL
from safegene_fast.io import CheckpointError
from safegene_fast.io.reader import HUB_ID
from safegene_fast.pipeline import FORMATS


class RecipeError(CheckpointError):
    """A recipe that cannot run: one sentence naming the file and the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ExtractStep(_Strict):
    aligned: str
    degraded: list[str] = Field(min_length=1)
    rank: int = Field(16, gt=0)
    out: str | None = None  # where the gene goes; default out_dir/gene


class RecalibrateStep(_Strict):
    harmful: str                       # a prompt file: one prompt a line, or a JSON list
    keep: str                          # task prompts whose own answers are kept
    refusal: str = REFUSAL
    shots: int = Field(16, gt=0)
    steps: int = Field(40, gt=0)
    lr: float = Field(0.1, gt=0)
    alpha_max: float = Field(2.0, gt=0)


class EvaluateStep(_Strict):
    harmful: str
    limit: int | None = Field(None, gt=0)


class Target(_Strict):
    model: str
    out: str | None = None
    base: str | None = None  # the base of a LoRA adapter target, if its config does not name one
    name: str | None = None  # the row's name; default the model's last path part


class Recipe(_Strict):
    gene: str | None = None
    extract: ExtractStep | None = None
    format: Literal[FORMATS] = "merged"  # type: ignore[valid-type]
    alpha: float | None = None
    coeffs: str | None = None
    recalibrate: RecalibrateStep | None = None
    targets: list[Target] = Field(min_length=1)
    out_dir: str | None = None
    evaluate: EvaluateStep | None = None

    @field_validator("alpha")
    @classmethod
    def _finite(cls, value):
        if value is not None and not math.isfinite(value):
            raise ValueError("alpha must be a finite number")
        return value

    @model_validator(mode="after")
    def _consistent(self):
        if (self.gene is None) == (self.extract is None):
            raise ValueError("give exactly one of gene (a gene folder) and extract (how to make one)")
        given = [k for k in ("alpha", "coeffs", "recalibrate") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of alpha, coeffs and recalibrate, not {' and '.join(given)}")
        if self.out_dir is None and any(t.out is None for t in self.targets):
            raise ValueError("a target without out needs out_dir")
        if self.extract is not None and self.extract.out is None and self.out_dir is None:
            raise ValueError("extract without out needs out_dir")
        names = [t.name or Path(t.model.rstrip("/")).name for t in self.targets]
        twice = next((n for n in names if names.count(n) > 1), None)
        if twice is not None:
            raise ValueError(f"two targets are named {twice!r}; give them distinct name (or out) keys")
        return self

    def resolved(self, folder: Path) -> Recipe:
        """The recipe with every path relative to ``folder`` made absolute (Hub ids stay ids)."""
        def out(p: str | None) -> str | None:
            return None if p is None else str(folder / os.path.expanduser(p))

        def path(p: str | None) -> str | None:  # an input: a path, or a Hub id when no such path exists
            return p if p is not None and not Path(out(p)).exists() and HUB_ID.fullmatch(p) else out(p)

        return self.model_copy(update={
            "gene": path(self.gene),
            "extract": self.extract and self.extract.model_copy(update={
                "aligned": path(self.extract.aligned), "degraded": [path(d) for d in self.extract.degraded],
                "out": out(self.extract.out)}),
            "coeffs": path(self.coeffs),
            "recalibrate": self.recalibrate and self.recalibrate.model_copy(update={
                "harmful": path(self.recalibrate.harmful), "keep": path(self.recalibrate.keep)}),
            "evaluate": self.evaluate and self.evaluate.model_copy(update={"harmful": path(self.evaluate.harmful)}),
            "out_dir": out(self.out_dir),
            "targets": [t.model_copy(update={"model": path(t.model), "out": out(t.out), "base": path(t.base)})
                        for t in self.targets],
        })


def _where(error: dict) -> str:
    """``targets.1.model: `` for the key at fault (its parent for a key missing or unknown)."""
    loc = error["loc"][:-1] if error["type"] in ("missing", "extra_forbidden") else error["loc"]
    return "".join(f"{'.'.join(str(part) for part in loc)}: " if loc else "")


def _reason(error: dict) -> str:
    kind, message = error["type"], error["msg"]
    if kind == "missing":
        return f"the field {error['loc'][-1]} is missing"
    if kind == "extra_forbidden":
        return f"{error['loc'][-1]} is not a recipe key"
    return message.removeprefix("Value error, ")


def load_recipe(path: str | os.PathLike) -> Recipe:
    """The recipe at ``path``, validated, its paths resolved; else a RecipeError naming the key."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise RecipeError(f"{path}: cannot be read ({exc.strerror}).") from None
    except (UnicodeDecodeError, yaml.YAMLError) as exc:
        reason = str(exc).splitlines()[0]
        raise RecipeError(f"{path}: not valid YAML ({reason}).") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of keys (gene, targets, ...), not "
                          f"{type(raw).__name__}.")
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        error = exc.errors()[0]
        raise RecipeError(f"{path}: {_where(error)}{_reason(error)}.") from None
    return recipe.resolved(path.resolve().parent)
