"""Text and JSON from files a user hands us, checked where they enter: one sentence for each way they fail.

Every reader of user files (data rows, YAML configs, a model's config.json, an adapter's JSON) decodes
through here, so the failures read the same everywhere and name the place:

    not UTF-8          file:line, the offending byte, and how to convert it (a UTF-16 file is recognised
                       by its byte-order mark; a UTF-8 BOM is accepted)
    nested too deep    more than MAX_DEPTH levels of lists/objects (Python's parsers raise RecursionError
                       at ~1,000 levels, and a deep row would only break code further on)
    too large          a row over MAX_ROW_CHARS characters, a config file over MAX_CONFIG_BYTES
    huge integers      more than 4,300 digits (Python refuses to convert them: a ValueError otherwise)

Torch-free and dependency-free.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cura.errors import CuraError

MAX_DEPTH = 100
"""levels of nested lists/objects accepted in one row or config file"""
MAX_ROW_CHARS = 64 * 1024 * 1024
"""characters accepted in one data row (a JSON Lines line, a CSV field)"""
MAX_VALUES = 10_000_000
"""values (lists, objects and scalars) one row or config file may hold once YAML aliases are expanded"""
MAX_CONFIG_BYTES = 16 * 1024 * 1024
"""bytes accepted in a YAML config or a model's JSON file"""


def line_of(data: bytes, position: int) -> int:
    """The 1-based line of byte `position` in `data`."""
    return data.count(b"\n", 0, position) + 1


def encoding_hint(data: bytes) -> str:
    """How to fix a file that is not UTF-8, guessed from its first bytes."""
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return "it looks like UTF-16: save it as UTF-8 (e.g. `iconv -f utf-16 -t utf-8`)"
    return "save it as UTF-8 (e.g. `iconv -f latin1 -t utf-8 FILE`, or your editor's 'save with encoding')"


def decode_error(where: str, data: bytes, exc: UnicodeDecodeError) -> str:
    """The sentence for undecodable bytes at `where` (a `file:line` the caller computed)."""
    return f"{where}: not UTF-8 text (byte 0x{data[exc.start]:02x}); {encoding_hint(data)}"


def decode_text(data: bytes, file: str | Path, start_line: int = 1) -> str:
    """`data` (the bytes of `file`, from line `start_line`) as text; CuraError naming file:line if not UTF-8."""
    try:
        return data.decode("utf-8-sig" if start_line == 1 else "utf-8")
    except UnicodeDecodeError as exc:
        where = f"{file}:{start_line + line_of(data, exc.start) - 1}"
        raise CuraError(decode_error(where, data, exc)) from None


def read_text(path: str | Path, *, what: str = "file", max_bytes: int | None = None) -> str:
    """The whole of a UTF-8 text file, with one sentence when it is missing, unreadable, too large or not
    UTF-8. `what` names the file in messages (e.g. "config file")."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if max_bytes is not None and size > max_bytes:
            raise CuraError(
                f"{what} {path} is {size:,} bytes, more than the {max_bytes:,} accepted: is it the right file?"
            )
        data = path.read_bytes()
    except FileNotFoundError:
        raise CuraError(f"{what} {path} does not exist; check the path") from None
    except IsADirectoryError:
        raise CuraError(f"{what} {path} is a folder, not a file; give the file's path") from None
    except OSError as exc:
        raise CuraError(f"cannot read {what} {path} ({exc.strerror or exc}); check its permissions") from None
    return decode_text(data, path)


def _children(node: Any) -> list | None:
    if isinstance(node, dict):
        return list(node.values())
    if isinstance(node, (list, tuple)):
        return list(node)
    return None


def walk(value: Any, limit: int = MAX_DEPTH) -> tuple[float, int]:
    """(how deeply lists/dicts nest in `value`, how many values it holds once every shared reference is
    expanded), counted without recursion; the depth stops being counted past `limit` and is infinite for
    a structure that contains itself (a YAML alias to its own parent).

    Note (shared references): YAML aliases share one object in many places (a "billion laughs" file is 9
    levels of 9 references each, 9**9 values once expanded). Each container is walked once, so checking
    that file costs 81 visits; code that later iterates it would take minutes, hence the expanded count."""
    kids = _children(value)
    if kids is None:
        return 0, 1
    deepest, sizes, on_path = 0, {}, {id(value)}
    stack = [(value, iter(kids))]
    while stack:
        node, pending = stack[-1]
        deepest = max(deepest, len(stack))
        if deepest > limit:
            return deepest, 0
        for child in pending:
            grandchildren = _children(child)
            if grandchildren is None or id(child) in sizes:
                continue
            if id(child) in on_path:
                return float("inf"), 0
            stack.append((child, iter(grandchildren)))
            on_path.add(id(child))
            break
        else:
            stack.pop()
            on_path.discard(id(node))
            sizes[id(node)] = 1 + sum(sizes.get(id(c), 1) for c in _children(node))
    return deepest, sizes[id(value)]


def depth(value: Any, limit: int = MAX_DEPTH) -> float:
    """How deeply lists/dicts nest in `value` (see `walk`)."""
    return walk(value, limit)[0]


def check_depth(value: Any, where: str, limit: int = MAX_DEPTH, max_values: int = MAX_VALUES) -> Any:
    """`value`, or CuraError when it nests more than `limit` levels, contains itself, or holds more than
    `max_values` values once its shared references are expanded."""
    found, size = walk(value, limit)
    if found == float("inf"):
        raise CuraError(
            f"{where}: a value contains itself (a YAML alias to its own parent); remove the alias"
        )
    if found > limit:
        raise CuraError(f"{where}: nested more than {limit} levels deep; flatten it")
    if size > max_values:
        raise CuraError(
            f"{where}: holds {size:,} values once its aliases are expanded, more than the {max_values:,} "
            "accepted; write the values out or shorten them"
        )
    return value


def parse_json(text: str, where: str, *, first_line: int = 1) -> Any:
    """`json.loads(text)` with one sentence for every failure, `where` naming the file (and the line of
    `text`'s start: `first_line`)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CuraError(
            f"{where}:{first_line + exc.lineno - 1}: invalid JSON ({exc.msg} at column {exc.colno})"
        ) from None
    except RecursionError:
        raise CuraError(f"{where}: nested more than {MAX_DEPTH} levels deep; flatten it") from None
    except ValueError as exc:  # integers of more than 4,300 digits
        raise CuraError(f"{where}: {json_value_error(exc)}") from None
    return check_depth(value, where)


def json_value_error(exc: ValueError) -> str:
    """A short reason for a ValueError the JSON parser raised (Python's limit on integer digits)."""
    if "digits" in str(exc):
        return "a number with more than 4,300 digits, which cannot be read; write it as a string"
    return f"invalid JSON ({exc})"


def read_json_file(path: str | Path, fix: str, *, what: str = "file") -> dict:
    """A JSON object from `path` (a config.json, an index, an adapter config), every failure one sentence
    ending in `fix` (e.g. "re-save the model")."""
    path = Path(path)
    try:
        value = parse_json(read_text(path, what=what, max_bytes=MAX_CONFIG_BYTES), str(path))
    except CuraError as exc:
        raise CuraError(f"{exc}; {fix}") from None
    if not isinstance(value, dict):
        raise CuraError(f"{path}: expected a JSON object, found {type(value).__name__}; {fix}")
    return value
