"""Mean loss and perplexity over the answer tokens of a data set.

    mean_loss = sum_i sum_{t: label_it != -100} -log p(label_it | tokens_<t) / #{answer tokens}
    perplexity = exp(mean_loss)

Token-weighted (every answer token counts once, whatever sample it is in), with the usual causal shift:
the logit at position t predicts the label at t+1. Samples are `{"input_ids", "labels"}` dicts, as
`cura.data.build_datasets(..., packing=False)` makes them, or as `encode_rows` makes them from rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE = -100


@dataclass(frozen=True)
class LossResult:
    """Token-weighted mean cross-entropy over answer tokens, its exp, and how many tokens it covers."""

    loss: float
    perplexity: float
    tokens: int


def encode_rows(tokenizer, rows, *, max_length: int = 1024) -> list[dict[str, list[int]]]:
    """Tokenize (prompt, first reference) pairs with the chat template, labels on the answer tokens only.

    The prompt is rendered with the assistant turn opened; the full conversation (prompt + answer turn)
    must start with it, and the tokens after it (the answer and the end-of-turn marker) are the labels.
    Rows without a reference are skipped. Sequences longer than `max_length` keep their first tokens.
    """
    samples = []
    for row in rows:
        if not row.references:
            continue
        prompt_text = tokenizer.apply_chat_template(row.prompt, tokenize=False, add_generation_prompt=True)
        full = row.prompt + [{"role": "assistant", "content": row.references[0]}]
        full_text = tokenizer.apply_chat_template(full, tokenize=False)
        if not full_text.startswith(prompt_text):  # a template that rewrites earlier turns: answer text only
            full_text = prompt_text + row.references[0]
        prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(full_text[len(prompt_text) :], add_special_tokens=False)["input_ids"]
        input_ids = (prompt_ids + answer_ids)[:max_length]
        labels = ([IGNORE] * len(prompt_ids) + answer_ids)[:max_length]
        samples.append({"input_ids": input_ids, "labels": labels})
    return samples


def _pad(seqs: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    return torch.tensor([list(s) + [value] * (width - len(s)) for s in seqs], dtype=torch.long)


@torch.no_grad()
def answer_loss(model, samples: Sequence[dict], *, batch_size: int = 8, pad_token_id: int = 0) -> LossResult:
    """Token-weighted mean cross-entropy over labels != -100 (right padding, padded positions ignored)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for start in range(0, len(samples), batch_size):
            chunk = samples[start : start + batch_size]
            input_ids = _pad([s["input_ids"] for s in chunk], pad_token_id).to(device)  # (B, T)
            labels = _pad([s["labels"] for s in chunk], IGNORE).to(device)  # (B, T)
            mask = _pad([[1] * len(s["input_ids"]) for s in chunk], 0).to(device)
            logits = model(input_ids=input_ids, attention_mask=mask).logits.float()  # (B, T, V)
            shifted = labels[:, 1:]
            nll = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]),
                shifted.reshape(-1),
                ignore_index=IGNORE,
                reduction="sum",
            )
            total += float(nll)
            count += int((shifted != IGNORE).sum())
    finally:
        model.train(was_training)
    if count == 0:
        return LossResult(float("nan"), float("nan"), 0)
    mean = total / count
    return LossResult(mean, math.exp(mean), count)
