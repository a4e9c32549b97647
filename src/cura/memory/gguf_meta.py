"""Read a GGUF file's metadata and tensor names without touching its tensor data.

Layout (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md), all little-endian:

    magic "GGUF" | u32 version | u64 tensor_count | u64 kv_count
    kv_count x  (string key, u32 value_type, value)
    tensor_count x (string name, u32 n_dims, n_dims x u64 dims, u32 type, u64 offset)
    ... aligned tensor data (never read here)

A string is u64 length + UTF-8 bytes; an array is u32 element type + u64 count + elements. Arrays (the
tokenizer's 100k+ tokens and merges) are skipped and reported as their length, so reading the header of a
70B file takes milliseconds; `gguf.GGUFReader` parses every array and takes seconds.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import BinaryIO

from cura.errors import CuraError

# GGUF value types -> struct format of a scalar (8 = string, 9 = array)
_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_STRING, _ARRAY = 8, 9


def _read(f: BinaryIO, fmt: str):
    size = struct.calcsize(fmt)
    raw = f.read(size)
    if len(raw) != size:
        raise EOFError
    return struct.unpack(fmt, raw)[0]


def _string(f: BinaryIO) -> str:
    n = _read(f, "<Q")
    raw = f.read(n)
    if len(raw) != n:
        raise EOFError
    return raw.decode("utf-8", errors="replace")


def _skip_array(f: BinaryIO, kind: int, count: int) -> None:
    if kind in _SCALARS:
        f.seek(struct.calcsize(_SCALARS[kind]) * count, 1)
        return
    for _ in range(count):
        _value(f, kind)


def _value(f: BinaryIO, kind: int):
    if kind in _SCALARS:
        return _read(f, _SCALARS[kind])
    if kind == _STRING:
        return _string(f)
    if kind == _ARRAY:
        inner, count = _read(f, "<I"), _read(f, "<Q")
        _skip_array(f, inner, count)
        return count  # arrays are reported by length (e.g. the number of tokens)
    raise ValueError(f"unknown GGUF value type {kind}")


def read_gguf_metadata(path: str | Path) -> tuple[dict[str, object], set[str]]:
    """(metadata key -> value, with arrays as their length; the set of tensor names)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise CuraError(f"{path} is not a GGUF file (no 'GGUF' magic): give a .gguf model file")
            version = _read(f, "<I")
            if version < 2:
                raise CuraError(f"{path} is GGUF version {version}; re-export it with a current llama.cpp")
            n_tensors, n_kv = _read(f, "<Q"), _read(f, "<Q")
            meta: dict[str, object] = {}
            for _ in range(n_kv):
                key = _string(f)
                meta[key] = _value(f, _read(f, "<I"))
            names = set()
            for _ in range(n_tensors):
                names.add(_string(f))
                n_dims = _read(f, "<I")
                f.seek(8 * n_dims + 4 + 8, 1)
            return meta, names
    except (EOFError, ValueError) as e:
        raise CuraError(
            f"{path} has a damaged or truncated GGUF header ({e or 'ends early'}): re-export it"
        ) from e
