"""Mean loss and perplexity over the answer tokens of a data set: the training loop's loss, reused.

    mean_loss = sum_i sum_{t: label_it != -100} -log p(label_it | tokens_<t) / #{answer tokens}
    perplexity = exp(mean_loss)

Token-weighted (every answer token counts once, whatever sample it is in), with the usual causal shift:
the logit at position t predicts the label at t+1. The cross-entropy is `cura.train.steps.loss_sum` and the
samples are tokenized by `cura.data` (`encode_row`, the chat template, answer masks, `overlong`), so
`cura eval`'s loss on some rows is the held-out loss `cura train` reports on the same rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cura.constants import DEFAULT_LOSS_CHUNK_TOKENS, IGNORE_INDEX


@dataclass(frozen=True)
class LossResult:
    """Token-weighted mean cross-entropy over answer tokens, its exp, and how many tokens it covers."""

    loss: float
    perplexity: float
    tokens: int


def encode_rows(tokenizer, rows, config=None) -> list[dict[str, list[int]]]:
    """Tokenize each row's conversation exactly as training does (`cura.data.dataset.encode_rows`).

    `config` is a `cura.data.DataConfig` (its `max_length`, `overlong` and `train_on_prompt` apply; default:
    training's defaults). Rows without a reference (no conversation to score) are skipped, and so are rows
    training would drop (no trained token left, or `overlong: drop`).
    """
    from collections import Counter

    from cura.data import DataConfig
    from cura.data.dataset import encode_rows as encode_data_rows
    from cura.data.template import effective_chat_template

    template, _ = effective_chat_template(tokenizer)
    data_rows = [r for r in (row.loss_row() for row in rows) if r is not None]
    tally = {"lengths": [], "dropped": Counter(), "truncated": 0}
    return list(encode_data_rows(tokenizer, data_rows, config or DataConfig(), template, tally))


def _pad(seqs: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    return torch.tensor([list(s) + [value] * (width - len(s)) for s in seqs], dtype=torch.long)


def padded_batch(samples: Sequence[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids` / `attention_mask` / `labels` (IGNORE_INDEX on the padding), (B, T) each."""
    return {
        "input_ids": _pad([s["input_ids"] for s in samples], pad_token_id),
        "attention_mask": _pad([[1] * len(s["input_ids"]) for s in samples], 0),
        "labels": _pad([s["labels"] for s in samples], IGNORE_INDEX),
    }


@torch.no_grad()
def answer_loss(
    model,
    samples: Sequence[dict],
    *,
    batch_size: int = 8,
    pad_token_id: int = 0,
    chunk_tokens: int = DEFAULT_LOSS_CHUNK_TOKENS,
) -> LossResult:
    """Token-weighted mean cross-entropy over labels != -100 (right padding, padded positions ignored)."""
    from cura.train.steps import loss_sum

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for start in range(0, len(samples), batch_size):
            batch = padded_batch(samples[start : start + batch_size], pad_token_id)
            s, n = loss_sum(model, {k: v.to(device) for k, v in batch.items()}, chunk_tokens)
            total += float(s)
            count += n
    finally:
        model.train(was_training)
    if count == 0:
        return LossResult(float("nan"), float("nan"), 0)
    mean = total / count
    return LossResult(mean, math.exp(mean), count)
