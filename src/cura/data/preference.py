"""Preference data: pairs (DPO, ORPO) and labelled answers (KTO) -> validated rows -> tokens -> batches.

| shape           | columns                                                                          |
|-----------------|----------------------------------------------------------------------------------|
| prompt_pairs    | prompt (text or [{role, content}]), chosen, rejected (text or [{role: assistant}]) |
| message_pairs   | chosen, rejected: [{role, content}] sharing every turn but the last (UltraFeedback) |
| sharegpt_pairs  | conversations: [{from, value}] ending with a human turn; chosen, rejected: {from: gpt, value} |
| hh_pairs        | chosen, rejected: "\\n\\nHuman: ... \\n\\nAssistant: ..." transcripts (Anthropic HH); prompt = the common turns |
| kto_messages    | messages: [{role, content}] ending with the assistant's answer; label: true / false |
| kto_completion  | prompt, completion, label                                                        |

Every row becomes `{"prompt": messages ending with a user turn, "chosen", "rejected"}` or `{"prompt",
"completion", "label"}`; a bad row is reported as `file:line: what is wrong (how to fix)`, all of them at once.

Tokens. The conversation `prompt + [assistant: answer]` is rendered with the model's chat template and cut
where the answer starts (`cura.data.template.trained_spans`, the same rule as SFT): the prompt text, the
answer (content plus the end-of-turn marker: the scored tokens) and what the template puts after it
(unscored) are tokenized piece by piece, so chosen and rejected share the very same prompt tokens.

Batches are padded (right), never packed: a pair batch holds the B chosen sequences then the B rejected
ones (`2B` rows, one forward); a KTO batch holds the B answers and, under `kl_*` keys, the B mismatched
sequences (prompt i with the answer of its KL partner) that estimate the KL term. As in TRL, the partner of
a row is fixed when the data is built: the previous row of its group of `batch_size` rows in file order
(the first takes the last), so a precomputed reference covers it too.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from cura.constants import IGNORE_INDEX
from cura.data.config import DataConfig
from cura.data.formats import ROLE_ALIASES, RowError, map_fields
from cura.data.packing import Batches, epoch_order
from cura.data.readers import BadRecord, read_records
from cura.data.template import effective_chat_template, trained_spans
from cura.errors import CuraError

Messages = list[dict[str, str]]
PAIR_SHAPES = ("prompt_pairs", "message_pairs", "sharegpt_pairs", "hh_pairs")
KTO_SHAPES = ("kto_messages", "kto_completion")
HH_HUMAN, HH_ASSISTANT = "\n\nHuman:", "\n\nAssistant:"


# ------------------------------------------------------------------------------------- rows


def detect_shape(record: dict, paired: bool) -> str | None:
    """The preference shape a record's columns say (`paired`: pairs for DPO/ORPO, else KTO rows), or None."""
    if not paired:
        if "label" not in record:
            return None
        if "messages" in record:
            return "kto_messages"
        return "kto_completion" if "prompt" in record and "completion" in record else None
    if "chosen" not in record or "rejected" not in record:
        return None
    if "conversations" in record:
        return "sharegpt_pairs"
    if "prompt" in record:
        return "prompt_pairs"
    chosen = record["chosen"]
    if isinstance(chosen, list):
        return "message_pairs"
    if isinstance(chosen, str) and HH_ASSISTANT in chosen:
        return "hh_pairs"
    return None


def _text(value, column: str) -> str:
    if not isinstance(value, str):
        raise RowError(f"{column!r} is {type(value).__name__ if value is not None else 'missing'}, not text")
    if not value.strip():
        raise RowError(f"{column!r} is empty (fill it or remove the row)")
    return value


