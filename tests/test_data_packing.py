"""Packing: the same per-token loss as the samples alone, on every tiny architecture, sdpa and eager."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from cura.data import batches, block_causal_mask

IGNORE = -100


def random_samples(n: int, seed: int = 0, vocab: int = 320) -> list[dict]:
    """Samples of mixed length; some fully trained (text-like), some with a masked prompt."""
    rng = random.Random(seed)
    samples = []
    for k in range(n):
        length = rng.randint(3, 20)
        ids = [rng.randrange(3, vocab) for _ in range(length)]
        prompt = 0 if k % 3 == 0 else rng.randint(1, length - 2)
        labels = [IGNORE] * prompt + ids[prompt:]
        samples.append({"input_ids": ids, "labels": labels})
    return samples


def token_losses(model, batch) -> torch.Tensor:
    """Per-target losses (flattened, in order), computed as the training loop does: shifted."""
    with torch.no_grad():
        logits = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"],
        ).logits
    targets = batch["labels"][:, 1:]
    loss = F.cross_entropy(logits[:, :-1].transpose(1, 2), targets, ignore_index=IGNORE, reduction="none")
    return loss[targets != IGNORE]


def sample_losses(model, sample) -> torch.Tensor:
    ids = torch.tensor([sample["input_ids"]])
    labels = torch.tensor([sample["labels"]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    targets = labels[:, 1:]
    loss = F.cross_entropy(logits[:, :-1].transpose(1, 2), targets, ignore_index=IGNORE, reduction="none")
    return loss[targets != IGNORE]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_equals_unpacked(arch, make_tiny, attn):
    model = make_tiny(arch)
    model.config._attn_implementation = attn
    model.set_attn_implementation(attn) if hasattr(model, "set_attn_implementation") else None
    samples = random_samples(12)
    packed = batches(samples, batch_size=2, max_length=48, packing=True, seed=3, epoch=0, pad_token_id=0)
    assert sum(len(b["input_ids"]) for b in packed) < len(samples)  # several samples per row
    # the same samples, in the packed order, each alone
    order = []
    for b in packed:
        for row in range(b["input_ids"].shape[0]):
            starts = (b["position_ids"][row] == 0).nonzero().flatten().tolist()
            order += [(b, row, s) for s in starts]
    got = torch.cat([token_losses(model, b) for b in packed])
    want = []
    used = set()
    for b, row, start in order:
        ids = b["input_ids"][row, start : start + 2].tolist()
        match = [i for i, s in enumerate(samples) if s["input_ids"][:2] == ids and i not in used]
        if not match:  # trailing padding block
            continue
        used.add(match[0])
        want.append(sample_losses(model, samples[match[0]]))
    assert used == set(range(len(samples)))
    want = torch.cat(want)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_packed_mask_blocks_attention_across_samples(make_tiny):
    """Changing sample 1 must not change any logit of sample 2 in the same packed row."""
    model = make_tiny("llama")
    a = {"input_ids": [5, 6, 7, 8], "labels": [5, 6, 7, 8]}
    b = {"input_ids": [9, 10, 11], "labels": [9, 10, 11]}
    a2 = {"input_ids": [50, 60, 70, 80], "labels": [50, 60, 70, 80]}
    outs = []
    for first in (a, a2):
        (batch,) = batches(
            [first, b], batch_size=1, max_length=16, packing=True, seed=0, epoch=0, pad_token_id=0
        )
        row = batch["input_ids"][0].tolist()
        start = row.index(9)
        with torch.no_grad():
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        outs.append(logits[0, start : start + 3])
    torch.testing.assert_close(outs[0], outs[1])


def test_first_label_of_each_packed_sample_is_masked():
    samples = [{"input_ids": [4, 5, 6], "labels": [4, 5, 6]} for _ in range(3)]
    (batch,) = batches(samples, batch_size=1, max_length=16, packing=True, seed=0, epoch=0, pad_token_id=0)
    assert batch["labels"][0].tolist()[:9] == [IGNORE, 5, 6] * 3
    assert batch["position_ids"][0].tolist()[:9] == [0, 1, 2] * 3


@pytest.mark.parametrize("max_length", [20, 33, 64])
def test_pack_uses_every_sample_once_within_max_length(max_length):
    from cura.data.packing import pack

    samples = random_samples(200, seed=4)
    order = list(range(200))
    random.Random(0).shuffle(order)
    sequences = pack(samples, order, max_length)
    assert sorted(i for seq in sequences for i in seq) == list(range(200))
    assert all(sum(len(samples[i]["input_ids"]) for i in seq) <= max_length for seq in sequences)
    used = sum(len(s["input_ids"]) for s in samples) / (len(sequences) * max_length)
    assert used > 0.85  # few, well-filled rows


def test_block_causal_mask_shape_and_values():
    mask = block_causal_mask(torch.tensor([[0, 0, 1, 1, -1]]))
    allowed = (mask[0, 0] == 0).int().tolist()
    assert allowed == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 0, 1, 0, 0],
        [0, 0, 1, 1, 0],
        [0, 0, 0, 0, 1],
    ]


def test_unpacked_batches_pad_and_bucket():
    samples = random_samples(40, seed=1)
    out = batches(samples, batch_size=4, max_length=16, packing=False, seed=0, epoch=0, pad_token_id=0)
    assert sum(b["input_ids"].shape[0] for b in out) == 40
    for b in out:
        lengths = b["attention_mask"].sum(1)
        assert b["input_ids"].shape[1] == lengths.max() <= 16
        assert (b["labels"][b["attention_mask"] == 0] == IGNORE).all()
    padded = sum(b["attention_mask"].numel() - b["attention_mask"].sum() for b in out)
    naive = sum(16 - min(len(s["input_ids"]), 16) for s in samples)
    assert padded < naive / 2  # bucketing keeps padding small


@pytest.mark.parametrize("packing", [True, False])
def test_batches_deterministic_per_seed_and_epoch(packing):
    samples = random_samples(30)
    kw = dict(batch_size=3, max_length=40, packing=packing, pad_token_id=0)

    def flat(out):
        return [b["input_ids"].tolist() for b in out]

    assert flat(batches(samples, seed=1, epoch=2, **kw)) == flat(batches(samples, seed=1, epoch=2, **kw))
    lazy = batches(samples, seed=1, epoch=2, **kw)
    assert flat(lazy[2:4]) == flat(lazy)[2:4] and lazy[-1]["input_ids"].tolist() == flat(lazy)[-1]
    assert flat(batches(samples, seed=1, epoch=2, **kw)) != flat(batches(samples, seed=1, epoch=3, **kw))
    trained = sum(int((b["labels"] != IGNORE).sum()) for b in batches(samples, seed=0, epoch=0, **kw))
    first_masked = 0 if not packing else sum(s["labels"][0] != IGNORE for s in samples)
    assert trained == sum(sum(t != IGNORE for t in s["labels"]) for s in samples) - first_masked
