"""The page's long jobs (train, eval, merge, export) as real `cura` commands in their own processes.

Each job is `python -m cura <args>` started in its own session (so its own process group): closing or
crashing the page or the server never ends it, and stop is SIGTERM to that group, which `cura train` answers
by saving a checkpoint and exiting 0. What a job is, is written beside its output (`ui-<kind>.json`: the
command, pid, log file), so a restarted server re-attaches to jobs that still run. Only argument lists built
by the server from checked values are ever run (never a shell, never text from the page as code).
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from cura.atomic import write_json

KINDS = ("train", "eval", "merge", "export")


def display_command(args: list[str]) -> str:
    """The command a person would type for `args` (the server runs the same with `python -m cura`)."""
    return shlex.join(["cura", *args])


def record_path(folder: Path, kind: str) -> Path:
    return folder / f"ui-{kind}.json"


def start(folder: Path, kind: str, args: list[str], cwd: Path) -> dict:
    """Start `cura <args>` for `kind` of the run in `folder`; its output goes to `folder/ui-<kind>.log`."""
    folder.mkdir(parents=True, exist_ok=True)
    current = status(folder, kind)
    if current and current["running"]:
        return current
    log_path = folder / f"ui-{kind}.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log_path, "ab") as log:
        log.write(f"$ {display_command(args)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            [sys.executable, "-m", "cura", *args],
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # its own process group: the server's end is not the job's end
        )
    _children[proc.pid] = proc
    record = {
        "kind": kind,
        "args": args,
        "command": display_command(args),
        "pid": proc.pid,
        "started": time.time(),
        "log": log_path.name,
    }
    write_json(record_path(folder, kind), record)
    return status(folder, kind) or record


# processes this server started: polled so they are reaped (no zombies) and their exit code is known
_children: dict[int, subprocess.Popen] = {}


def _alive(pid: int) -> tuple[bool, int | None]:
    """(running, exit code if this server started it and it ended)."""
    proc = _children.get(pid)
    if proc is not None:
        code = proc.poll()
        return code is None, code
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False, None
    except PermissionError:
        return True, None
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.exists():  # a recycled pid that is not a cura job is not ours
        text = cmdline.read_bytes().replace(b"\0", b" ")
        return b"cura" in text and b"zombie" not in text, None
    return True, None


def status(folder: Path, kind: str) -> dict | None:
    """The job record with `running`, `returncode` (when known) and the log's last lines; None if none."""
    path = record_path(folder, kind)
    if not path.is_file():
        return None
    record = json.loads(path.read_text(encoding="utf-8"))
    running, code = _alive(int(record["pid"]))
    if not running and code is not None and "returncode" not in record:
        record["returncode"] = code
        write_json(path, record)
    record["running"] = running
    record["log_tail"] = tail(folder / record["log"])
    return record


def stop(folder: Path, kind: str) -> dict | None:
    """SIGTERM to the job's process group (`cura train`: checkpoint, then exit 0)."""
    record = status(folder, kind)
    if record and record["running"]:
        try:
            os.killpg(os.getpgid(int(record["pid"])), signal.SIGTERM)
        except ProcessLookupError:
            pass
    return record


def tail(path: Path, lines: int = 30, max_bytes: int = 20000) -> str:
    """The last lines of a log; progress-bar redraws (carriage returns) keep only their last state."""
    if not path.is_file():
        return ""
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - max_bytes))
        text = f.read().decode("utf-8", errors="replace")
    out = [line.rsplit("\r", 1)[-1] for line in text.replace("\r\n", "\n").split("\n")]
    return "\n".join([line for line in out if line.strip()][-lines:])