def _turns(items, key_role: str, key_text: str, column: str) -> Messages:
    """[{role, content}] from a list of turn objects, roles normalised (user/human, assistant/gpt, system)."""
    if not isinstance(items, list) or not items:
        raise RowError(f"{column!r} is not a non-empty list of turns")
    out = []
    for i, item in enumerate(items, 1):
        if not isinstance(item, dict) or key_role not in item or key_text not in item:
            raise RowError(f"{column}[{i}] needs {key_role!r} and {key_text!r} keys")
        role = ROLE_ALIASES.get(str(item[key_role]).lower())
        if role is None:
            raise RowError(
                f"{column}[{i}] has unknown role {item[key_role]!r} (use system, user or assistant)"
            )
        out.append({"role": role, "content": _text(item[key_text], f"{column}[{i}] content")})
    return out


def _check_prompt(messages: Messages, column: str) -> Messages:
    """An optional system turn, then user/assistant alternating, ending with the user turn answered."""
    body = messages[1:] if messages and messages[0]["role"] == "system" else messages
    for i, message in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise RowError(
                f"{column}: turn {i + 1 + len(messages) - len(body)} is {message['role']!r} where "
                f"{expected!r} was expected (turns alternate user/assistant, the prompt ends with a user turn)"
            )
    if not body or body[-1]["role"] != "user":
        raise RowError(f"{column} does not end with a user turn (the prompt is what the answers reply to)")
    return messages


def _answer(value, column: str) -> str:
    """An answer given as text, as one {role: assistant, ...} / {from: gpt, ...} turn, or a list of one."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, dict):
        key_role, key_text = ("role", "content") if "role" in value else ("from", "value")
        turn = _turns([value], key_role, key_text, column)[0]
        if turn["role"] != "assistant":
            raise RowError(f"{column!r} is a {turn['role']!r} turn; it must be the assistant's answer")
        return turn["content"]
    if isinstance(value, list):
        raise RowError(f"{column!r} holds {len(value)} turns; give the one assistant answer")
    return _text(value, column)


def _prompt(value, system) -> Messages:
    if isinstance(value, list):
        key_role, key_text = ("from", "value") if value and "from" in value[0] else ("role", "content")
        messages = _turns(value, key_role, key_text, "prompt")
    else:
        messages = [{"role": "user", "content": _text(value, "prompt")}]
    if isinstance(system, str) and system.strip() and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}, *messages]
    return _check_prompt(messages, "prompt")


def from_prompt_pairs(record: dict) -> dict:
    return {
        "prompt": _prompt(record["prompt"], record.get("system")),
        "chosen": _answer(record["chosen"], "chosen"),
        "rejected": _answer(record["rejected"], "rejected"),
    }


def from_message_pairs(record: dict) -> dict:
    """chosen/rejected conversations: the prompt is their common turns, each must add one assistant turn."""
    chosen = _turns(record["chosen"], "role", "content", "chosen")
    rejected = _turns(record["rejected"], "role", "content", "rejected")
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    if len(chosen) != n + 1 or len(rejected) != n + 1:
        raise RowError(
            "'chosen' and 'rejected' must be the same conversation up to their last (assistant) turn; "
            f"they differ at turn {n + 1}"
        )
    for column, turns in (("chosen", chosen), ("rejected", rejected)):
        if turns[-1]["role"] != "assistant":
            raise RowError(
                f"the last turn of {column!r} is {turns[-1]['role']!r}, not the assistant's answer"
            )
    return {
        "prompt": _check_prompt(chosen[:n], "the common turns of chosen/rejected"),
        "chosen": chosen[-1]["content"],
        "rejected": rejected[-1]["content"],
    }


def from_sharegpt_pairs(record: dict) -> dict:
    prompt = _check_prompt(_turns(record["conversations"], "from", "value", "conversations"), "conversations")
    return {
        "prompt": prompt,
        "chosen": _answer(record["chosen"], "chosen"),
        "rejected": _answer(record["rejected"], "rejected"),
    }


def parse_hh(text: str, column: str) -> Messages:
    """ "\\n\\nHuman: a\\n\\nAssistant: b ..." -> [{role, content}], ending with the assistant's answer."""
    text = _text(text, column)
    body = text if text.startswith("\n\n") else "\n\n" + text.lstrip("\n")
    if not body.startswith(HH_HUMAN):
        raise RowError(f"{column!r} does not start with '\\n\\nHuman:' (an Anthropic HH transcript)")
    messages, cursor, role = [], len(HH_HUMAN), "user"
    while True:
        nxt = HH_ASSISTANT if role == "user" else HH_HUMAN
        end = body.find(nxt, cursor)
        content = body[cursor : end if end >= 0 else len(body)].strip()
        messages.append({"role": role, "content": content})
        if end < 0:
            break
        cursor, role = end + len(nxt), "assistant" if role == "user" else "user"
    if messages[-1]["role"] != "assistant" or len(messages) < 2:
        raise RowError(f"{column!r} does not end with an '\\n\\nAssistant:' answer")
    if any(not m["content"] for m in messages):
        raise RowError(f"{column!r} has an empty turn (fill it or remove the row)")
    return messages


