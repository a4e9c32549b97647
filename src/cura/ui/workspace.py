"""The workspace: the one folder the page may read and write, and what it holds (models, data, runs).

Every path the page names is relative to the workspace and goes through `Workspace.path`, which resolves it
(following symlinks) and refuses anything that lands outside: `../x`, an absolute path elsewhere, or a
symlink inside the workspace that points out of it. Torch-free.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from cura.errors import CuraError

DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
SKIP = {"runs", ".cura-ui", "__pycache__"}


class Workspace:
    """Paths inside `root`; `data/` for uploads, `runs/<name>/` for training runs."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        if not self.root.is_dir():
            raise CuraError(f"--workspace {root} is not a folder; create it or pick another one")
        self.data = self.root / "data"
        self.runs = self.root / "runs"

    def path(self, relative: str, *, must_exist: bool = False) -> Path:
        """`relative` resolved inside the workspace; CuraError for anything outside it (or missing)."""
        if not isinstance(relative, str) or not relative.strip() or "\x00" in relative:
            raise CuraError("a path in the workspace is needed, e.g. data/train.jsonl")
        target = (self.root / relative).resolve()
        if not target.is_relative_to(self.root):
            raise CuraError(f"{relative} is outside the workspace {self.root}; only files in it can be used")
        if must_exist and not target.exists():
            raise CuraError(f"{relative} does not exist in the workspace {self.root}")
        return target

    def relative(self, path: Path) -> str:
        return path.resolve().relative_to(self.root).as_posix()

    def run_dir(self, name: str) -> Path:
        """The folder of run `name` (a plain name: letters, digits, `.`, `_`, `-`)."""
        if not isinstance(name, str) or not RUN_NAME.match(name):
            raise CuraError(
                f"run name {name!r} must be letters, digits, '.', '_' or '-' (up to 64), e.g. my-run"
            )
        return self.path(f"runs/{name}")

    def job_dir(self, name: str) -> Path:
        """Where the page keeps run `name`'s job records and logs (`.cura-ui/<name>/`), beside but outside
        the run's own folder, which `cura train` wants empty when it starts."""
        self.run_dir(name)
        return self.root / ".cura-ui" / name

    def _inside(self, path: Path) -> bool:
        try:
            return path.resolve().is_relative_to(self.root)
        except OSError:
            return False

    def data_files(self, limit: int = 200) -> list[str]:
        """Data files anywhere in the workspace (not inside runs), relative, sorted."""
        found = []
        for path in sorted(self.root.rglob("*")):
            parts = path.relative_to(self.root).parts
            if SKIP.intersection(parts) or any(p.startswith(".") for p in parts):
                continue
            if path.suffix.lower() in DATA_SUFFIXES and path.is_file() and self._inside(path):
                if path.name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
                    continue
                if (path.parent / "config.json").exists() and path.name != "config.json":
                    continue  # a file of a model folder
                found.append(self.relative(path))
            if len(found) >= limit:
                break
        return found

    def model_candidates(self, limit: int = 100) -> list[str]:
        """Model folders (holding config.json) and .gguf files in the workspace, outside runs."""
        found = []
        for path in sorted(self.root.rglob("*")):
            parts = path.relative_to(self.root).parts
            if SKIP.intersection(parts) or any(p.startswith(".") for p in parts) or not self._inside(path):
                continue
            if path.is_file() and path.suffix.lower() == ".gguf":
                found.append(self.relative(path))
            elif path.is_dir() and (path / "config.json").is_file():
                found.append(self.relative(path))
            if len(found) >= limit:
                break
        return found

    def run_names(self) -> list[str]:
        """Runs in `runs/` that have a record (config.json or metrics.jsonl) or that the page started."""
        names = set()
        for folder, marks in (
            (self.runs, ("metrics.jsonl", "config.json")),
            (self.root / ".cura-ui", ("ui-train.json",)),
        ):
            if folder.is_dir():
                for path in folder.iterdir():
                    if path.is_dir() and RUN_NAME.match(path.name) and self._inside(path):
                        if any((path / f).exists() for f in marks):
                            names.add(path.name)
        return sorted(names)


def read_metrics(path: Path, start: int = 0) -> list[dict]:
    """The complete lines of metrics.jsonl from line `start` (a half-written last line is left for later)."""
    if not path.is_file():
        return []
    rows = []
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")
    for line in lines[start:-1]:  # the part after the last newline is not complete yet
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            rows.append({})
    return rows
