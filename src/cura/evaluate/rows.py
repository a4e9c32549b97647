"""Evaluation rows: a prompt (chat messages) and one or more reference answers, read from data files.

Where the row shape is known to the data pipeline (`cura.data.read_rows`), its normalization is used:
prompt = every turn but the final assistant turn, reference = the final assistant turn. On top of that:

- explicit columns: `fields={"prompt": "dialogue", "reference": "summary1,summary2,summary3"}` (a comma list
  of reference columns gives several references per sample; a comma list of prompt columns is joined with
  blank lines; `system` names a system-prompt column);
- line-aligned plain text files: `read_text_pairs(src, refs)` (e.g. WMT sources and references).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cura.errors import CuraError

Messages = list[dict[str, str]]

# (prompt columns, reference columns) tried in order when no fields are given and cura.data is absent
_AUTO_COLUMNS = (
    (("instruction", "input"), ("output",)),
    (("prompt",), ("completion",)),
    (("question",), ("answer",)),
    (("dialogue",), ("summary1", "summary2", "summary3")),
    (("dialogue",), ("summary",)),
    (("input",), ("output",)),
    (("source",), ("target",)),
)


@dataclass(frozen=True)
class EvalRow:
    """One evaluation sample: the chat messages up to the answer, and the reference answers (may be empty)."""

    prompt: Messages
    references: tuple[str, ...] = field(default_factory=tuple)


def parse_fields(items: Sequence[str]) -> dict[str, str]:
    """`["prompt=dialogue", "reference=summary1,summary2"]` -> a dict; a missing '=' is a user error."""
    fields: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise CuraError(
                f"--field {item!r} is not KEY=COLUMN; write e.g. --field reference=summary1,summary2"
            )
        fields[key.strip()] = value.strip()
    return fields


def read_records(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line or index, record) pairs from a .jsonl, .json (array) or .csv file."""
    if not path.is_file():
        raise CuraError(f"data file {path} does not exist; pass an existing file with --data")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _json_lines(path, path.read_text(encoding="utf-8").splitlines())
    if suffix == ".json":
        text = path.read_text(encoding="utf-8")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            if exc.msg == "Extra data":  # JSON lines under a .json name (e.g. QLoRA's MMLU file)
                return _json_lines(path, text.splitlines())
            raise CuraError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg}); fix the file") from None
        if not isinstance(data, list):
            raise CuraError(f"{path}: expected a JSON array of records; wrap the rows in [ ... ]")
        return list(enumerate(data, 1))
    if suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as fh:
            return [(i, dict(r)) for i, r in enumerate(csv.DictReader(fh), 2)]
    raise CuraError(
        f"{path}: unsupported file type '{suffix}' for evaluation; use .jsonl, .json, .csv or text"
    )


def _json_lines(path: Path, lines: list[str]) -> list[tuple[int, Any]]:
    records = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append((lineno, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise CuraError(f"{path}:{lineno}: not valid JSON ({exc.msg}); fix or remove the line") from None
    return records


def _text(record: Mapping[str, Any], column: str, where: str) -> str | list[str]:
    if column not in record:
        raise CuraError(f"{where}: no column '{column}' (columns: {', '.join(record)}); fix --field")
    value = record[column]
    if isinstance(value, list):
        return [str(v) for v in value]
    return "" if value is None else str(value)


def row_from_columns(
    record: Mapping[str, Any],
    prompt_cols: Sequence[str],
    ref_cols: Sequence[str],
    where: str,
    system: str | None,
) -> EvalRow:
    """Build one row from named columns (prompt columns joined by blank lines, each reference column one ref)."""
    parts = [_text(record, c, where) for c in prompt_cols]
    prompt_text = "\n\n".join(p for p in parts if isinstance(p, str) and p.strip())
    if not prompt_text:
        raise CuraError(f"{where}: the prompt ({', '.join(prompt_cols)}) is empty; fill it or drop the row")
    refs: list[str] = []
    for col in ref_cols:
        value = _text(record, col, where)
        refs.extend(value if isinstance(value, list) else [value])
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt_text}
    ]
    return EvalRow(messages, tuple(r for r in refs if r.strip()))


def row_from_messages(messages: Messages, where: str) -> EvalRow:
    """prompt = all turns before the final assistant turn; reference = that turn (none if it is absent)."""
    if not messages:
        raise CuraError(f"{where}: the conversation is empty; drop the row")
    if messages[-1].get("role") == "assistant":
        return EvalRow(list(messages[:-1]), (messages[-1].get("content", ""),))
    return EvalRow(list(messages), ())


def _auto_columns(record: Mapping[str, Any]) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    for prompt_cols, ref_cols in _AUTO_COLUMNS:
        if prompt_cols[0] in record and ref_cols[0] in record:
            return (
                tuple(c for c in prompt_cols if c in record),
                tuple(c for c in ref_cols if c in record),
            )
    return None


