"""Make a run fit a memory budget: the cheapest changes first, then the largest batch and sequence.

    fit(shape, spec, budget) -> FitResult(plan, changes, max_batch_size, max_seq_len)

The changes are tried in this order, each kept only if it lowers the planned peak, until the plan fits:

    1. gradient checkpointing on          same results, ~30% more compute
    1b. --fsdp (with --nproc N > 1)       same results; base, LoRA and optimizer state / N per process,
                                          more communication (cura.memory.sharding)
    2. bfloat16 compute (GPUs with bf16)  half the activation memory; the QLoRA recipe's dtype
    3. paged optimizer                    state to host memory (GPU); same numbers
    4. 8-bit optimizer state              4x less state; a small numeric change (Dettmers et al. 2021)
    5. smaller loss chunks (to 128)       smaller logits buffers; same results
    6. 4-bit base (lora -> qlora)         the base in NF4; slower matmuls, nearly the same quality
    7. smaller batch                      the largest divisor of the batch size that fits; the caller
                                          multiplies gradient accumulation so each optimizer step sees
                                          the same samples
    8. lower LoRA rank (halving, to 4)    fewer trainable parameters: a quality trade
    9. shorter sequences                  the longest that fits: longer samples get truncated

Then each change the later ones made unnecessary is dropped again (an 8-bit optimizer that saved 28 MiB
is not kept once a smaller batch fits on its own).

A pure function of the plan's inputs; `cura.train.autofit` applies the result to a TrainConfig.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from cura.memory.planner import plan
from cura.memory.shapes import ModelShape
from cura.memory.spec import MemoryPlan, PlanSpec

MIN_LOSS_CHUNK = 128
MIN_RANK = 4
MIN_SEQ_LEN = 64
MAX_BATCH = 4096
MAX_SEQ_LEN = 1 << 20


@dataclass(frozen=True)
class Change:
    """One setting changed: the PlanSpec field, old and new values, and why it is a fair trade."""

    field: str
    old: object
    new: object
    why: str
    saved_bytes: int


@dataclass(frozen=True)
class FitResult:
    """`plan` is the plan after `changes` (the original one when it fit as is); `fits` says whether it fits.
    `max_batch_size` / `max_seq_len`: the largest batch at the plan's sequence length and the longest
    sequence at its batch size that still fit (None when even the plan does not)."""

    budget_bytes: int
    original: MemoryPlan
    plan: MemoryPlan
    changes: tuple[Change, ...]
    max_batch_size: int | None
    max_seq_len: int | None

    @property
    def fits(self) -> bool:
        return self.plan.fits(self.budget_bytes)

    @property
    def fits_as_is(self) -> bool:
        return self.original.fits(self.budget_bytes)


def largest(fits: Callable[[int], bool], low: int, high: int) -> int | None:
    """The largest n in [low, high] with fits(n), for a monotone `fits` (True up to some n); None if none."""
    if not fits(low):
        return None
    while low < high:
        mid = (low + high + 1) // 2
        if fits(mid):
            low = mid
        else:
            high = mid - 1
    return low


def _fits(shape: ModelShape, spec: PlanSpec, budget: int, **changes) -> bool:
    return plan(shape, dataclasses.replace(spec, **changes)).fits(budget)


def max_batch_size(shape: ModelShape, spec: PlanSpec, budget: int, cap: int = MAX_BATCH) -> int | None:
    return largest(lambda b: _fits(shape, spec, budget, batch_size=b), 1, cap)


def max_seq_len(shape: ModelShape, spec: PlanSpec, budget: int, cap: int = MAX_SEQ_LEN) -> int | None:
    return largest(lambda t: _fits(shape, spec, budget, seq_len=t), 2, cap)


def _candidates(shape: ModelShape, spec: PlanSpec, budget: int, bf16_ok: bool) -> Iterator[tuple[dict, str]]:
    """The changes of the module docstring, in order, as (PlanSpec fields to replace, why); each is
    proposed against the spec as changed so far."""
    if not spec.gradient_checkpointing:
        yield {"gradient_checkpointing": True}, "recompute each layer in backward (~30% more compute)"
    if spec.world_size > 1 and not spec.fsdp:
        why = f"shard the 4-bit base, LoRA and optimizer state over the {spec.world_size} processes (same results)"
        yield {"fsdp": True}, why
    if spec.device == "cuda" and spec.compute_dtype == "float32" and bf16_ok:
        yield {"compute_dtype": "bfloat16"}, "compute in bfloat16 as QLoRA does (weights stay float32)"
    if spec.optimizer == "adamw":
        yield {"optimizer": "paged_adamw"}, "keep optimizer state in host memory (same numbers)"
    if spec.optimizer == "paged_adamw":
        yield {"optimizer": "paged_adamw_8bit"}, "8-bit optimizer state (4x smaller)"
    if spec.loss_chunk_tokens > MIN_LOSS_CHUNK:
        fits_chunk = lambda c: _fits(shape, spec, budget, loss_chunk_tokens=c)  # noqa: E731
        best = largest(fits_chunk, MIN_LOSS_CHUNK, spec.loss_chunk_tokens) or MIN_LOSS_CHUNK
        yield {"loss_chunk_tokens": best}, "compute the loss in smaller chunks (same result)"
    if spec.method == "lora":
        yield {"method": "qlora"}, "store the frozen base in 4-bit NF4 (QLoRA)"
    if spec.batch_size > 1:
        divisors = [b for b in range(spec.batch_size - 1, 0, -1) if spec.batch_size % b == 0]
        best = next((b for b in divisors if _fits(shape, spec, budget, batch_size=b)), 1)
        yield {"batch_size": best}, "smaller batches, more gradient accumulation (same samples per step)"
    rank = spec.lora_r
    while spec.method != "full" and rank > MIN_RANK:
        rank = max(MIN_RANK, rank // 2)
        if _fits(shape, spec, budget, lora_r=rank) or rank == MIN_RANK:
            yield {"lora_r": rank}, "lower LoRA rank (fewer trainable parameters)"
            break
    if spec.seq_len > MIN_SEQ_LEN:
        best = max_seq_len(shape, spec, budget, cap=spec.seq_len) or MIN_SEQ_LEN
        yield {"seq_len": best}, "shorter sequences (longer samples are truncated)"


def _greedy(shape: ModelShape, spec: PlanSpec, budget: int, bf16_ok: bool) -> list[tuple[dict, str]]:
    """The candidates, in order, that lowered the peak until the plan fit (or none was left)."""
    steps: list[tuple[dict, str]] = []
    current = plan(shape, spec)
    while not current.fits(budget):
        step = next(
            (
                (fields, why, trial)
                for fields, why in _candidates(shape, current.spec, budget, bf16_ok)
                if (trial := plan(shape, dataclasses.replace(current.spec, **fields))).peak_bytes
                < current.peak_bytes
            ),
            None,
        )
        if step is None:
            break
        steps.append(step[:2])
        current = step[2]
    return steps


def _prune(shape: ModelShape, spec: PlanSpec, budget: int, steps: list[tuple[dict, str]]) -> list:
    """Drop each change that the others make unnecessary (e.g. an 8-bit optimizer once a smaller batch fits)."""
    kept = list(steps)
    for step in list(steps):
        others = [s for s in kept if s is not step]
        if plan_of(shape, spec, others).fits(budget):
            kept = others
    return kept


def fit(shape: ModelShape, spec: PlanSpec, budget_bytes: int, *, bf16_ok: bool = True) -> FitResult:
    """The cheapest changes that make `spec` fit `budget_bytes`, and the largest batch / sequence after them.

    Greedy in the module docstring's order, then every change the others make unnecessary is dropped.
    `bf16_ok` says whether bfloat16 compute is an option (a GPU with native bf16)."""
    original = current = plan(shape, spec)
    steps = _greedy(shape, spec, budget_bytes, bf16_ok)
    if steps and plan_of(shape, spec, steps).fits(budget_bytes):
        steps = _prune(shape, spec, budget_bytes, steps)
    changes: list[Change] = []
    for fields, why in steps:
        trial = plan(shape, dataclasses.replace(current.spec, **fields))
        for name, value in fields.items():
            changes.append(
                Change(name, getattr(current.spec, name), value, why, current.peak_bytes - trial.peak_bytes)
            )
        current = trial
    fits_now = current.fits(budget_bytes)
    return FitResult(
        budget_bytes=budget_bytes,
        original=original,
        plan=current,
        changes=tuple(changes),
        max_batch_size=max_batch_size(shape, current.spec, budget_bytes) if fits_now else None,
        max_seq_len=max_seq_len(shape, current.spec, budget_bytes) if fits_now else None,
    )


def plan_of(shape: ModelShape, spec: PlanSpec, steps: list[tuple[dict, str]]) -> MemoryPlan:
    """The plan after applying `steps` in order."""
    for fields, _ in steps:
        spec = dataclasses.replace(spec, **fields)
    return plan(shape, spec)
