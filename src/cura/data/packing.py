"""Batches: packed (several samples per row, attention kept inside each) or length-bucketed with padding.

Packing. A row of length T holds samples s_1..s_k back to back (padded at the end). For a causal LM with
the loss taken as `logits[:, :-1]` against `labels[:, 1:]`, the logit at the last token of s_j would be
trained to predict the first token of s_{j+1}; that label is set to -100, so every sample contributes
exactly the same targets as it would alone (whose first label is never a target either). Attention is a
4D additive mask (B, 1, T, T), float32: 0 where query i may see key j (same sample and j <= i), the
float32 minimum elsewhere; transformers 5 passes a 4D mask through unchanged to eager and sdpa attention
(cast it to the model's dtype when that is not float32). `position_ids` restart at 0 for every sample,
so rotary positions match the unpacked sample. Padding tokens form their own block and have label -100.

Unpacked. Samples are sorted by length inside seeded chunks of 32 batches so that each batch pads little;
`attention_mask` is the usual (B, T) 0/1 padding mask (right padding).

Both orders are a pure function of (seed, epoch): a resumed run rebuilds the same list and skips to its
index. The list is lazy (`Batches`): tensors are made when a batch is indexed, one batch in memory at a time.
(transformers 5.23 also infers packing from restarting `position_ids` when no mask is given; the explicit
mask is used because it works the same for every attention implementation that accepts a 4D mask.)
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from cura.constants import IGNORE_INDEX
from cura.errors import CuraError


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def pack(samples: Sequence[dict], order: list[int], max_length: int, window: int = 64) -> list[list[int]]:
    """First-fit over `order` into the `window` most recent open sequences (O(n * window), not O(n^2)).

    Each sequence is a list of sample indices whose lengths sum to at most `max_length`.
    """
    sequences: list[list[int]] = []
    room: list[int] = []
    open_ids: list[int] = []  # indices of sequences still taking samples, oldest first
    for index in order:
        length = min(len(samples[index]["input_ids"]), max_length)
        target = next((k for k in open_ids if room[k] >= length), None)
        if target is None:
            target = len(sequences)
            sequences.append([])
            room.append(max_length)
            open_ids.append(target)
            if len(open_ids) > window:
                open_ids.pop(0)
        sequences[target].append(index)
        room[target] -= length
        if room[target] == 0:
            open_ids.remove(target)
    return sequences


def block_causal_mask(segments: torch.Tensor) -> torch.Tensor:
    """(B, T) segment ids -> (B, 1, T, T) float32 additive mask, causal inside each segment."""
    T = segments.shape[1]
    same = segments[:, :, None] == segments[:, None, :]  # (B, T, T)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    allowed = same & causal
    mask = torch.zeros(allowed.shape, dtype=torch.float32)
    mask.masked_fill_(~allowed, torch.finfo(torch.float32).min)
    return mask[:, None]


def packed_batch(samples: Sequence[dict], sequences: list[list[int]], max_length: int, pad: int) -> dict:
    B = len(sequences)
    T = max(sum(min(len(samples[i]["input_ids"]), max_length) for i in seq) for seq in sequences)
    input_ids = torch.full((B, T), pad, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((B, T), dtype=torch.long)
    segments = torch.full((B, T), -1, dtype=torch.long)  # padding: its own block
    for b, seq in enumerate(sequences):
        cursor = 0
        for k, index in enumerate(seq):
            ids = samples[index]["input_ids"][:max_length]
            n = len(ids)
            input_ids[b, cursor : cursor + n] = torch.tensor(ids)
            labels[b, cursor : cursor + n] = torch.tensor(samples[index]["labels"][:n])
            labels[b, cursor] = IGNORE_INDEX  # never predict a sample's first token from the previous sample
            positions[b, cursor : cursor + n] = torch.arange(n)
            segments[b, cursor : cursor + n] = k
            cursor += n
        if cursor < T:
            positions[b, cursor:] = torch.arange(T - cursor)
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": block_causal_mask(segments),
        "position_ids": positions,
    }


def padded_batch(samples: Sequence[dict], indices: list[int], max_length: int, pad: int) -> dict:
    B = len(indices)
    T = max(min(len(samples[i]["input_ids"]), max_length) for i in indices)
    input_ids = torch.full((B, T), pad, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((B, T), dtype=torch.long)
    for b, index in enumerate(indices):
        ids = samples[index]["input_ids"][:max_length]
        n = len(ids)
        input_ids[b, :n] = torch.tensor(ids)
        labels[b, :n] = torch.tensor(samples[index]["labels"][:n])
        attention[b, :n] = 1
    positions = torch.arange(T).expand(B, T).clone()
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention, "position_ids": positions}


class Batches(Sequence):
    """The batches of one epoch, built when indexed: a list's interface without holding every mask.

    A packed batch's (B, 1, T, T) float32 mask takes 4*B*T*T bytes (64 MiB at B=4, T=2048), so the epoch's
    batches are kept as index groups and turned into tensors one at a time.
    """

    def __init__(self, dataset: Sequence[dict], groups: list[list], build, max_length: int, pad: int):
        self.dataset, self.groups, self.build = dataset, groups, build
        self.max_length, self.pad = max_length, pad

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return Batches(self.dataset, self.groups[index], self.build, self.max_length, self.pad)
        return self.build(self.dataset, self.groups[index], self.max_length, self.pad)

    def __repr__(self) -> str:
        return f"Batches({len(self)} batches)"


def batches(
    dataset: Sequence[dict],
    *,
    batch_size: int,
    max_length: int,
    packing: bool,
    seed: int,
    epoch: int,
    pad_token_id: int | None,
) -> Batches:
    """All batches of one epoch (a lazy sequence), deterministic for (seed, epoch); see the module docstring."""
    if batch_size < 1 or max_length < 2:
        raise CuraError(f"batch_size {batch_size} and max_length {max_length} must be >= 1 and >= 2")
    pad = 0 if pad_token_id is None else int(pad_token_id)
    order = epoch_order(len(dataset), seed, epoch)
    if packing:
        sequences = pack(dataset, order, max_length)
        groups = [sequences[i : i + batch_size] for i in range(0, len(sequences), batch_size)]
        return Batches(dataset, groups, packed_batch, max_length, pad)
    chunk = batch_size * 32
    groups = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start : start + chunk], key=lambda i: len(dataset[i]["input_ids"]))
        groups += [part[i : i + batch_size] for i in range(0, len(part), batch_size)]
    random.Random(seed * 1_000_003 + epoch + 1).shuffle(groups)
    return Batches(dataset, groups, padded_batch, max_length, pad)
