"""Atomic writes: a file or a folder is either the old one or the whole new one, never a part.

    write_json(path, data)                 # also write_bytes / write_text
    with atomic_file(path) as tmp:         # for writers that want a path (safetensors, savefig, ...)
        save_file(tensors, tmp)
    with atomic_folder(folder) as tmp:     # build a whole folder, then swap it in
        (tmp / "adapter_config.json").write_text(...)

How: the new content is written to a temporary made by `tempfile.mkstemp` / `mkdtemp` in the
destination's own folder (same file system, so the final `os.replace` is a rename), with a unique name
that starts with "." and the destination's name. On any exception the temporary is removed and the
destination is untouched. No fixed names (`.adapter.tmp`, `.adapter.old`) are ever used, so what a crash
left behind cannot make a later save fail.

A folder that already exists is swapped with the new one in one step where the kernel can
(`renameat2(RENAME_EXCHANGE)` on Linux): at every instant the destination is the whole old folder or the
whole new one, so a kill -9 during a re-save never loses the only copy. Elsewhere it falls back to two
renames (old folder into a fresh `mkdtemp` sibling, new one into place; put back if the second fails). The
old folder is deleted only after the new one is in place.

Durability (power loss): every file of a new folder, the folder itself and, after the rename, its parent
are flushed to disk (`fsync`), so a folder that is visible under its final name is complete on disk too.
Temporaries get the permissions an ordinary new file or folder would (mode less the umask).

Targets the user owns: `check_replaceable` refuses a non-empty folder (or a file) that the writer did not
write itself (it has no marker file of the writer's), and one that it did unless the caller was told to
overwrite it; `is_inside` says whether a path is a folder or lies under one (for `--output .` and
output folders inside an input).
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = [
    "atomic_file",
    "atomic_folder",
    "check_replaceable",
    "fsync_dir",
    "fsync_tree",
    "is_inside",
    "os_error_in",
    "replace_folder",
    "write_bytes",
    "write_json",
    "write_text",
]

_RENAME_EXCHANGE = 2  # linux/fs.h


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _prefix(path: Path) -> str:
    return f".{path.name}."


_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def os_error_in(exc: BaseException, target: str | Path | None = None) -> OSError | None:
    """The OSError hidden in a writer's own exception type, or None.

    Writers in Rust (safetensors' `SafetensorError`, tokenizers) report a full disk as
    "... No space left on device (os error 28)" in a non-OSError; as an OSError (with `target` as its file)
    the CLI can say it in one sentence instead of calling it a bug."""
    if isinstance(exc, OSError):
        return _short_write(exc, target)
    found = _RUST_OS_ERROR.search(str(exc))
    if found is None:
        return None
    code = int(found.group(1))
    return OSError(code, os.strerror(code), None if target is None else str(target))


_SHORT_WRITE = re.compile(r"(\d+) requested and (\d+) written")


def _short_write(exc: OSError, target: str | Path | None) -> OSError | None:
    """numpy's `tofile` (the gguf writer) reports a full disk as "8192 requested and 136 written", with no
    errno: an ENOSPC about `target` when its file system really has less room left than was asked for
    (checked before the partial file is removed), else None."""
    found = _SHORT_WRITE.search(str(exc)) if exc.errno is None else None
    if found is None or target is None:
        return None
    try:
        stats = os.statvfs(Path(target).parent)
    except (OSError, AttributeError):  # no statvfs on Windows
        return None
    if stats.f_bavail * stats.f_frsize >= int(found.group(1)):
        return None  # there is room: a short write for another reason, not ours to name
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))


@contextmanager
def atomic_file(path: str | Path, *, mode: int = 0o666) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block ends without an exception it becomes `path`.

    The temporary keeps `path`'s suffix (so writers that infer a format from it still work); the result
    gets `mode` less the umask (0o777 for an executable or a shared library). Missing parent folders are
    made.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=_prefix(path), suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, mode & ~_umask())
        with open(tmp, "rb+") as handle:  # flush what the writer wrote, whoever opened it
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        hidden = os_error_in(exc, path)  # before the partial file goes: a short write checks the free space
        tmp.unlink(missing_ok=True)
        if hidden is not None:
            raise hidden from exc
        raise
    fsync_dir(path.parent)


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` atomically; returns `path`."""
    path = Path(path)
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
    return path


def write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """Write `text` to `path` atomically; returns `path`."""
    return write_bytes(path, text.encode(encoding))


def write_json(path: str | Path, data: Any, *, indent: int | None = 2) -> Path:
    """Write `data` as JSON (UTF-8, a final newline) to `path` atomically; returns `path`.

    The data is serialized before anything touches the disk, so unserializable data leaves no trace.
    """
    return write_text(path, json.dumps(data, indent=indent, ensure_ascii=False) + "\n")


def fsync_dir(folder: str | Path) -> None:
    """Flush a folder's entries (names created or renamed in it) to disk; a no-op where folders cannot be
    opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a folder; the files themselves were flushed
    finally:
        os.close(fd)


def fsync_tree(folder: str | Path) -> None:
    """Flush every file under `folder`, then every folder (deepest first), so the tree survives power loss."""
    folders = []
    for root, _, files in os.walk(folder):
        folders.append(root)
        for name in files:
            with open(os.path.join(root, name), "rb") as handle:
                os.fsync(handle.fileno())
    for root in reversed(folders):
        fsync_dir(root)


def _exchange(a: Path, b: Path) -> bool:
    """Swap the names `a` and `b` in one atomic step (Linux renameat2); False where that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # glibc before 2.28, musl
        return False
    at_fdcwd = -100
    rc = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False  # the file system cannot exchange: fall back to two renames
    raise OSError(err, os.strerror(err), str(b))


def replace_folder(new: str | Path, folder: str | Path) -> Path:
    """Move the folder `new` to `folder`, replacing what is there (see the module docstring); returns it."""
    new, folder = Path(new), Path(folder)
    if not folder.exists():
        os.replace(new, folder)
        fsync_dir(folder.parent)
        return folder
    if folder.is_dir() and _exchange(new, folder):  # `new` now names the old folder
        fsync_dir(folder.parent)
        shutil.rmtree(new, ignore_errors=True)
        return folder
    graveyard = Path(tempfile.mkdtemp(prefix=_prefix(folder) + "old.", dir=folder.parent))
    old = graveyard / folder.name
    os.replace(folder, old)
    try:
        os.replace(new, folder)
    except BaseException:
        os.replace(old, folder)  # put the old folder back
        shutil.rmtree(graveyard, ignore_errors=True)
        raise
    fsync_dir(folder.parent)
    shutil.rmtree(graveyard, ignore_errors=True)
    return folder


def is_inside(path: str | Path, folder: str | Path) -> bool:
    """Whether `path` is `folder` or lies somewhere under it (both resolved, links followed)."""
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents


def check_replaceable(
    target: str | Path,
    *,
    marker: str,
    what: str,
    overwrite: bool,
    flag: str = "--output",
    example: str = "./out",
) -> None:
    """Refuse (CuraError) to write `what` to `target` where that would destroy something not ours.

    Allowed: a missing or empty folder; a folder holding `marker` (written by this kind of writer) when
    `overwrite` is set. Refused, in one sentence: a file, the current folder or one above it, a non-empty
    folder without `marker`, and one with `marker` without `overwrite`."""
    from cura.errors import CuraError

    target = Path(target)
    if target.exists() and not target.is_dir():
        raise CuraError(f"{flag} {target} is a file; give a folder to write {what} to")
    if is_inside(Path.cwd(), target):
        raise CuraError(
            f"{flag} {target} is the current folder (or holds it); {what} replaces its whole folder, so name "
            f"a new one such as {flag} {example}"
        )
    if not target.is_dir() or not any(target.iterdir()):
        return
    if not (target / marker).is_file():
        raise CuraError(
            f"{flag} {target} already holds files that cura did not write there (no {marker}); pick a new "
            f"folder or empty this one, since writing {what} replaces the whole folder"
        )
    if not overwrite:
        raise CuraError(
            f"{flag} {target} already holds {what} that cura wrote earlier; pass --overwrite to replace it, "
            "or pick a new folder"
        )
    listed = _marker_files(target / marker)
    if listed is not None:
        foreign = sorted(p.name for p in target.iterdir() if p.name not in listed and p.name != marker)
        if foreign:
            raise CuraError(
                f"{flag} {target} holds files cura did not write there ({', '.join(foreign[:3])}); move them "
                f"out before --overwrite replaces the folder, or pick a new folder"
            )


def _marker_files(marker: Path) -> set[str] | None:
    """The file names a marker (a JSON record with a "files" list) says its writer wrote, if it says."""
    try:
        files = json.loads(marker.read_text(encoding="utf-8")).get("files")
    except (OSError, ValueError, AttributeError):
        return None
    return set(files) if isinstance(files, list) else None


@contextmanager
def atomic_folder(folder: str | Path, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield an empty temporary folder beside `folder`; when the block ends without an exception its files
    are flushed to disk and it replaces `folder` (or, with ``overwrite=False``, takes its place only if there
    is none: `FileExistsError` otherwise). On an exception the temporary is removed and `folder` is
    untouched."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_prefix(folder), dir=folder.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
        if not overwrite and folder.exists():
            raise FileExistsError(f"{folder} already exists")
        fsync_tree(tmp)
        replace_folder(tmp, folder)
    except BaseException as exc:
        hidden = os_error_in(exc, folder) or _renamed(exc, tmp, folder)
        shutil.rmtree(tmp, ignore_errors=True)
        if hidden is not None:
            raise hidden from exc
        raise


def _renamed(exc: BaseException, tmp: Path, folder: Path) -> OSError | None:
    """An OSError about a file in the (now removed) temporary folder, retold about the same file in `folder`,
    so the message names a path the user knows; None for anything else."""
    if not isinstance(exc, OSError) or exc.filename is None or exc.errno is None:
        return None
    try:
        inside = Path(exc.filename).relative_to(tmp)
    except ValueError:
        return None
    return OSError(exc.errno, exc.strerror, str(folder / inside))
