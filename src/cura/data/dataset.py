"""From data files to tokenized samples: read, validate every row, split, encode, apply `overlong`.

rows = read_rows(path)                 # records -> chat messages (or text), every row checked first
train, eval = split(rows)              # eval_path, or eval_split (fraction or count, seeded)
sample = encode(row)                   # {"input_ids", "labels"} with -100 outside the answers
overlong -> truncate (oldest turns first, then the answer) | drop | error; all counted in the report
"""

from __future__ import annotations

import random
import statistics
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from cura.constants import IGNORE_INDEX
from cura.data.config import DataConfig
from cura.data.formats import RowError, normalize
from cura.data.readers import BadRecord, read_records
from cura.data.template import effective_chat_template, encode_messages, encode_text
from cura.errors import CuraError

Sample = dict[str, list[int]]


def read_rows(
    path,
    format: str = "auto",
    fields: dict[str, str] | None = None,
    *,
    system_prompt: str | None = None,
    max_errors: int = 20,
) -> Iterator[dict]:
    """Rows normalized to `{"messages": [{role, content}], "format", "source"}` (text rows: also `"text"`).

    Every row is checked before any is yielded: bad rows are reported together (up to `max_errors`) as one
    CuraError, one line per row `file:line: what is wrong (how to fix)`. With `format="auto"` the format is
    detected per file from its first row, and later rows of the file must match it.
    """
    rows, errors, bad = [], [], 0
    file_format: dict[str, str] = {}
    for where, record in read_records(path):
        file = where.rsplit(":", 1)[0]
        try:
            if isinstance(record, BadRecord):
                raise RowError(record.message)
            wanted = file_format.get(file, format)
            kind, result = normalize(record, wanted, fields or {}, system_prompt)
            file_format.setdefault(file, kind)
        except RowError as exc:
            bad += 1
            if len(errors) < max_errors:
                errors.append(f"{where}: {exc}")
            continue
        if isinstance(result, str):
            rows.append({"messages": [{"role": "assistant", "content": result}], "text": result})
        else:
            rows.append({"messages": result})
        rows[-1].update(format=kind, source=where)
    if bad:
        more = f" (the first {len(errors)} shown)" if bad > len(errors) else ""
        raise CuraError(
            f"{bad} bad row{'s' if bad > 1 else ''} in {path}{more}; fix them and run again:\n"
            + "\n".join(errors)
        )
    if not rows:
        raise CuraError(f"{path} holds no rows; add training examples to it")
    return iter(rows)


class TokenizedDataset(Sequence):
    """Samples `{"input_ids": list[int], "labels": list[int]}` (labels -100 where not trained)."""

    def __init__(self, samples: list[Sample]):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index):
        return self.samples[index]

    @property
    def total_tokens(self) -> int:
        return sum(len(s["input_ids"]) for s in self.samples)

    @property
    def trained_tokens(self) -> int:
        return sum(sum(1 for t in s["labels"] if t != IGNORE_INDEX) for s in self.samples)


@dataclass
class DataReport:
    """What the pipeline did with the data: counts, the template, every truncation or drop."""

    format: str
    rows_read: int
    rows_used: int
    train_samples: int
    eval_samples: int
    truncated: int
    dropped: dict[str, int]
    template_is_fallback: bool
    train_tokens: int
    trained_tokens: int
    max_length: int
    lengths: list[int] = field(default_factory=list, repr=False)  # token length of each row before cuts
    template: str = field(default="", repr=False)  # the chat template used (see template_is_fallback)

    def __str__(self) -> str:
        template = (
            "fallback ChatML (the tokenizer has none)" if self.template_is_fallback else "the model's own"
        )
        dropped = ", ".join(f"{n} {why}" for why, n in self.dropped.items()) or "none"
        lines = [
            f"data: {self.rows_read} rows ({self.format}), {self.train_samples} train / "
            f"{self.eval_samples} eval samples; chat template: {template}",
            f"data: {self.train_tokens} train tokens, {self.trained_tokens} trained (answer) tokens; "
            f"max_length {self.max_length}: {self.truncated} truncated, dropped: {dropped}",
        ]
        return "\n".join(lines)


