"""A memory plan for people (a table) and for machines (plain data for JSON)."""

from __future__ import annotations

from dataclasses import asdict

from cura.memory.allocator import fast_malloc_bound
from cura.memory.devices import COMMON_SIZES_GB, GiB, format_bytes
from cura.memory.fit import FitResult
from cura.memory.rules import rules_of_thumb
from cura.memory.spec import MemoryPlan

PHASES = {
    "loss": "backward through the output layer (chunked loss)",
    "last_layer": "backward through the last decoder layer",
    "first_layer": "backward through the first decoder layer",
    "update": "the optimizer update",
    "all_reduce": "the gradients' all-reduce across processes",
}

# PlanSpec field -> the TrainConfig key a user sets (`cura train --<key>`)
CONFIG_KEYS = {"seq_len": "data.max_length", "lora_r": "lora.r"}


def config_key(field: str) -> str:
    return CONFIG_KEYS.get(field, field)


def describe_run(p: MemoryPlan) -> str:
    s, shape = p.spec, p.shape
    if s.method == "qlora":
        base = f"qlora ({s.quant_type}{' + double quant' if s.double_quant else ''}, blocksize {s.blocksize})"
    else:
        base = s.method
    lora = (
        ""
        if s.method == "full"
        else f", LoRA r={s.lora_r} on {s.lora_targets if isinstance(s.lora_targets, str) else ','.join(s.lora_targets)}"
    )
    excluded = [n for n in s.lora_exclude if n != "lm_head"]  # lm_head is never a target anyway
    if lora and excluded:
        lora += f" excluding {','.join(excluded)}"
    return (
        f"{shape.name} ({shape.total_params / 1e9:.3g}B parameters), {base}{lora}, {s.optimizer}, "
        f"{s.compute_dtype} compute, batch {s.batch_size} x {s.seq_len} tokens"
        f"{' x 2 sequences (chosen + rejected)' if s.sequences_per_example == 2 else ''}, checkpointing "
        f"{'on' if s.gradient_checkpointing else 'off'}, loss chunks of {s.loss_chunk_tokens}, "
        f"{'packed' if s.packing else 'unpacked'} batches, device {s.device}"
        + (
            f"; per process of {s.world_size} ({'FSDP-sharded' if s.fsdp else 'data'} parallel: global batch "
            f"{s.batch_size * s.world_size})"
            if s.world_size > 1
            else ""
        )
    )


def fits_line(p: MemoryPlan) -> str:
    marks = [f"{gb} GB {'yes' if p.fits(gb * GiB) else 'no'}" for gb in COMMON_SIZES_GB]
    return (
        "fits on a GPU of: " + ", ".join(marks) if p.spec.device == "cuda" else "fits in: " + ", ".join(marks)
    )


def format_plan(p: MemoryPlan) -> str:
    """The plan as a table: each non-zero term with its formula, the total, fits, and the rules of thumb."""
    rows = [(t.name, format_bytes(t.bytes), t.formula) for t in p.terms if t.bytes]
    width = max(len(r[0]) for r in rows)
    lines = [describe_run(p), ""]
    lines += [f"  {name:<{width}}  {size:>10}  {how}" for name, size, how in rows]
    lines.append(f"  {'-' * (width + 12)}")
    lines.append(f"  {'peak':<{width}}  {format_bytes(p.peak_bytes):>10}  while {PHASES[p.peak_phase]}")
    if p.host_bytes:
        lines.append(f"  {'host memory':<{width}}  {format_bytes(p.host_bytes):>10}  paged optimizer state")
    if p.spec.device == "cpu":
        lines.append(
            f"  {'cpu_malloc=fast':<{width}}  {format_bytes(fast_malloc_bound(p.peak_bytes)):>10}  allowed for "
            "(glibc's default malloc keeps freed memory: up to 3.4x measured); the peak above "
            "holds with cura's pool (cpu_malloc auto, where a C++ compiler builds it) or cpu_malloc=tight"
        )
    lines += ["", fits_line(p), "", "rules of thumb (not this plan; shown for comparison):"]
    for rule in rules_of_thumb(p.shape.total_params):
        lines.append(f"  {rule.name:<28} {format_bytes(rule.bytes):>10}  {rule.formula}")
    return "\n".join(lines)


def format_fit(result: FitResult, label: str) -> str:
    """What `--fit` found: fits as is (and how much larger it could be), the changes that make it fit, or
    that nothing does."""
    before, after = result.original, result.plan
    lines = [f"fit in {label}:"]
    if result.fits_as_is:
        lines.append(f"  fits as is ({format_bytes(before.peak_bytes)}).")
    else:
        lines.append(f"  does not fit as is ({format_bytes(before.peak_bytes)}); cheapest changes first:")
        for c in result.changes:
            lines.append(
                f"  - {config_key(c.field)}: {c.old} -> {c.new}  (-{format_bytes(c.saved_bytes)}; {c.why})"
            )
    if result.fits:
        s = after.spec
        if result.changes:
            lines.append(f"  => {format_bytes(after.peak_bytes)}, fits.")
        lines.append(
            f"  largest batch at {s.seq_len} tokens: {result.max_batch_size}; longest sequence at batch "
            f"{s.batch_size}: {result.max_seq_len} tokens"
        )
    else:
        lines.append(
            f"  nothing fits: the smallest plan found needs {format_bytes(after.peak_bytes)}; use a larger "
            "device or a smaller model"
        )
    return "\n".join(lines)


def plan_to_dict(p: MemoryPlan) -> dict:
    """Plain data: inputs, terms (bytes and formula), peak and its phase, every phase's total, host bytes,
    the common GPU sizes it fits, and the rules of thumb."""
    return {
        "model": asdict(p.shape),
        "settings": asdict(p.spec),
        "terms": {t.name: {"bytes": t.bytes, "formula": t.formula} for t in p.terms},
        "peak_bytes": p.peak_bytes,
        "peak_phase": p.peak_phase,
        "phases_bytes": p.phases,
        "host_bytes": p.host_bytes,
        # CPU: the most glibc's default malloc may hold (cpu_malloc=fast); the peak holds with the pool or tight
        "cpu_malloc_fast_bytes": fast_malloc_bound(p.peak_bytes) if p.spec.device == "cpu" else None,
        "fits_gb": {str(gb): p.fits(gb * GiB) for gb in COMMON_SIZES_GB},
        "rules_of_thumb": {
            r.name: {"bytes": r.bytes, "formula": r.formula} for r in rules_of_thumb(p.shape.total_params)
        },
    }


def fit_to_dict(result: FitResult, label: str) -> dict:
    return {
        "budget": label,
        "budget_bytes": result.budget_bytes,
        "fits_as_is": result.fits_as_is,
        "fits": result.fits,
        "changes": [
            {
                "key": config_key(c.field),
                "old": c.old,
                "new": c.new,
                "saved_bytes": c.saved_bytes,
                "why": c.why,
            }
            for c in result.changes
        ],
        "peak_bytes": result.plan.peak_bytes,
        "max_batch_size": result.max_batch_size,
        "max_seq_len": result.max_seq_len,
    }
