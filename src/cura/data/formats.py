"""Formats: each record becomes chat messages `[{"role", "content"}]` (or plain text), or a `RowError`.

| format            | columns                                              |
|-------------------|------------------------------------------------------|
| alpaca            | instruction, input (optional), output, system (opt.) |
| messages          | messages: [{role, content}]                          |
| sharegpt          | conversations: [{from: human/gpt/system, value}]     |
| prompt_completion | prompt, completion (or input/output, question/answer)|
| guanaco           | input = "### Human: ... ### Assistant: ...", output  |
| text              | text (language modelling on the whole text)          |

`fields` maps a canonical column to the file's own column (e.g. `{"prompt": "dialogue"}`) before all this.
"""

from __future__ import annotations

import re
from collections.abc import Callable

Messages = list[dict[str, str]]

ROLE_ALIASES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
}
GUANACO_TURN = re.compile(r"###\s*(Human|Assistant)\s*:", re.IGNORECASE)


class RowError(ValueError):
    """What is wrong with one row and how to fix it (the caller adds file:line)."""


def map_fields(record: dict, fields: dict[str, str]) -> dict:
    """`record` with each canonical column filled from the file column `fields` names."""
    if not fields:
        return record
    out = dict(record)
    for canonical, column in fields.items():
        if column not in record:
            raise RowError(f"no column {column!r} (mapped to {canonical!r}); fix data.fields or the row")
        out[canonical] = record[column]
    return out


def detect_format(record: dict) -> str | None:
    """The format a record's columns say, or None."""
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    if "input" in record and "output" in record:
        text = record["input"]
        return "guanaco" if isinstance(text, str) and GUANACO_TURN.search(text) else "prompt_completion"
    if "question" in record and "answer" in record:
        return "prompt_completion"
    if "text" in record:
        return "text"
    return None


def text_field(record: dict, key: str, *, optional: bool = False) -> str:
    value = record.get(key)
    if value is None and optional:
        return ""
    if value is None:
        raise RowError(f"missing field {key!r} (add it, or map a column to it with data.fields)")
    if not isinstance(value, str):
        raise RowError(f"field {key!r} is {type(value).__name__}, not text (make it a string)")
    if not value.strip() and not optional:
        raise RowError(f"field {key!r} is empty (fill it or remove the row)")
    return value


def check_order(messages: Messages) -> Messages:
    """Optional system first, then user/assistant alternating, ending with an assistant turn."""
    if not messages:
        raise RowError("the conversation is empty (add user and assistant turns)")
    body = messages[1:] if messages[0]["role"] == "system" else messages
    for i, message in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise RowError(
                f"turn {i + 1 + len(messages) - len(body)} is {message['role']!r} where {expected!r} was "
                "expected (turns must alternate user/assistant after an optional system turn)"
            )
    if not body or body[-1]["role"] != "assistant":
        raise RowError("the conversation does not end with an assistant turn (add the answer to train on)")
    return messages


def turns(items, key_role: str, key_text: str, column: str) -> Messages:
    if not isinstance(items, list):
        raise RowError(f"{column!r} is {type(items).__name__}, not a list of turns")
    messages = []
    for i, item in enumerate(items, 1):
        if not isinstance(item, dict) or key_role not in item or key_text not in item:
            raise RowError(f"{column}[{i}] needs {key_role!r} and {key_text!r} keys")
        role = ROLE_ALIASES.get(str(item[key_role]).lower())
        if role is None:
            raise RowError(
                f"{column}[{i}] has unknown role {item[key_role]!r} (use system, user/human or assistant/gpt)"
            )
        content = item[key_text]
        if not isinstance(content, str):
            raise RowError(f"{column}[{i}] content is {type(content).__name__}, not text (make it a string)")
        if not content.strip():
            raise RowError(f"{column}[{i}] content is empty (fill it or remove the turn)")
        messages.append({"role": role, "content": content})
    return check_order(messages)


def from_alpaca(record: dict) -> Messages:
    instruction = text_field(record, "instruction")
    extra = text_field(record, "input", optional=True)
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    system = text_field(record, "system", optional=True)
    head = [{"role": "system", "content": system}] if system.strip() else []
    return head + [
        {"role": "user", "content": prompt},
        {"role": "assistant", "content": text_field(record, "output")},
    ]


def from_messages(record: dict) -> Messages:
    return turns(record["messages"] if "messages" in record else None, "role", "content", "messages")


def from_sharegpt(record: dict) -> Messages:
    items = record.get("conversations")
    return turns(items, "from", "value", "conversations")


def from_prompt_completion(record: dict) -> Messages:
    pairs = (("prompt", "completion"), ("input", "output"), ("question", "answer"))
    prompt_key, answer_key = next((p for p in pairs if p[0] in record), pairs[0])
    return [
        {"role": "user", "content": text_field(record, prompt_key)},
        {"role": "assistant", "content": text_field(record, answer_key)},
    ]


def from_guanaco(record: dict) -> Messages:
    """Split `### Human: ... ### Assistant: ...` turns of `input`; `output` is the last assistant turn."""
    text = text_field(record, "input")
    output = text_field(record, "output")
    marks = list(GUANACO_TURN.finditer(text))
    if not marks:
        raise RowError("'input' has no '### Human:' turn (use format prompt_completion for plain prompts)")
    messages = []
    for mark, following in zip(marks, marks[1:] + [None]):
        content = text[mark.end() : following.start() if following else len(text)].strip()
        role = "user" if mark.group(1).lower() == "human" else "assistant"
        if content:
            messages.append({"role": role, "content": content})
        elif following is not None:
            raise RowError(f"an empty '### {mark.group(1)}:' turn in 'input' (fill it or remove it)")
    messages.append({"role": "assistant", "content": output.strip()})
    return check_order(messages)


def from_text(record: dict) -> str:
    return text_field(record, "text")


NORMALIZERS: dict[str, Callable[[dict], Messages | str]] = {
    "alpaca": from_alpaca,
    "messages": from_messages,
    "sharegpt": from_sharegpt,
    "prompt_completion": from_prompt_completion,
    "guanaco": from_guanaco,
    "text": from_text,
}


def normalize(record, format: str, fields: dict[str, str], system_prompt: str | None = None):
    """`(format, messages or text)` for one record; raises RowError with what is wrong and how to fix it."""
    if not isinstance(record, dict):
        raise RowError(f"the row is {type(record).__name__}, not an object with named fields")
    record = map_fields(record, fields)
    if format == "auto":
        format = detect_format(record)
        if format is None:
            raise RowError(
                f"unknown format: columns {sorted(record)[:8]} match none of alpaca, messages, sharegpt, "
                "prompt/completion, text (set data.format and data.fields)"
            )
    result = NORMALIZERS[format](record)
    if system_prompt and not isinstance(result, str) and result[0]["role"] != "system":
        result = [{"role": "system", "content": system_prompt}] + result
    return format, result