def split_rows(rows: list[dict], eval_split: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Hold out a seeded random subset: a fraction (0 < x < 1, rounded; none for a file too small to spare
    a row) or a count (>= 1) of the rows."""
    if eval_split <= 0:
        return rows, []
    count = int(eval_split) if eval_split >= 1 else round(len(rows) * eval_split)
    if count == 0:
        return rows, []
    if count >= len(rows):
        raise CuraError(
            f"data.eval_split {eval_split} holds out {count} of {len(rows)} rows, leaving none to train on; "
            "lower it"
        )
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    held = set(order[:count])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def encode_row(tokenizer, template: str, row: dict, config: DataConfig) -> tuple[Sample | None, str, int]:
    """`(sample or None, status, full_length)`; status "ok", "truncated" or the reason for a drop."""
    if "text" in row:
        ids, labels = encode_text(tokenizer, row["text"])
    else:
        ids, labels = encode_messages(
            tokenizer, row["messages"], template, train_on_prompt=config.train_on_prompt
        )
    full_length, status = len(ids), "ok"
    if len(ids) > config.max_length:
        if config.overlong == "error":
            raise CuraError(
                f"{row['source']}: the row is {len(ids)} tokens, over data.max_length {config.max_length}; "
                "raise max_length or set data.overlong to truncate or drop"
            )
        if config.overlong == "drop":
            return None, "longer than max_length", full_length
        messages = row["messages"]
        while len(ids) > config.max_length and "text" not in row and _assistant_turns(messages) > 1:
            messages = _drop_oldest_exchange(messages)
            ids, labels = encode_messages(
                tokenizer, messages, template, train_on_prompt=config.train_on_prompt
            )
        ids, labels = ids[: config.max_length], labels[: config.max_length]
        status = "truncated"
    if all(t == IGNORE_INDEX for t in labels[1:]):
        reason = "prompt fills max_length" if status == "truncated" else "no trained tokens"
        return None, reason, full_length
    return {"input_ids": ids, "labels": labels}, status, full_length


def _assistant_turns(messages: list[dict]) -> int:
    return sum(m["role"] == "assistant" for m in messages)


def _drop_oldest_exchange(messages: list[dict]) -> list[dict]:
    """The conversation without its first user turn and first assistant answer (a system turn stays)."""
    head = messages[:1] if messages[0]["role"] == "system" else []
    body = messages[len(head) :]
    first_answer = next(i for i, m in enumerate(body) if m["role"] == "assistant")
    return head + body[first_answer + 1 :]


def encode_rows(tokenizer, rows: list[dict], config: DataConfig, template: str, tally: dict):
    samples = []
    for row in rows:
        try:
            sample, status, length = encode_row(tokenizer, template, row, config)
        except CuraError as exc:
            if str(exc).startswith(row["source"]):
                raise
            raise CuraError(f"{row['source']}: {exc}") from exc
        tally["lengths"].append(length)
        if sample is None:
            tally["dropped"][status] += 1
            continue
        tally["truncated"] += status == "truncated"
        samples.append(sample)
    return TokenizedDataset(samples)


def build_datasets(config: DataConfig, tokenizer):
    """`(train, eval or None, DataReport)` from `config.path` (and `config.eval_path` or `eval_split`)."""
    if config.path is None:
        raise CuraError("data.path is not set; point it at a .jsonl, .json, .csv, .parquet file or a folder")
    template, is_fallback = effective_chat_template(tokenizer)
    options = dict(fields=config.fields, system_prompt=config.system_prompt, max_errors=config.max_errors)
    rows = list(read_rows(config.path, config.format, **options))
    if config.eval_path is not None:
        train_rows, eval_rows = rows, list(read_rows(config.eval_path, config.format, **options))
    else:
        train_rows, eval_rows = split_rows(rows, config.eval_split, config.seed)
    tally = {"lengths": [], "dropped": Counter(), "truncated": 0}
    train = encode_rows(tokenizer, train_rows, config, template, tally)
    evaluation = encode_rows(tokenizer, eval_rows, config, template, tally) if eval_rows else None
    if not len(train):
        raise CuraError(
            f"no training sample is left from {config.path} ({dict(tally['dropped'])}); "
            "raise data.max_length or check the rows"
        )
    formats = Counter(r["format"] for r in rows)
    report = DataReport(
        format="+".join(formats),
        rows_read=len(rows) + (len(eval_rows) if config.eval_path is not None else 0),
        rows_used=len(train) + (len(evaluation) if evaluation is not None else 0),
        train_samples=len(train),
        eval_samples=len(evaluation) if evaluation is not None else 0,
        truncated=tally["truncated"],
        dropped=dict(tally["dropped"]),
        template_is_fallback=is_fallback,
        train_tokens=train.total_tokens,
        trained_tokens=train.trained_tokens,
        max_length=config.max_length,
        lengths=tally["lengths"],
        template=template,
    )
    return train, evaluation, report


def length_stats(lengths: list[int]) -> dict[str, int]:
    """min / median / p95 / max of token lengths."""
    ordered = sorted(lengths)
    p95 = ordered[min(len(ordered) - 1, int(0.95 * (len(ordered) - 1) + 0.5))]
    return {"min": ordered[0], "median": int(statistics.median(ordered)), "p95": p95, "max": ordered[-1]}
