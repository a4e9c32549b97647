"""Range checks of a run's numbers and paths, done once when the config is built, before anything loads.

The type checks of `cura.config` accept any float or int; these say which values make sense:

    every float       finite (`--epochs inf`, `--max-grad-norm nan` (which silently turned clipping off),
                      `--data.eval-split nan` were accepted)
    every int         within a signed 64-bit integer (`--seed 1e23` reached torch and failed there)
    seeds             0 .. 2**63 - 1
    adam betas        0 <= beta < 1, whichever optimizer (beta1 1.5 diverges silently)
    threads           at most the cores this process may use (`--threads 100000` segfaults in OpenMP)
    eval_batches      zero or more (-1 silently dropped evaluation)
    output_dir        not a file, no name longer than the file system allows (255 bytes), not under a
                      folder that cannot be written

Each failure is one sentence naming the config key (= the flag) and a value that works. Torch-free.
"""

from __future__ import annotations

import dataclasses
import errno
import math
import os
from pathlib import Path
from typing import Any

from cura.errors import CuraError

INT64_MAX = 2**63 - 1
NAME_MAX = 255  # bytes in one path component on Linux, macOS and Windows file systems


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def walk_numbers(config: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, value) of every int and float leaf of a (nested) config dataclass."""
    out = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            out.extend(walk_numbers(value, f"{prefix}{f.name}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out.append((prefix + f.name, value))
    return out


def check_numbers(config: Any) -> None:
    """Every float finite, every int inside int64 (see the module docstring)."""
    for key, value in walk_numbers(config):
        if isinstance(value, float) and not math.isfinite(value):
            raise CuraError(f"config key '{key}' is {value}, which is not a finite number; give a real value")
        if isinstance(value, int) and not -INT64_MAX - 1 <= value <= INT64_MAX:
            raise CuraError(
                f"config key '{key}' is {value:.3g}, outside the 64-bit integers; give a smaller number"
            )


def check_range(key: str, value: float, low: float, high: float, *, high_open: bool = False) -> None:
    """CuraError unless low <= value <= high (value < high with `high_open`)."""
    above = value >= high if high_open else value > high
    if value < low or above:
        bound = f"below {high:g}" if high_open else f"at most {high:g}"
        raise CuraError(f"config key '{key}' is {value:g}; it must be at least {low:g} and {bound}")


def check_train_config(config: Any) -> None:
    """The range checks of a `TrainConfig` (called from its `__post_init__`)."""
    check_numbers(config)
    for key in ("seed", "data.seed"):
        value = config.seed if key == "seed" else config.data.seed
        if not 0 <= value <= INT64_MAX:
            raise CuraError(f"config key '{key}' is {value:.3g}; use a whole number from 0 to 2**63-1")
    check_range("adam_beta1", config.adam_beta1, 0.0, 1.0, high_open=True)
    check_range("adam_beta2", config.adam_beta2, 0.0, 1.0, high_open=True)
    cores = usable_cores()
    if config.threads > cores:
        raise CuraError(
            f"config key 'threads' is {config.threads} but this machine lets cura use {cores} cores; "
            f"use --threads {cores} or less (0: all of them)"
        )
    if config.eval_batches < 0:
        raise CuraError(
            f"config key 'eval_batches' is {config.eval_batches}; use 0 (the whole eval split) or more"
        )
    if config.max_bad_steps < 1:
        raise CuraError(f"config key 'max_bad_steps' is {config.max_bad_steps}; use 1 or more")
    check_output_dir(config.output_dir, "output_dir")


def check_output_dir(path: str | Path, key: str) -> None:
    """An output folder cura can create: no component too long, not a file, its nearest existing
    ancestor a writable folder. Nothing is created here."""
    path = Path(path)
    for part in path.parts:
        if len(os.fsencode(part)) > NAME_MAX:
            raise CuraError(
                f"config key '{key}': the name {part[:40]}... is {len(os.fsencode(part))} bytes, longer than "
                f"the {NAME_MAX} a file system allows; choose a shorter --output"
            )
    if path.exists() and not path.is_dir():
        raise CuraError(f"config key '{key}': {path} is a file, not a folder; choose another --output")
    ancestor = path
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if ancestor.exists() and not ancestor.is_dir():
        raise CuraError(f"config key '{key}': {ancestor} is a file, so {path} cannot be a folder")
    if ancestor.exists() and not os.access(ancestor, os.W_OK | os.X_OK):
        raise CuraError(
            f"config key '{key}': {ancestor} is not writable (permissions or a read-only file system); "
            "choose another --output"
        )


# errno -> what it means for the user and what to do, for OSErrors the CLI turns into one sentence
OS_ERRORS = {
    errno.ENOSPC: ("no space left on the device", "free some space or write elsewhere"),
    errno.EDQUOT: ("the disk quota is exceeded", "free some space or write elsewhere"),
    errno.EROFS: ("the file system is read-only", "write elsewhere"),
    errno.EACCES: ("permission denied", "check the permissions or write elsewhere"),
    errno.EPERM: ("operation not permitted", "check the permissions or write elsewhere"),
    errno.ENAMETOOLONG: ("the name is too long", "choose a shorter path"),
    errno.ENOTDIR: ("a part of the path is a file, not a folder", "fix the path"),
    errno.EISDIR: ("it is a folder, not a file", "give a file's path"),
    errno.EEXIST: ("it already exists", "remove it or choose another path"),
    errno.EMFILE: ("too many open files", "raise the limit (ulimit -n)"),
}


def os_error_sentence(exc: OSError) -> str | None:
    """One sentence for an OSError the user can fix (full disk, read-only, permissions...), or None."""
    known = OS_ERRORS.get(exc.errno)
    if known is None:
        return None
    what, fix = known
    target = exc.filename if exc.filename is not None else "a file"
    return f"cannot use {target}: {what} ({exc.strerror or exc}); {fix}"
