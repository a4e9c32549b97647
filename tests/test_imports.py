"""The import rules of src/cura, checked on the source (its AST), so a forbidden import fails here before it
makes a cycle or loads torch where it must not:

1. `cura.memory` is formulas. None of its modules imports torch, or anything from `cura.train`,
   `cura.models` or `cura.adapters`: not at module level, not inside a function, and not through another
   cura module it imports (so `cura estimate` never loads torch; tests/test_memory.py also runs it in a
   fresh process to check). The train side builds the planner's input (`cura.train.plan.plan_spec`) and
   does the measuring (`cura.train.measure`).
2. `cura.quant` is the 4-bit format as pure tensor functions. From cura it imports only `cura.quant`
   itself, `cura.errors`, `cura.constants` and `cura.atomic` (torch-free: the kernel build writes atomically).

An import is every `import` / `from ... import` statement anywhere in a module (relative ones resolved);
`from package import name` counts as importing `package.name` too when that is a module of src/cura.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

MEMORY_FORBIDDEN = ("torch", "cura.train", "cura.models", "cura.adapters")
QUANT_ALLOWED = (
    "cura.quant",
    "cura.errors",
    "cura.constants",
    "cura.atomic",
    "cura.optional",
)  # atomic: the kernel build; optional: triton


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted((SRC / "cura").rglob("*.py"))}


def _package(name: str) -> str:
    return name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]


def imports_of(source: str, name: str) -> set[str]:
    """Every module the source of module `name` imports, anywhere in it (see the module docstring)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = _package(name) if name in MODULES else name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    package = package.rpartition(".")[0]
                base = f"{package}.{base}" if base else package
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES)
    return found


def _with_parents(name: str) -> list[str]:
    """A module and the packages whose __init__ runs when it is imported."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def closure(start: str) -> dict[str, str]:
    """Every module reachable from `start` through imports -> the cura module that imports it."""
    seen: dict[str, str] = {}
    todo = [start]
    while todo:
        current = todo.pop()
        for imported in imports_of(MODULES[current].read_text(encoding="utf-8"), current):
            for name in _with_parents(imported):
                if name not in seen and name != start:
                    seen[name] = current
                    if name in MODULES:
                        todo.append(name)
    return seen


def _is_under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_the_walker_sees_imports_inside_functions_and_relative_ones():
    source = "def f():\n    import torch\n    from . import planner\n    from ..train import loop\n"
    found = imports_of(source, "cura.memory.fit")
    assert {"torch", "cura.memory", "cura.memory.planner", "cura.train", "cura.train.loop"} <= found
    # and the graph reaches what it should: the trainer uses the planner, and through it cura.errors
    assert "cura.memory" in closure("cura.train.autofit")
    assert "torch" in closure("cura.train.loop")


@pytest.mark.parametrize("name", [m for m in MODULES if _is_under(m, ("cura.memory",))])
def test_memory_imports_no_torch_trainer_models_or_adapters(name):
    bad = {m: via for m, via in closure(name).items() if _is_under(m, MEMORY_FORBIDDEN)}
    assert not bad, f"{name} reaches forbidden modules (module -> the cura module importing it): {bad}"


@pytest.mark.parametrize("name", [m for m in MODULES if _is_under(m, ("cura.quant",))])
def test_quant_imports_from_cura_only_errors_and_constants(name):
    imported = imports_of(MODULES[name].read_text(encoding="utf-8"), name)
    bad = sorted(m for m in imported if _is_under(m, ("cura",)) and not _is_under(m, QUANT_ALLOWED))
    assert not bad, f"{name} imports {bad}; cura.quant may import only {', '.join(QUANT_ALLOWED)} from cura"
