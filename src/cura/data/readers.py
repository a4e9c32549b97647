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
from cura.inputs import (
    MAX_DEPTH,
    MAX_ROW_CHARS,
    check_depth,
    decode_error,
    depth,
    encoding_hint,
    json_value_error,
    read_text,
)

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


def binary_lines(file: Path) -> Iterator[tuple[int, bytes]]:
    """(line number, raw line) of a file read in binary, so a bad byte is located on its own line."""
    try:
        with open(file, "rb") as handle:
            yield from enumerate(handle, 1)
    except OSError as exc:
        raise CuraError(f"cannot read {file} ({exc.strerror or exc}); check its permissions") from None


def decoded_line(file: Path, number: int, raw: bytes) -> str | BadRecord:
    """One line as text, or a BadRecord naming the byte that is not UTF-8 and how to convert the file."""
    if number == 1 and raw[:2] in (b"\xff\xfe", b"\xfe\xff"):  # every row would fail: say it once
        raise CuraError(f"{file}: not UTF-8 text; {encoding_hint(raw)}")
    try:
        return raw.decode("utf-8-sig" if number == 1 else "utf-8")
    except UnicodeDecodeError as exc:
        return BadRecord(decode_error(f"line {number}", raw, exc).partition(": ")[2])


def read_jsonl(file: Path) -> Iterator[Item]:
    """One JSON object per line; a line that is not UTF-8, not JSON, too long or too deep is a BadRecord
    (reported with the others, the rest are still read)."""
    for number, raw in binary_lines(file):
        if not raw.strip():
            continue
        where = f"{file}:{number}"
        if len(raw) > MAX_ROW_CHARS:
            yield where, BadRecord(f"a row of {len(raw):,} bytes, over the limit of {MAX_ROW_CHARS:,}")
            continue
        line = decoded_line(file, number, raw)
        if isinstance(line, BadRecord):
            yield where, line
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            yield where, BadRecord(f"invalid JSON ({exc.msg} at column {exc.colno}; one object per line)")
            continue
        except RecursionError:
            yield where, BadRecord(f"nested more than {MAX_DEPTH} levels deep; flatten the row")
            continue
        except ValueError as exc:
            yield where, BadRecord(json_value_error(exc))
            continue
        if depth(record) > MAX_DEPTH:
            yield where, BadRecord(f"nested more than {MAX_DEPTH} levels deep; flatten the row")
            continue
        yield where, record


def read_json(file: Path) -> Iterator[Item]:
    """A JSON array (each element located by its line), an object holding one list of records, or JSON
    Lines under a `.json` name (as `datasets.Dataset.to_json` writes them)."""
    text = read_text(file, what="data file")
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
    except RecursionError:
        raise CuraError(f"{file}: nested more than {MAX_DEPTH} levels deep; flatten the rows") from None
    except ValueError as exc:
        raise CuraError(f"{file}: {json_value_error(exc)}") from None
    check_depth(data, str(file), MAX_DEPTH + 2)  # the list of rows and its object count as two levels
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
        except RecursionError:
            raise CuraError(f"{file}:{line}: nested more than {MAX_DEPTH} levels deep; flatten it") from None
        except ValueError as exc:
            raise CuraError(f"{file}:{line}: {json_value_error(exc)}") from None
        check_depth(record, f"{file}:{line}")
        yield f"{file}:{line}", record


def csv_lines(file: Path) -> Iterator[str]:
    """The lines of a CSV file as text, decoded one by one so that a byte that is not UTF-8 is reported
    at its line (a text-mode file decodes 8 KB at a time and reports no line)."""
    for number, raw in binary_lines(file):
        line = decoded_line(file, number, raw)
        if isinstance(line, BadRecord):
            raise CuraError(f"{file}:{number}: {line.message}")
        yield line


def read_csv(file: Path) -> Iterator[Item]:
    """Rows of a CSV file with a header line; fields up to MAX_ROW_CHARS characters (the csv module's
    default limit is 131,072, below a long document)."""
    if csv.field_size_limit() < MAX_ROW_CHARS:
        csv.field_size_limit(MAX_ROW_CHARS)
    reader = csv.DictReader(csv_lines(file))
    try:
        if reader.fieldnames is None:  # reading the header here makes line_num count it
            return
        line = reader.line_num
        for record in reader:
            yield f"{file}:{line + 1}", {k: v for k, v in record.items() if k is not None}
            line = reader.line_num
    except csv.Error as exc:
        raise CuraError(
            f"{file}:{reader.line_num}: not readable as CSV ({exc}); fix the quoting of this row"
        ) from None


def _arrow_error(file: Path, kind: str, exc: Exception) -> CuraError:
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return CuraError(
        f"{file} is not a readable {kind} file ({reason}); re-export it, or give the data as .jsonl"
    )


def read_parquet(file: Path) -> Iterator[Item]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(file)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise _arrow_error(file, "Parquet", exc) from None
    row = 0
    for group in range(parquet.num_row_groups):
        try:
            records = parquet.read_row_group(group).to_pylist()
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise _arrow_error(file, "Parquet", exc) from None
        for record in records:
            row += 1
            yield f"{file}:row {row}", record


def read_arrow(file: Path) -> Iterator[Item]:
    """An Arrow IPC stream file, as `datasets.save_to_disk` writes them (falls back to the file format)."""
    import pyarrow as pa

    row = 0
    try:
        batches = _arrow_batches(file)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise _arrow_error(file, "Arrow", exc) from None
    for batch in batches:
        for record in batch.to_pylist():
            row += 1
            yield f"{file}:row {row}", record


def _arrow_batches(file: Path) -> list:
    import pyarrow as pa

    try:
        with pa.memory_map(str(file)) as source:
            return list(pa.ipc.open_stream(source))
    except pa.ArrowInvalid:
        with pa.memory_map(str(file)) as source:
            reader = pa.ipc.open_file(source)
            return [reader.get_batch(i) for i in range(reader.num_record_batches)]


READERS = {
    ".jsonl": read_jsonl,
    ".json": read_json,
    ".csv": read_csv,
    ".parquet": read_parquet,
    ".arrow": read_arrow,
}