def _chat_messages(record: Mapping[str, Any]) -> Messages | None:
    """OpenAI `messages` or ShareGPT `conversations` as role/content dicts, else None."""
    if isinstance(record.get("messages"), list):
        return [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
    if isinstance(record.get("conversations"), list):
        roles = {
            "human": "user",
            "user": "user",
            "gpt": "assistant",
            "assistant": "assistant",
            "system": "system",
        }
        return [
            {"role": roles.get(m.get("from"), "user"), "content": m.get("value", "")}
            for m in record["conversations"]
        ]
    return None


def _rows_via_data_pipeline(path: Path, format: str, fields: Mapping[str, str]) -> list[EvalRow]:
    """Rows normalized by cura.data (prompt/reference split there)."""
    from cura.data import read_rows, split_prompt_reference

    rows = []
    for row in read_rows(path, format=format, fields=dict(fields) or None):
        messages = row["messages"] if isinstance(row, Mapping) else row
        prompt, reference = split_prompt_reference(messages)
        rows.append(EvalRow(list(prompt), (reference,) if reference else ()))
    return rows


def read_eval_rows(
    path: str | Path,
    *,
    format: str = "auto",
    fields: Mapping[str, str] | None = None,
    references: str | Path | None = None,
    system_prompt: str | None = None,
    instruction: str | None = None,
) -> list[EvalRow]:
    """Evaluation rows from a data file (see the module docstring for the column rules).

    `references` names a line-aligned text file of references when `path` is a plain text file of prompts
    (then `instruction`, if given, is put before each prompt).
    """
    path = Path(path)
    fields = dict(fields or {})
    if references is not None or path.suffix.lower() not in (".jsonl", ".json", ".csv", ".parquet"):
        if references is None:
            raise CuraError(
                f"{path} is a plain text file; pass its line-aligned references with --references"
            )
        return read_text_pairs(path, references, system_prompt=system_prompt, instruction=instruction)
    explicit = "prompt" in fields or "reference" in fields
    if not explicit:
        return _with_system(_rows_via_data_pipeline(path, format, fields), system_prompt)
    records = read_records(path)
    rows = []
    for lineno, record in records:
        where = f"{path}:{lineno}"
        if not isinstance(record, Mapping):
            raise CuraError(f"{where}: expected a JSON object per row; fix the row")
        if explicit:
            prompt_cols = fields.get("prompt", "prompt").split(",")
            ref_cols = fields["reference"].split(",") if "reference" in fields else []
            system = record.get(fields["system"]) if "system" in fields else system_prompt
            rows.append(row_from_columns(record, prompt_cols, ref_cols, where, system))
            continue
        messages = _chat_messages(record)
        if messages is not None:
            rows.append(_with_system([row_from_messages(messages, where)], system_prompt)[0])
            continue
        columns = _auto_columns(record)
        if columns is None:
            raise CuraError(
                f"{where}: cannot tell the prompt and reference columns apart ({', '.join(record)}); "
                "name them with --field prompt=COLUMN --field reference=COLUMN"
            )
        rows.append(row_from_columns(record, *columns, where, system_prompt))
    return rows


def _with_system(rows: list[EvalRow], system_prompt: str | None) -> list[EvalRow]:
    if not system_prompt:
        return rows
    return [
        r
        if r.prompt and r.prompt[0]["role"] == "system"
        else EvalRow([{"role": "system", "content": system_prompt}, *r.prompt], r.references)
        for r in rows
    ]


def read_text_pairs(
    sources: str | Path,
    references: str | Path,
    *,
    system_prompt: str | None = None,
    instruction: str | None = None,
) -> list[EvalRow]:
    """Rows from line-aligned plain text files: line i of `sources` is the prompt, line i of `references`
    its reference (WMT's layout). `instruction`, if given, is put before each source with a blank line."""
    src_path, ref_path = Path(sources), Path(references)
    for p in (src_path, ref_path):
        if not p.is_file():
            raise CuraError(f"text file {p} does not exist; pass existing files with --data and --references")
    src = src_path.read_text(encoding="utf-8").splitlines()
    ref = ref_path.read_text(encoding="utf-8").splitlines()
    if len(src) != len(ref):
        raise CuraError(
            f"{src_path} has {len(src)} lines but {ref_path} has {len(ref)}; the files must be line-aligned"
        )
    rows = []
    for s, r in zip(src, ref, strict=True):
        text = f"{instruction}\n\n{s}" if instruction else s
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
            {"role": "user", "content": text}
        ]
        rows.append(EvalRow(messages, (r,) if r.strip() else ()))
    return rows
