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

import os
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


# ggml tensor type -> (elements per block, bytes per block), as gguf.constants.GGML_QUANT_SIZES has them
# (tests/test_hostile_inputs.py checks the two agree); used to check that every tensor lies in the file
GGML_BLOCKS = {
    0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34), 9: (32, 40),
    10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210), 15: (256, 292),
    16: (256, 66), 17: (256, 74), 18: (256, 98), 19: (256, 50), 20: (32, 18), 21: (256, 110),
    22: (256, 82), 23: (256, 136), 24: (1, 1), 25: (1, 2), 26: (1, 4), 27: (1, 8), 28: (1, 8),
    29: (256, 56), 30: (1, 2), 34: (256, 54), 35: (256, 66), 39: (32, 17), 40: (64, 36), 41: (128, 18),
}  # fmt: skip
MAX_DIMS = 4  # GGML_MAX_DIMS


MAX_STRING = 64 * 1024 * 1024  # a metadata string read into memory (chat templates are kilobytes)


def _read(f: BinaryIO, fmt: str):
    size = struct.calcsize(fmt)
    raw = f.read(size)
    if len(raw) != size:
        raise EOFError
    return struct.unpack(fmt, raw)[0]


def _string(f: BinaryIO) -> str:
    n = _read(f, "<Q")
    if n > MAX_STRING:  # a damaged length would otherwise ask for exabytes of memory
        raise ValueError(f"a string of {n:,} bytes")
    raw = f.read(n)
    if len(raw) != n:
        raise EOFError
    return raw.decode("utf-8", errors="replace")


def _skip_array(f: BinaryIO, kind: int, count: int) -> None:
    """Seek past an array (seeking past the end allocates nothing; the caller checks the position)."""
    if kind in _SCALARS:
        f.seek(struct.calcsize(_SCALARS[kind]) * count, 1)
        return
    if kind == _STRING:
        for _ in range(count):
            f.seek(_read(f, "<Q"), 1)
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


def _tensor_end(f: BinaryIO, name: str) -> int:
    """Read one tensor's info; returns where its data ends, relative to the start of the data section."""
    n_dims = _read(f, "<I")
    if n_dims > MAX_DIMS:
        raise ValueError(f"tensor {name} has {n_dims} dimensions")
    dims = [_read(f, "<Q") for _ in range(n_dims)]
    kind, offset = _read(f, "<I"), _read(f, "<Q")
    if kind not in GGML_BLOCKS:
        raise ValueError(f"tensor {name} has unknown ggml type {kind}")
    block, size = GGML_BLOCKS[kind]
    elements = 1
    for d in dims:
        elements *= d
    return offset + elements // block * size


def read_gguf_metadata(path: str | Path) -> tuple[dict[str, object], set[str]]:
    """(metadata key -> value, with arrays as their length; the set of tensor names).

    The header is checked against the file as it is read: every length fits in what is left of the file,
    and every tensor's data (offset + its size by ggml type) lies inside it, so a truncated or damaged
    file is one CuraError here rather than an exabyte allocation or a crash in a later reader."""
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
            if f.tell() > os.fstat(f.fileno()).st_size:
                raise EOFError
            names, end = set(), 0
            for _ in range(n_tensors):
                name = _string(f)
                names.add(name)
                end = max(end, _tensor_end(f, name))
            alignment = meta.get("general.alignment", 32)
            if not isinstance(alignment, int) or alignment < 1:
                raise ValueError(f"general.alignment is {alignment!r}")
            data_start = -(-f.tell() // alignment) * alignment
            size = f.seek(0, 2)
            if data_start + end > size:
                raise CuraError(
                    f"{path} is truncated: its tensors need {data_start + end:,} bytes but the file has "
                    f"{size:,}; download or export it again"
                )
            return meta, names
    except (EOFError, ValueError) as e:
        raise CuraError(
            f"{path} has a damaged or truncated GGUF header ({str(e) or 'it ends early'}): re-export it"
        ) from e
    except OSError as e:
        raise CuraError(f"cannot read {path} ({e.strerror or e}); check the path and permissions") from None
