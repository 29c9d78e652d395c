"""The package's architecture, checked: every module imports, imports point one way (cli ->
experiments -> fleet -> method / models -> eval -> pipeline -> lora -> gene, card, cache, progress -> architecture -> io -> the engine),
siblings do not import each other, and the public API is where a user looks for it."""

import ast
import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import safegene_fast

PACKAGE = Path(safegene_fast.__file__).parent
# Each part of the package and its level: a module may import its own part and lower levels only.
LEVELS = {
    "_C": 0, "_version": 0, "reference": 0, "ops": 1,
    "io": 2,
    "architecture": 3,
    "gene": 4, "card": 4, "cache": 4, "progress": 4,
    "lora": 4.5,  # reads adapters in the gene's PEFT format
    "pipeline": 5,
    "eval": 6,
    "method": 7, "models": 7,
    "fleet": 7.5,  # protect one fine-tune, batch many: above the method, below the experiments
    "experiments": 8,
    "cli": 9,
    "__init__": 10, "__main__": 11,
}


def modules() -> list[str]:
    names = ["safegene_fast"]
    for info in pkgutil.walk_packages([str(PACKAGE)], prefix="safegene_fast."):
        names.append(info.name)
    return [n for n in names if not n.endswith("._C")]


def part(module: str) -> str:
    """``safegene_fast.method.patch`` -> ``method``; the package root -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports(path: Path, module: str) -> list[tuple[str, int]]:
    """Every safegene_fast module ``path`` imports (at any depth, lazy imports included)."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "safegene_fast"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] != "safegene_fast":
                continue
            if base == "safegene_fast":  # from safegene_fast import ops, _C
                out += [(f"safegene_fast.{a.name}", node.lineno) for a in node.names]
            else:
                out.append((base, node.lineno))
    return out


def source(module: str) -> Path:
    path = PACKAGE.joinpath(*module.split(".")[1:])
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


@pytest.mark.parametrize("module", [m for m in modules() if m != "safegene_fast.__main__"])  # that one runs
def test_every_module_imports(module):
    importlib.import_module(module)


def test_every_part_has_a_level():
    assert {part(m) for m in modules()} <= set(LEVELS)


def test_imports_point_one_way():
    bad = []
    for module in modules():
        mine = part(module)
        for target, line in imports(source(module), module):
            theirs = part(target)
            if theirs != mine and LEVELS[theirs] >= LEVELS[mine]:
                bad.append(f"{source(module).relative_to(PACKAGE.parent)}:{line}: {mine} imports {target}")
    assert not bad, "imports that point up or sideways:\n" + "\n".join(bad)


def test_the_rule_catches_an_upward_import(tmp_path):
    """The checker itself: an eval module importing the method is found."""
    fake = tmp_path / "judge.py"
    fake.write_text("from safegene_fast.method.patch import GenePatch\nimport safegene_fast.cli\n")
    found = [part(t) for t, _ in imports(fake, "safegene_fast.eval.judge")]
    assert found == ["method", "cli"] and all(LEVELS[f] >= LEVELS["eval"] for f in found)


def test_public_api():
    for name in ("extract", "apply", "resta", "select_layers", "recalibrate", "evaluate", "SafetyGene",
                 "rsvd", "merge_lowrank_", "merge_dense_", "merge_diff", "delta", "delta_out", "__version__"):
        assert hasattr(safegene_fast, name), name
    assert set(safegene_fast.__all__) <= set(dir(safegene_fast))


def test_version_flag():
    done = subprocess.run([sys.executable, "-m", "safegene_fast", "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == f"safegene_fast {safegene_fast.__version__}"
