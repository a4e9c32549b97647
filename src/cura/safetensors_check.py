"""Check a safetensors file's header against the file before any library touches it.

The safetensors library trusts the first 8 bytes: random bytes there ask it for an exabyte of memory
(`MemoryError`), a truncated file gives a `SafetensorError` with no hint of what to do, and each caller
would need its own except clause. `check_safetensors(file)` reads only the header and checks, with one
sentence (`CuraError`) naming the file:

    [u64 little-endian N][N bytes of JSON][data ...]

- N fits in the file (and is at most 100 MB, the library's own limit),
- the JSON is UTF-8, an object of {name: {dtype, shape, data_offsets}} (plus a `__metadata__` of strings),
- every dtype is known, every shape a list of non-negative integers,
- every `data_offsets` [begin, end] lies inside the data section, and end - begin is exactly
  prod(shape) x the dtype's size,
- the tensors do not overlap.

Torch-free: it is plain `struct` and `json`, so callers on either side of the import rules can use it.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

from cura.errors import CuraError

# safetensors dtype -> bytes per element
DTYPE_SIZES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "U16": 2,
    "U32": 4,
    "U64": 8,
    "BOOL": 1,
}
MAX_HEADER_BYTES = 100_000_000  # the safetensors library refuses larger headers too


def _damaged(file: Path, what: str) -> CuraError:
    return CuraError(f"{file} is not a valid safetensors file ({what}): re-download or re-save it")


def read_safetensors_header(file: str | Path) -> tuple[dict[str, dict], int]:
    """({tensor name: {dtype, shape, data_offsets}}, start of the data section) for a checked file.

    Raises CuraError for a missing, unreadable, truncated or inconsistent file (see the module docstring)."""
    file = Path(file)
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise _damaged(file, f"{size} bytes, shorter than the 8-byte header length")
            (length,) = struct.unpack("<Q", raw)
            if length > size - 8 or length > MAX_HEADER_BYTES:
                raise _damaged(file, f"its header claims {length:,} bytes but the file has {size:,}")
            text = f.read(length)
    except OSError as exc:
        raise CuraError(
            f"cannot read {file} ({exc.strerror or exc}): check the path and permissions"
        ) from None
    try:
        header = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _damaged(file, f"its header is not JSON: {type(exc).__name__}") from None
    if not isinstance(header, dict):
        raise _damaged(file, "its header is not a JSON object")
    start = 8 + length
    _check_entries(file, header, size - start)
    return {k: v for k, v in header.items() if k != "__metadata__"}, start


def _check_entries(file: Path, header: dict, data_bytes: int) -> None:
    """Every entry's dtype, shape and byte range against the data section (`data_bytes` long)."""
    meta = header.get("__metadata__")
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise _damaged(file, "its __metadata__ is not a mapping of strings")
    ranges = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise _damaged(file, f"tensor '{name}' has no dtype/shape/data_offsets")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in DTYPE_SIZES:
            raise _damaged(file, f"tensor '{name}' has dtype {dtype!r}, which cura cannot read")
        if not isinstance(shape, list) or not all(_natural(d) for d in shape):
            raise _damaged(file, f"tensor '{name}' has shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_natural(o) for o in offsets)):
            raise _damaged(file, f"tensor '{name}' has data_offsets {offsets!r}")
        begin, end = offsets
        if not begin <= end <= data_bytes:
            raise _damaged(
                file,
                f"tensor '{name}' spans bytes {begin:,}..{end:,} of a {data_bytes:,}-byte data section; "
                "the file is truncated",
            )
        if end - begin != math.prod(shape) * DTYPE_SIZES[dtype]:
            raise _damaged(
                file,
                f"tensor '{name}' of shape {tuple(shape)} {dtype} does not fill its {end - begin:,} bytes",
            )
        ranges.append((begin, end, name))
    ranges.sort()
    for (_, end, name), (begin, _, other) in zip(ranges, ranges[1:]):
        if begin < end:
            raise _damaged(file, f"tensors '{name}' and '{other}' overlap")


def _natural(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_safetensors(file: str | Path) -> Path:
    """`file` when its header is consistent with its size (see the module docstring), else CuraError."""
    read_safetensors_header(file)
    return Path(file)


def load_safetensors(file: str | Path) -> dict:
    """`safetensors.torch.load_file` after `check_safetensors`: a damaged file is one sentence, not a
    `SafetensorError` or `MemoryError`."""
    from safetensors.torch import load_file

    check_safetensors(file)
    try:
        return load_file(str(file))
    except Exception as exc:  # the library found something the header check does not cover
        raise _damaged(Path(file), f"{type(exc).__name__}: {exc}") from None
