"""The small files a user gives beside the checkpoints: prompt lists and coefficient maps, read
with one-sentence errors."""

from __future__ import annotations

import json
import math
from pathlib import Path


class InputFileError(ValueError):
    """A prompts or coefficients file that cannot be used."""


def load_coeffs(path: str) -> dict[str, float]:
    """coeffs.json: {"<layer index or module name>": alpha, ...}; absent layers get 0."""
    try:
        coeffs = json.loads(Path(path).read_text())
    except OSError as exc:
        raise InputFileError(f"{path}: cannot read the coefficients file ({exc.strerror}).") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputFileError(f"{path}: the coefficients file is not JSON ({exc}).") from None
    if not isinstance(coeffs, dict) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in coeffs.values()):
        raise InputFileError(f"{path}: the coefficients file must map layer indices or module names to "
                             f"finite numbers.")
    return {str(k): float(v) for k, v in coeffs.items()}


def read_prompts(path: str) -> list[str]:
    """A prompts file: a JSON list of strings, or one prompt per line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputFileError(f"{path}: cannot read the prompts file ({getattr(exc, 'strerror', None) or exc}).") from None
    if text.lstrip().startswith("["):
        try:
            prompts = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputFileError(f"{path}: the prompts file is not valid JSON ({exc}).") from None
        if not all(isinstance(p, str) for p in prompts):
            raise InputFileError(f"{path}: a JSON prompts file must be a list of strings.")
    else:
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise InputFileError(f"{path}: the prompts file has no prompts.")
    return prompts