def from_hh_pairs(record: dict) -> dict:
    chosen, rejected = parse_hh(record["chosen"], "chosen"), parse_hh(record["rejected"], "rejected")
    if chosen[:-1] != rejected[:-1]:
        raise RowError("'chosen' and 'rejected' differ before their last '\\n\\nAssistant:' turn")
    return {"prompt": chosen[:-1], "chosen": chosen[-1]["content"], "rejected": rejected[-1]["content"]}


def _label(value) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    raise RowError(f"'label' is {value!r}; use true (a desirable answer) or false (an undesirable one)")


def from_kto_messages(record: dict) -> dict:
    messages = _turns(record["messages"], "role", "content", "messages")
    if messages[-1]["role"] != "assistant":
        raise RowError("'messages' does not end with the assistant's answer (the turn the label judges)")
    return {
        "prompt": _check_prompt(messages[:-1], "messages"),
        "completion": messages[-1]["content"],
        "label": _label(record["label"]),
    }


def from_kto_completion(record: dict) -> dict:
    return {
        "prompt": _prompt(record["prompt"], record.get("system")),
        "completion": _answer(record["completion"], "completion"),
        "label": _label(record["label"]),
    }


SHAPES = {
    "prompt_pairs": from_prompt_pairs,
    "message_pairs": from_message_pairs,
    "sharegpt_pairs": from_sharegpt_pairs,
    "hh_pairs": from_hh_pairs,
    "kto_messages": from_kto_messages,
    "kto_completion": from_kto_completion,
}


def normalize_preference(
    record, paired: bool, fields: dict[str, str], system_prompt: str | None, wanted=None
):
    """`(shape, row)` for one record; RowError with what is wrong and how to fix it."""
    if not isinstance(record, dict):
        raise RowError(f"the row is {type(record).__name__}, not an object with named fields")
    record = map_fields(record, fields)
    shape = detect_shape(record, paired)
    if shape is None:
        wanted_cols = (
            "prompt/chosen/rejected, chosen/rejected conversations, conversations+chosen+rejected or HH texts"
            if paired
            else "messages+label or prompt/completion/label"
        )
        raise RowError(f"columns {sorted(record)[:8]} are not preference data ({wanted_cols})")
    if wanted is not None and shape != wanted:
        raise RowError(f"the row is {shape} but the file's first row is {wanted}; use one shape per file")
    row = SHAPES[shape](record)
    if system_prompt and row["prompt"][0]["role"] != "system":
        row["prompt"] = [{"role": "system", "content": system_prompt}, *row["prompt"]]
    return shape, row


