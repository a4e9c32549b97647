"""Read tensors one at a time from a safetensors checkpoint (one file or shards with an index).

Nothing is read until `get(key)` asks for it, so a loader can quantize each weight as it arrives and never
hold the full-precision model in memory.

Note (why not `safe_open`): safetensors maps the file and hands out tensors that view the mapping; every
page touched stays resident in the process (RSS) until the mapping goes away, so quantizing all weights of
a model through `safe_open` shows the whole float32 file in RSS even though only the 4-bit copy is kept.
Here each tensor is read with one positional read into its own buffer, which is freed as soon as the
loader drops it. The file layout (https://github.com/huggingface/safetensors#format):

    [u64 little-endian N][N bytes JSON header: {key: {dtype, shape, data_offsets: [begin, end]}, ...}][data]

with offsets relative to the start of the data section.
"""

from __future__ import annotations

import json
import struct
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch

from cura.errors import CuraError
from cura.models.sources import INDEX_FILE, SINGLE_FILE

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: file, absolute byte range, dtype and shape."""

    file: Path
    begin: int
    end: int
    dtype: str
    shape: tuple[int, ...]


def read_header(file: Path) -> dict[str, TensorEntry]:
    """{key: TensorEntry} from a safetensors file's header (reads only the header)."""
    with open(file, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CuraError(
                f"{file} is not a safetensors file (shorter than its header): re-download or re-save it"
            )
        (size,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(f.read(size))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CuraError(
                f"{file} has a damaged safetensors header ({e}): re-download or re-save it"
            ) from e
    start = 8 + size
    return {
        key: TensorEntry(
            file,
            start + info["data_offsets"][0],
            start + info["data_offsets"][1],
            info["dtype"],
            tuple(info["shape"]),
        )
        for key, info in header.items()
        if key != "__metadata__"
    }


def checkpoint_entries(folder: Path) -> dict[str, TensorEntry]:
    """All tensors of `model.safetensors` or of the shards named in `model.safetensors.index.json`."""
    index = folder / INDEX_FILE
    if not index.is_file():
        return read_header(folder / SINGLE_FILE)
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError) as e:
        raise CuraError(f"{index} is not a safetensors index (no 'weight_map'): re-save the model") from e
    entries = {}
    for name in sorted(set(weight_map.values())):
        shard = folder / name
        if not shard.is_file():
            raise CuraError(f"{index} names shard {name}, which is missing: copy every shard into {folder}")
        entries.update(read_header(shard))
    return entries


class CheckpointReader:
    """Lazy tensor access over all files of a checkpoint; use as a context manager."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.entries = checkpoint_entries(self.folder)
        self._stack = ExitStack()
        self._files: dict[Path, object] = {}
        self._scratch = torch.empty(0, dtype=torch.uint8)

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()
        self._files.clear()
        self._scratch = torch.empty(0, dtype=torch.uint8)

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def keys(self) -> list[str]:
        return list(self.entries)

    def get(self, key: str, *, scratch: bool = False) -> torch.Tensor:
        """The tensor `key`, read into fresh CPU memory; with `scratch=True` into one buffer reused by every
        scratch read (valid until the next one: for weights that are quantized and dropped at once, so
        the allocator does not see a large free after every layer)."""
        entry = self.entries[key]
        if entry.dtype not in DTYPES:
            raise CuraError(f"tensor '{key}' in {entry.file} has dtype {entry.dtype}, which cura cannot read")
        if entry.file not in self._files:
            self._files[entry.file] = self._stack.enter_context(open(entry.file, "rb"))
        f = self._files[entry.file]
        size = entry.end - entry.begin
        if scratch:
            if self._scratch.numel() < size:
                self._scratch = torch.empty(size, dtype=torch.uint8)
            buffer = self._scratch[:size]
        else:
            buffer = torch.empty(size, dtype=torch.uint8)
        f.seek(entry.begin)
        if buffer.numel() and f.readinto(buffer.numpy()) != buffer.numel():
            raise CuraError(
                f"{entry.file} ends inside tensor '{key}' (truncated file): re-download or re-save it"
            )
        return buffer.view(DTYPES[entry.dtype]).reshape(entry.shape)
