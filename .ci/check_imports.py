"""Every package that cura's code imports, anywhere (module level or inside a function), is installed.

Run with the python of a venv made by the README's first command (no extras): an import that only a test
or optional extra satisfies makes this fail, naming the file:line and the package. Then every module of
cura is imported for real, so an import error in module-level code shows too.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import pkgutil
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"


def imported_packages(root: Path) -> dict[str, str]:
    """Top-level package name -> the first file:line importing it (relative imports skipped)."""
    found: dict[str, str] = {}
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], f"{path.relative_to(root.parent)}:{node.lineno}")
    return found


def optional_requirements(root: Path) -> list[tuple[str, str, str]]:
    """(module, extra, file:line) of every `require("module", extra="...")` call in `root`."""
    found = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if not (
                isinstance(node, ast.Call)
                and getattr(node.func, "id", getattr(node.func, "attr", "")) == "require"
            ):
                continue
            args = [a.value for a in node.args if isinstance(a, ast.Constant)]
            kwargs = {k.arg: k.value.value for k in node.keywords if isinstance(k.value, ast.Constant)}
            module = args[0] if args else kwargs.get("module")
            extra = args[1] if len(args) > 1 else kwargs.get("extra")
            distribution = kwargs.get("distribution") or (module or "").split(".")[0]
            if module and extra:
                found.append((distribution, extra, f"{path.relative_to(root.parent)}:{node.lineno}"))
    return found


def check_extras(pyproject: Path) -> list[str]:
    """Each optional package `cura.optional.require` names is listed in the extra it names."""
    import re

    import tomllib

    extras = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"].get("optional-dependencies", {})
    wrong = []
    for distribution, extra, where in optional_requirements(SRC / "cura"):
        names = {re.split(r"[<>=!~\[ ;]", spec, maxsplit=1)[0].lower() for spec in extras.get(extra, [])}
        if distribution.lower() not in names:
            wrong.append(
                f"{where}: requires '{distribution}' from the extra '{extra}', which does not list it"
            )
    return wrong


def main() -> int:
    missing = check_extras(SRC.parent / "pyproject.toml")
    for package, where in sorted(imported_packages(SRC / "cura").items()):
        if package in sys.stdlib_module_names or package == "__future__":
            continue
        if importlib.util.find_spec(package) is None:
            missing.append(f"{where}: imports '{package}', which a plain `pip install .` does not install")
    import cura

    for info in pkgutil.walk_packages(cura.__path__, "cura."):
        if info.name.endswith("__main__"):
            continue  # running it would start the demo
        try:
            importlib.import_module(info.name)
        except ImportError as exc:
            missing.append(f"{info.name}: {exc}")
    for line in missing:
        print(line, file=sys.stderr)
    if missing:
        print(
            "add each package above to [project] dependencies (a `require`d one: to the extra it names) in pyproject.toml",
            file=sys.stderr,
        )
        return 1
    print(f"check_imports: every import of src/cura is satisfied by `pip install .` ({sys.prefix})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