def read_preference_rows(
    path, paired: bool, fields=None, *, system_prompt=None, max_errors: int = 20
) -> list[dict]:
    """Every row checked, bad ones reported together as one CuraError with `file:line` each."""
    rows, errors, bad = [], [], 0
    file_shape: dict[str, str] = {}
    for where, record in read_records(path):
        file = where.rsplit(":", 1)[0]
        try:
            if isinstance(record, BadRecord):
                raise RowError(record.message)
            shape, row = normalize_preference(
                record, paired, fields or {}, system_prompt, file_shape.get(file)
            )
            file_shape.setdefault(file, shape)
        except RowError as exc:
            bad += 1
            if len(errors) < max_errors:
                errors.append(f"{where}: {exc}")
            continue
        row.update(shape=shape, source=where)
        rows.append(row)
    if bad:
        more = f" (the first {len(errors)} shown)" if bad > len(errors) else ""
        raise CuraError(
            f"{bad} bad preference row{'s' if bad > 1 else ''} in {path}{more}; fix them and run again:\n"
            + "\n".join(errors)
        )
    if not rows:
        raise CuraError(f"{path} holds no rows; add preference examples to it")
    return rows


# ----------------------------------------------------------------------------------- tokens


def encode_answer(tokenizer, template: str, prompt: Messages, answer: str):
    """`(prompt_ids, completion_ids, completion_labels)`: the answer's tokens scored, the template's tail not."""
    messages = [*prompt, {"role": "assistant", "content": answer}]
    full, spans = trained_spans(tokenizer, messages, template)
    start, end = spans[-1]

    def tok(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    prompt_ids, scored, tail = tok(full[:start]), tok(full[start:end]), tok(full[end:])
    return prompt_ids, scored + tail, scored + [IGNORE_INDEX] * len(tail)


def fit(prompt_ids: list[int], ids: list[int], labels: list[int], config: DataConfig, where: str):
    """(ids, labels) cut so that prompt + answer fit max_length, or (None, reason) for a drop."""
    if len(prompt_ids) + len(ids) <= config.max_length:
        return ids, labels
    if config.overlong == "error":
        raise CuraError(
            f"{where}: the row is {len(prompt_ids) + len(ids)} tokens, over data.max_length "
            f"{config.max_length}; raise max_length or set data.overlong to truncate or drop"
        )
    if config.overlong == "drop":
        return None, "longer than max_length"
    room = config.max_length - len(prompt_ids)
    ids, labels = ids[: max(room, 0)], labels[: max(room, 0)]
    if not any(t != IGNORE_INDEX for t in labels):
        return None, "prompt fills max_length"
    return ids, labels


def encode_preference_row(tokenizer, template: str, row: dict, config: DataConfig):
    """One sample (see the module docstring), or (None, reason)."""
    answers = ("chosen", "rejected") if "chosen" in row else ("completion",)
    sample: dict = {}
    for name in answers:
        prompt_ids, ids, labels = encode_answer(tokenizer, template, row["prompt"], row[name])
        if "prompt_ids" in sample and sample["prompt_ids"] != prompt_ids:
            raise CuraError(
                f"{row['source']}: the chat template renders the prompt differently before the chosen and the "
                "rejected answer; use a template whose prompt does not depend on the answer"
            )
        ids, labels = fit(prompt_ids, ids, labels, config, row["source"])
        if ids is None:
            return None, labels
        sample.update({"prompt_ids": prompt_ids, f"{name}_ids": ids, f"{name}_labels": labels})
    if "label" in row:
        sample["label"] = row["label"]
    return sample, "ok"


def assign_kl_partners(samples: list[dict], batch_size: int) -> None:
    """KTO: the KL partner of each sample, the previous one of its group of `batch_size` (TRL's rotation)."""
    for start in range(0, len(samples), batch_size):
        group = list(range(start, min(start + batch_size, len(samples))))
        for k, i in enumerate(group):
            samples[i]["kl_partner"] = group[k - 1]


class PreferenceDataset(Sequence):
    """Encoded pairs or KTO rows (dicts of token lists, see the module docstring)."""

    def __init__(self, samples: list[dict]):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index):
        return self.samples[index]

    @property
    def paired(self) -> bool:
        return bool(self.samples) and "chosen_ids" in self.samples[0]

    @property
    def total_tokens(self) -> int:
        keys = ("chosen_ids", "rejected_ids") if self.paired else ("completion_ids",)
        return sum(len(s["prompt_ids"]) * len(keys) + sum(len(s[k]) for k in keys) for s in self.samples)

    @property
    def trained_tokens(self) -> int:
        keys = ("chosen_labels", "rejected_labels") if self.paired else ("completion_labels",)
        return sum(sum(t != IGNORE_INDEX for k in keys for t in s[k]) for s in self.samples)


