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

A folder that already exists is swapped out by two renames: the old folder into a fresh `mkdtemp`
sibling, the new one into place; the destination is missing only between those two renames (and put back
if the second fails). The old folder is then deleted. Files are flushed to disk (`fsync`) before their
rename. Temporaries get the permissions an ordinary new file or folder would (mode less the umask).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["atomic_file", "atomic_folder", "replace_folder", "write_bytes", "write_json", "write_text"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _prefix(path: Path) -> str:
    return f".{path.name}."


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
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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


def replace_folder(new: str | Path, folder: str | Path) -> Path:
    """Move the folder `new` to `folder`, replacing what is there (see the module docstring); returns it."""
    new, folder = Path(new), Path(folder)
    if not folder.exists():
        os.replace(new, folder)
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
    shutil.rmtree(graveyard, ignore_errors=True)
    return folder


@contextmanager
def atomic_folder(folder: str | Path, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield an empty temporary folder beside `folder`; when the block ends without an exception it
    replaces `folder` (or, with ``overwrite=False``, takes its place only if there is none:
    `FileExistsError` otherwise). On an exception the temporary is removed and `folder` is untouched."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_prefix(folder), dir=folder.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
        if not overwrite and folder.exists():
            raise FileExistsError(f"{folder} already exists")
        replace_folder(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
