"""Where `cura eval` writes its report: never over a file of the user's.

Every JSON record the evaluation writes carries `"written_by": "cura eval"` (`REPORT_MARK`). Before a
report is written into a folder (and, from the CLI, before anything is loaded), `check_report_folder`
refuses in one sentence a folder that already holds one of the report's file names unless its record file
carries that mark: a report cura wrote there earlier is replaced, someone else's report.md is not.
Torch-free (the CLI calls it first).
"""

from __future__ import annotations

import json
from pathlib import Path

from cura.errors import CuraError

REPORT_MARK = "cura eval"
RESULT_FILES = ("eval.json", "report.md")
COMPARISON_FILES = ("eval.json", "report.md", "compare.png")
PREFERENCE_FILES = ("preference_eval.json",)


def written_by_cura(record: Path) -> bool:
    """Whether `record` is a JSON object carrying cura eval's mark."""
    try:
        data = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("written_by") == REPORT_MARK


def check_report_folder(folder: str | Path, names: tuple[str, ...], *, flag: str = "--output") -> None:
    """Refuse (CuraError) a report folder that is a file, or holds a file named like one of `names` while
    its record (`names[0]`) was not written by cura eval."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise CuraError(f"{flag} {folder} is a file; give a folder for the evaluation report")
    clash = [name for name in names if (folder / name).exists()]
    if clash and not written_by_cura(folder / names[0]):
        raise CuraError(
            f"{flag} {folder} already holds {', '.join(clash)} that cura eval did not write; pick a new "
            "folder or move them, since the report would replace them"
        )