@dataclass
class PreferenceReport:
    """What the pipeline did with preference data (the counterpart of `DataReport`)."""

    format: str
    rows_read: int
    train_samples: int
    eval_samples: int
    dropped: dict[str, int]
    template_is_fallback: bool
    train_tokens: int
    trained_tokens: int
    max_length: int
    truncated: int = 0
    lengths: list[int] = field(default_factory=list, repr=False)
    template: str = field(default="", repr=False)

    def __str__(self) -> str:
        template = (
            "fallback ChatML (the tokenizer has none)" if self.template_is_fallback else "the model's own"
        )
        kind = "pairs" if "pairs" in self.format else "labelled answers"
        dropped = ", ".join(f"{n} {why}" for why, n in self.dropped.items()) or "none"
        return (
            f"data: {self.rows_read} rows ({self.format}), {self.train_samples} train / {self.eval_samples} "
            f"eval {kind}; chat template: {template}\n"
            f"data: {self.train_tokens} train tokens, {self.trained_tokens} scored (answer) tokens; "
            f"max_length {self.max_length}: dropped: {dropped}"
        )


def encode_preference_rows(
    tokenizer, template, rows, config: DataConfig, tally: Counter
) -> PreferenceDataset:
    samples = []
    for row in rows:
        sample, status = encode_preference_row(tokenizer, template, row, config)
        if sample is None:
            tally[status] += 1
        else:
            samples.append(sample)
    return PreferenceDataset(samples)


def build_preference_datasets(config: DataConfig, tokenizer, *, paired: bool, batch_size: int):
    """`(train, eval or None, PreferenceReport)`: the counterpart of `cura.data.build_datasets`."""
    from cura.data.dataset import split_rows

    if config.path is None:
        raise CuraError("data.path is not set; point it at a file of preference pairs (or KTO rows)")
    if not paired and batch_size < 2:
        raise CuraError(
            "config key 'batch_size' must be at least 2 for kto: its KL term is estimated from the other "
            "answers of the batch (TRL refuses 1 too)"
        )
    template, is_fallback = effective_chat_template(tokenizer)
    options = dict(fields=config.fields, system_prompt=config.system_prompt, max_errors=config.max_errors)
    rows = read_preference_rows(config.path, paired, **options)
    if config.eval_path is not None:
        train_rows, eval_rows = rows, read_preference_rows(config.eval_path, paired, **options)
    else:
        train_rows, eval_rows = split_rows(rows, config.eval_split, config.seed)
    tally: Counter = Counter()
    train = encode_preference_rows(tokenizer, template, train_rows, config, tally)
    evaluation = encode_preference_rows(tokenizer, template, eval_rows, config, tally) if eval_rows else None
    if not len(train):
        raise CuraError(
            f"no training example is left from {config.path} ({dict(tally)}); raise data.max_length"
        )
    if not paired:
        for dataset in (train, evaluation):
            if dataset is not None:
                assign_kl_partners(dataset.samples, batch_size)
    report = PreferenceReport(
        format="+".join(Counter(r["shape"] for r in rows)),
        rows_read=len(rows) + (len(eval_rows) if config.eval_path is not None else 0),
        train_samples=len(train),
        eval_samples=len(evaluation) if evaluation is not None else 0,
        dropped=dict(tally),
        template_is_fallback=is_fallback,
        train_tokens=train.total_tokens,
        trained_tokens=train.trained_tokens,
        max_length=config.max_length,
        template=template,
    )
    return train, evaluation, report


