"""Optional packages, imported only where a feature needs them, with one sentence when one is missing.

`require("wandb", extra="tracking", purpose="--report-to wandb")` returns the module or raises a
`CuraError` saying what to install. Every package named here must be listed in that extra of
`pyproject.toml` (`.ci/check_imports.py` checks it); plain `import` statements in `src/cura` are only for
packages in `dependencies`.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from cura.errors import CuraError

# module name -> (pip distribution, extra of cura that installs it)
OPTIONAL: dict[str, tuple[str, str]] = {}


def register(module: str, distribution: str, extra: str) -> None:
    """Declare an optional package (call at import time of the module that uses it)."""
    OPTIONAL[module.split(".")[0]] = (distribution, extra)


def available(module: str) -> bool:
    """Whether `module` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require(module: str, extra: str, purpose: str, distribution: str | None = None) -> ModuleType:
    """Import `module` or raise one sentence: `purpose` needs it, install with `pip install 'cura[extra]'`."""
    top = module.split(".")[0]
    register(top, distribution or top, extra)
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise CuraError(
            f"{purpose} needs the '{distribution or top}' package, which is not installed ({exc}): "
            f"pip install 'cura[{extra}]'"
        ) from None
