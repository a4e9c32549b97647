"""Evaluation rows: a prompt (chat messages) and one or more reference answers, read from data files.

Rows are read by `cura.data` (its readers, format detection and normalization: `cura.data.read_rows`), so
a file means the same to `cura eval` as to `cura train`: prompt = every turn but the final assistant turn,
reference = that turn, and the loss is scored on the conversation as training tokenizes it
(`EvalRow.data_row`, see `cura.evaluate.loss.encode_rows`). On top of that, for generation metrics:

- explicit columns: `fields={"prompt": "dialogue", "reference": "summary1,summary2,summary3"}` (a comma list
  of reference columns gives several references per sample; a comma list of prompt columns is joined with
  blank lines; `system` names a system-prompt column); the loss is scored on the first reference;
- line-aligned plain text files: `read_text_pairs(src, refs)` (e.g. WMT sources and references).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cura.data.readers import SUFFIXES, BadRecord, read_records
from cura.errors import CuraError

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class EvalRow:
    """One evaluation sample: the chat messages up to the answer, and the reference answers (may be empty)."""

    prompt: Messages
    references: tuple[str, ...] = field(default_factory=tuple)
    data_row: dict[str, Any] | None = field(default=None, compare=False, repr=False)
    """The row as `cura.data.read_rows` gives it (`messages`, `source`, maybe `text`): what the loss scores."""

    def loss_row(self) -> dict[str, Any] | None:
        """The conversation the loss scores (`data_row`, else the prompt answered by the first reference);
        None for a row without a reference."""
        if self.data_row is not None:
            return self.data_row
        if not self.references:
            return None
        return _conversation(self.prompt, self.references[0], "an evaluation row")


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
    return _row(messages, tuple(r for r in refs if r.strip()), where)


def _conversation(prompt: Messages, answer: str, where: str) -> dict[str, Any]:
    return {"messages": [*prompt, {"role": "assistant", "content": answer}], "source": where}


def _row(prompt: Messages, references: tuple[str, ...], where: str) -> EvalRow:
    """A row whose loss is scored on the prompt followed by the first reference as the answer."""
    return EvalRow(prompt, references, _conversation(prompt, references[0], where) if references else None)


def _rows_via_data_pipeline(
    path: Path, format: str, fields: Mapping[str, str], system_prompt: str | None
) -> list[EvalRow]:
    """Rows normalized by cura.data, split into prompt and reference there."""
    from cura.data import read_rows, split_prompt_reference

    rows = []
    for row in read_rows(path, format=format, fields=dict(fields) or None, system_prompt=system_prompt):
        prompt, reference = split_prompt_reference(row["messages"])
        rows.append(EvalRow(list(prompt), (reference,) if reference else (), row))
    return rows


def _rows_from_columns(path: Path, fields: Mapping[str, str], system_prompt: str | None) -> list[EvalRow]:
    """Rows from explicitly named prompt / reference / system columns (records read by cura.data)."""
    prompt_cols = fields.get("prompt", "prompt").split(",")
    ref_cols = fields["reference"].split(",") if "reference" in fields else []
    rows = []
    for where, record in read_records(path):
        if isinstance(record, BadRecord):
            raise CuraError(f"{where}: {record.message}")
        if not isinstance(record, Mapping):
            raise CuraError(f"{where}: expected a JSON object per row; fix the row")
        system = record.get(fields["system"]) if "system" in fields else system_prompt
        rows.append(row_from_columns(record, prompt_cols, ref_cols, where, system))
    if not rows:
        raise CuraError(f"{path} holds no rows; add evaluation examples to it")
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
    if references is not None or (path.is_file() and path.suffix.lower() not in SUFFIXES):
        if references is None:
            raise CuraError(
                f"{path} is a plain text file; pass its line-aligned references with --references"
            )
        return read_text_pairs(path, references, system_prompt=system_prompt, instruction=instruction)
    if "prompt" in fields or "reference" in fields:
        return _rows_from_columns(path, fields, system_prompt)
    return _rows_via_data_pipeline(path, format, fields, system_prompt)


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
    for line, (s, r) in enumerate(zip(src, ref, strict=True), 1):
        text = f"{instruction}\n\n{s}" if instruction else s
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
            {"role": "user", "content": text}
        ]
        rows.append(_row(messages, (r,) if r.strip() else (), f"{src_path}:{line}"))
    return rows
