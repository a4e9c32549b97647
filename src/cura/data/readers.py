"""Readers: every file kind becomes a stream of `(location, record | error)` pairs.

`location` is what a person needs to find the row: `file:line` for JSON Lines, JSON arrays and CSV,
`file:row N` for Parquet and Arrow. Large files are streamed where the format allows it (JSON Lines line by
line, Parquet by row group, Arrow by record batch).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

from cura.errors import CuraError

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".arrow")


class BadRecord:
    """A row that could not be read at all (e.g. invalid JSON); reported with the others."""

    def __init__(self, message: str):
        self.message = message


Item = tuple[str, "dict | BadRecord"]


def data_files(path: str | Path) -> list[Path]:
    """The data files at `path`: the file itself, or the data files of a folder (sorted, recursive)."""
    path = Path(path)
    if not path.exists():
        raise CuraError(f"the data path {path} does not exist; check data.path (or the FILE argument)")
    if path.is_file():
        return [path]
    if (path / "dataset_info.json").exists() or (path / "state.json").exists():
        files = sorted(path.glob("*.arrow"))  # a `datasets.save_to_disk` folder
    else:
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
        if not files:
            files = sorted(path.rglob("*.arrow"))
    if not files:
        raise CuraError(
            f"the folder {path} holds no data files; put .jsonl, .json, .csv or .parquet files in it"
        )
    return files


def read_records(path: str | Path) -> Iterator[Item]:
    """Every record of every data file at `path`, with its location."""
    for file in data_files(path):
        reader = READERS.get(file.suffix.lower())
        if reader is None:
            raise CuraError(
                f"{file}: cannot read {file.suffix or 'files without a suffix'}; "
                "use .jsonl, .json, .csv, .parquet or a datasets.save_to_disk folder"
            )
        yield from reader(file)


def read_jsonl(file: Path) -> Iterator[Item]:
    with open(file, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            where = f"{file}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                yield where, BadRecord(f"invalid JSON ({exc.msg} at column {exc.colno}; one object per line)")
                continue
            yield where, record


def read_json(file: Path) -> Iterator[Item]:
    """A JSON array (each element located by its line), an object holding one list of records, or JSON
    Lines under a `.json` name (as `datasets.Dataset.to_json` writes them)."""
    text = file.read_text(encoding="utf-8")
    decoder = json.JSONDecoder()
    start = len(text) - len(text.lstrip())
    if text[start : start + 1] == "[":
        yield from _json_array_items(file, text, start + 1, decoder)
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data" and text[start : start + 1] == "{":
            yield from read_jsonl(file)
            return
        raise CuraError(
            f"{file}:{exc.lineno}: invalid JSON ({exc.msg}); fix the file or use JSON Lines"
        ) from None
    if isinstance(data, dict):
        lists = [k for k, v in data.items() if isinstance(v, list)]
        if len(lists) == 1:
            for i, record in enumerate(data[lists[0]]):
                yield f"{file}:{lists[0]}[{i}]", record
            return
        if not lists and data:
            yield f"{file}:1", data
            return
    raise CuraError(
        f"{file}: expected a JSON array of rows or an object with one list of rows; reshape the file"
    )


def _json_array_items(file: Path, text: str, index: int, decoder: json.JSONDecoder) -> Iterator[Item]:
    line, counted = 1, 0
    while True:
        while index < len(text) and text[index] in " \t\r\n,":
            index += 1
        if index >= len(text):
            raise CuraError(f"{file}: the JSON array is not closed with ']'; fix the end of the file")
        if text[index] == "]":
            return
        line += text.count("\n", counted, index)
        counted = index
        try:
            record, index = decoder.raw_decode(text, index)
        except json.JSONDecodeError as exc:
            raise CuraError(
                f"{file}:{exc.lineno}: invalid JSON ({exc.msg}); fix this element (JSON Lines lets one "
                "bad row be skipped)"
            ) from None
        yield f"{file}:{line}", record


def read_csv(file: Path) -> Iterator[Item]:
    with open(file, encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None:  # reading the header here makes line_num count it
            return
        line = reader.line_num
        for record in reader:
            yield f"{file}:{line + 1}", {k: v for k, v in record.items() if k is not None}
            line = reader.line_num


def read_parquet(file: Path) -> Iterator[Item]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(file)
    row = 0
    for group in range(parquet.num_row_groups):
        for record in parquet.read_row_group(group).to_pylist():
            row += 1
            yield f"{file}:row {row}", record


def read_arrow(file: Path) -> Iterator[Item]:
    """An Arrow IPC stream file, as `datasets.save_to_disk` writes them (falls back to the file format)."""
    import pyarrow as pa

    row = 0
    try:
        with pa.memory_map(str(file)) as source:
            batches = list(pa.ipc.open_stream(source))
    except pa.ArrowInvalid:
        with pa.memory_map(str(file)) as source:
            reader = pa.ipc.open_file(source)
            batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
    for batch in batches:
        for record in batch.to_pylist():
            row += 1
            yield f"{file}:row {row}", record


READERS = {
    ".jsonl": read_jsonl,
    ".json": read_json,
    ".csv": read_csv,
    ".parquet": read_parquet,
    ".arrow": read_arrow,
}
