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

import os
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch

from cura.errors import CuraError
from cura.inputs import read_json_file
from cura.models.sources import INDEX_FILE, SINGLE_FILE
from cura.safetensors_check import read_safetensors_header

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
    """{key: TensorEntry} from a safetensors file's header (reads only the header, checked against the file's
    size by `cura.safetensors_check`, so a damaged file is one sentence before any tensor is read)."""
    header, start = read_safetensors_header(file)
    return {
        key: TensorEntry(
            file,
            start + info["data_offsets"][0],
            start + info["data_offsets"][1],
            info["dtype"],
            tuple(info["shape"]),
        )
        for key, info in header.items()
    }


def shard_path(folder: Path, name, index: Path) -> Path:
    """The shard `name` of an index, refused unless its name stays inside `folder` (an index naming
    `../../etc/passwd` or an absolute path must not make cura open that file).

    Note (names, not resolved paths): the check is on the name as written, with `..` folded; a shard that
    is a symlink is followed, because the Hugging Face cache stores every file of a snapshot as a symlink
    into its blobs folder, outside the snapshot."""
    if not isinstance(name, str) or not name.strip():
        raise CuraError(f"{index} names a shard {name!r}, which is not a file name: re-save the model")
    base = Path(os.path.normpath(os.path.abspath(folder)))
    shard = Path(os.path.normpath(base / name))
    if shard == base or not shard.is_relative_to(base):
        raise CuraError(
            f"{index} names shard {name!r}, which lies outside the model folder {folder}: cura reads only "
            "shards inside it; fix the index or re-save the model"
        )
    return shard


def checkpoint_entries(folder: Path) -> dict[str, TensorEntry]:
    """All tensors of `model.safetensors` or of the shards named in `model.safetensors.index.json`."""
    index = folder / INDEX_FILE
    if not index.is_file():
        return read_header(folder / SINGLE_FILE)
    weight_map = read_json_file(index, "re-save the model").get("weight_map")
    if not isinstance(weight_map, dict):
        raise CuraError(f"{index} is not a safetensors index (no 'weight_map' mapping): re-save the model")
    entries = {}
    shards = {shard_path(folder, name, index): name for name in weight_map.values()}
    for shard, name in sorted(shards.items()):
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
