"""One owner per run folder, and a run folder that only ever holds what the run wrote.

    with claim_run_folder(config, say) as out:   # refused in one sentence, or the folder is ours until the end
        ...

What is checked before anything is written:
  - the folder is not inside a data folder (its JSON files would become training data) and not a file;
  - a non-empty folder is a cura run (`cura_run.json`, or the `config.json` + `metrics.jsonl` of a run
    written before that record existed): `--resume` continues it, `--overwrite` first deletes what the
    earlier run wrote (`RUN_FILES`, checkpoints included; nothing else), and neither is allowed over files
    cura did not write.

The lock is `cura.lock` in the run folder: the owner holds an exclusive `flock` on it for the run's life
and writes its PID and host into it. flock is released by the kernel when the owner dies (kill -9
included), so a lock file that can be locked again is stale: it is taken over with a note naming the
dead owner. A second run or `--resume` on a folder whose lock is held is refused, naming the owner.
In a distributed run (torchrun sets RANK) only rank 0 owns the folder: the other ranks neither check nor
lock it.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from cura.atomic import is_inside
from cura.errors import CuraError

LOCK_NAME = "cura.lock"
RUN_RECORD = "cura_run.json"
RUN_FILES = (
    "checkpoints",
    "adapter",
    "metrics.jsonl",
    "summary.json",
    "loss.png",
    "config.json",
    "demo.md",
    RUN_RECORD,
    # --report-to (train/tracking.py): the trackers' local files and the runs they continue on resume
    "tracking.json",
    "tensorboard",
    "wandb",
    "mlflow",
)
"""What a run writes into its folder: `--overwrite` deletes exactly these (and `cura`'s temporaries)."""

Say = Callable[[str], None]


class RunLock:
    """An exclusive, process-lifetime lock on a run folder (see the module docstring)."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / LOCK_NAME
        self.fd: int | None = None

    def acquire(self, say: Say) -> None:
        """Take the lock or raise CuraError naming its live owner; a stale lock is taken over with a note."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = _owner_text(_read_owner(fd))
                os.close(fd)
                raise CuraError(
                    f"output folder {self.path.parent} is in use by another cura run ({owner}); wait for it to "
                    "end, stop it, or choose another --output"
                ) from None
            if _same_file(fd, self.path):  # not a lock file its last owner unlinked while we waited
                break
            os.close(fd)
        previous = _read_owner(fd)
        if previous:
            say(
                f"taking over the stale lock {self.path} of a run that is no longer alive "
                f"({_owner_text(previous)})"
            )
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        self.fd = fd

    def release(self) -> None:
        """Remove the lock file, then let go of the lock (in that order, so no one locks a file we delete)."""
        if self.fd is None:
            return
        try:
            if _same_file(self.fd, self.path):
                self.path.unlink()
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _read_owner(fd: int) -> dict | None:
    try:
        data = os.pread(fd, 4096, 0)
        owner = json.loads(data.decode()) if data else None
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


def _owner_text(owner: dict | None) -> str:
    if not owner:
        return "owner unknown"
    started = owner.get("started")
    when = time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(started)) if started else ""
    return f"PID {owner.get('pid')} on host {owner.get('host')}{when}"


def is_cura_run(folder: Path) -> bool:
    """Whether `folder` holds a run cura wrote (its record, or an older run's config.json + metrics.jsonl)."""
    if (folder / RUN_RECORD).is_file():
        return True
    config = folder / "config.json"
    if not (config.is_file() and ((folder / "metrics.jsonl").is_file() or (folder / "checkpoints").is_dir())):
        return False
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and {"output_dir", "lora", "lr"} <= set(data)


def _contents(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name != LOCK_NAME] if folder.is_dir() else []


def check_not_data(out: Path, config) -> None:
    """Refuse an output folder inside a data folder: the run's own files would be read as data."""
    for key in ("path", "eval_path"):
        value = getattr(config.data, key, None)
        if value and Path(value).is_dir() and is_inside(out, value):
            raise CuraError(
                f"output folder {out} is inside the data folder {value} (config key 'data.{key}'): its files "
                "would be read as training data; choose an --output outside it"
            )


def clear_previous_run(out: Path, say: Say) -> None:
    """Delete what an earlier run wrote into `out` (`RUN_FILES` and its temporaries), nothing else."""
    removed = []
    for child in out.iterdir():
        ours = child.name in RUN_FILES or any(child.name.startswith(f".{n}.") for n in RUN_FILES)
        if not ours:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
        removed.append(child.name)
    if removed:
        say(f"--overwrite: deleted the earlier run's {', '.join(sorted(removed))} in {out}")


def check_folder(out: Path, config, say: Say) -> None:
    """What may happen to `out` given --resume / --overwrite (see the module docstring); under the lock."""
    if out.exists() and not out.is_dir():
        raise CuraError(f"--output {out} is a file; give a folder for the run")
    contents = _contents(out)
    if not contents:
        return
    if not is_cura_run(out):
        names = ", ".join(sorted(p.name for p in contents)[:3])
        raise CuraError(
            f"output folder {out} holds files that are not a cura run ({names}); cura never writes over them "
            "(not with --resume or --overwrite either): choose another --output"
        )
    if config.resume:
        return
    if not config.overwrite:
        raise CuraError(
            f"output folder {out} already holds a run; pass --resume to continue it, --overwrite to train "
            "over it, or choose another --output"
        )
    clear_previous_run(out, say)


@contextmanager
def claim_run_folder(config, say: Say) -> Iterator[Path]:
    """Lock the run folder for the block and check what may be done to it; a folder this call created is
    removed again if the run leaves nothing in it (a run refused by its data writes nothing)."""
    out = Path(config.output_dir)
    if os.environ.get("RANK", "0") != "0":  # rank 0 owns the folder of a distributed run
        yield out
        return
    if out.exists() and not out.is_dir():
        raise CuraError(f"--output {out} is a file; give a folder for the run")
    check_not_data(out, config)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    lock = RunLock(out)
    try:
        lock.acquire(say)
        check_folder(out, config, say)
        yield out
    finally:
        lock.release()
        if created:
            try:
                out.rmdir()  # only if empty
            except OSError:
                pass


def full_disk_error(exc: OSError, output_dir: str | Path) -> CuraError | None:
    """The one sentence for a run stopped by a full disk (or quota) that left a complete checkpoint: what
    happened and that `--resume` continues from that checkpoint once there is room. None for other errors
    (the CLI's generic OSError sentence then applies)."""
    import errno

    from cura.train.checkpoint import latest_checkpoint
    from cura.validate import os_error_sentence

    if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
        return None
    last = latest_checkpoint(Path(output_dir) / "checkpoints")
    sentence = os_error_sentence(exc)
    if last is None or sentence is None:
        return None
    return CuraError(
        f"{sentence}; nothing is lost: {last} is the last complete checkpoint, so once there is room the "
        "same command plus --resume continues from it (or copy the run folder to a larger disk and resume there)"
    )
