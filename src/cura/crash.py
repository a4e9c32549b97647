"""Crash reports: the traceback of a bug, saved to a file instead of printed as a wall of text.

`save_crash_report(exc, argv)` writes `crash-<UTC time>-<pid>.txt` (the command line, Python, platform and
cura's version, the full traceback) atomically to `$CURA_CACHE/crash/` (default `~/.cache/cura/crash/`),
falling back to the system's temporary folder when that cannot be written. The CLI prints one line with
its path (`cura.cli.run_command`). Torch-free.
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

from cura.atomic import write_text


def crash_folder() -> Path:
    """`$CURA_CACHE/crash` if set, else `~/.cache/cura/crash`."""
    base = os.environ.get("CURA_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "cura") / "crash"


def crash_text(exc: BaseException, argv: list[str]) -> str:
    """The report: what was run, on what, and the traceback."""
    from cura import __version__

    lines = [
        f"cura {__version__} crash report, {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}",
        f"command: cura {' '.join(argv)}",
        f"python: {sys.version.split()[0]} on {platform.platform()}",
        "",
    ]
    return "\n".join(lines) + "".join(traceback.format_exception(exc))


def save_crash_report(exc: BaseException, argv: list[str]) -> Path | None:
    """The path of the saved report, or None when no folder could be written."""
    text = crash_text(exc, argv)
    name = f"crash-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{os.getpid()}.txt"
    for folder in (crash_folder(), Path(tempfile.gettempdir())):
        try:
            return write_text(folder / name, text)
        except OSError:
            continue
    return None