# ---------------------------------------------------------------------------------- batches


def _padded(sequences: list[tuple[list[int], list[int], list[int]]], pad: int) -> dict[str, torch.Tensor]:
    """(prompt_ids, ids, labels) triples -> right-padded input_ids, labels (prompt -100), masks, positions."""
    T = max(len(p) + len(i) for p, i, _ in sequences)
    S = len(sequences)
    input_ids = torch.full((S, T), pad, dtype=torch.long)
    labels = torch.full((S, T), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((S, T), dtype=torch.long)
    for s, (prompt, ids, lab) in enumerate(sequences):
        n = len(prompt) + len(ids)
        input_ids[s, :n] = torch.tensor(prompt + ids)
        labels[s, len(prompt) : n] = torch.tensor(lab, dtype=torch.long)
        attention[s, :n] = 1
    positions = torch.arange(T).expand(S, T).clone()
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention, "position_ids": positions}


def preference_batch(samples: Sequence[dict], indices: list[int], max_length: int, pad: int) -> dict:
    """One batch of pairs (2B rows: chosen then rejected) or KTO rows (B rows, KL rows under `kl_*`)."""
    chosen = [samples[i] for i in indices]
    if "chosen_ids" in chosen[0]:
        seqs = [(s["prompt_ids"], s["chosen_ids"], s["chosen_labels"]) for s in chosen]
        seqs += [(s["prompt_ids"], s["rejected_ids"], s["rejected_labels"]) for s in chosen]
        batch = _padded(seqs, pad)
        if all("ref_chosen_logp" in s for s in chosen):
            ref = [s["ref_chosen_logp"] for s in chosen] + [s["ref_rejected_logp"] for s in chosen]
            batch["ref_logps"] = torch.tensor(ref, dtype=torch.float64)
        return batch
    batch = _padded([(s["prompt_ids"], s["completion_ids"], s["completion_labels"]) for s in chosen], pad)
    kl = []
    for s in chosen:
        partner = samples[s["kl_partner"]]
        room = max_length - len(s["prompt_ids"])
        ids, labels = partner["completion_ids"][:room], partner["completion_labels"][:room]
        kl.append((s["prompt_ids"], ids, labels))
    batch.update({f"kl_{k}": v for k, v in _padded(kl, pad).items()})
    batch["kto_label"] = torch.tensor([bool(s["label"]) for s in chosen])
    if all("ref_logp" in s for s in chosen):
        batch["ref_logps"] = torch.tensor([s["ref_logp"] for s in chosen], dtype=torch.float64)
        batch["ref_kl_logps"] = torch.tensor([s["ref_kl_logp"] for s in chosen], dtype=torch.float64)
    return batch


def preference_batches(
    dataset: Sequence[dict],
    *,
    batch_size: int,
    max_length: int,
    seed: int,
    epoch: int,
    pad_token_id,
    shuffle=True,
) -> Batches:
    """The batches of one epoch in the order fixed by (seed, epoch) (file order with `shuffle=False`). KTO
    batches are the fixed groups of `batch_size` rows its KL partners come from, in a shuffled order."""
    if batch_size < 1:
        raise CuraError(f"batch_size {batch_size} must be >= 1")
    pad = 0 if pad_token_id is None else int(pad_token_id)
    kto = len(dataset) > 0 and "chosen_ids" not in dataset[0]
    if kto or not shuffle:  # KTO: the fixed groups its KL partners were drawn from (TRL: sequential)
        order = list(range(len(dataset)))
    else:
        order = epoch_order(len(dataset), seed, epoch)
    groups = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if shuffle:
        random.Random(seed * 1_000_003 + epoch + 2).shuffle(groups)
    return Batches(dataset, groups, preference_batch, max_length, pad)
