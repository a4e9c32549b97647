"""`cura train --auto-fit 12GB`: change the fewest, cheapest settings so the run's planned peak fits; and
on a CPU, glibc's allocator mode for the run (`cpu_malloc`, `cura.memory.allocator`).

The plan is `cura.memory`'s for this config on the device the run will use; the changes are
`cura.memory.fit`'s, in its order (checkpointing, bfloat16, paged / 8-bit optimizer, loss chunks, 4-bit
base, batch size, LoRA rank, sequence length). A smaller batch (a divisor of the old one) multiplies
`grad_accum` so each optimizer step still sees the same samples; a lower LoRA rank scales `lora.alpha` with it so alpha / r stays the same.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable

from cura.config import from_dict, set_path
from cura.errors import CuraError
from cura.memory import fit, format_bytes, plan, resolve_memory, shape_from_source
from cura.memory.allocator import FAST_RETENTION
from cura.memory.fit import Change, FitResult
from cura.memory.report import config_key
from cura.train.config import TrainConfig
from cura.train.plan import plan_spec


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def config_changes(config: TrainConfig, changes: tuple[Change, ...]) -> dict:
    """The TrainConfig overrides (nested plain data) that carry out the planner's changes."""
    data: dict = {}
    for change in changes:
        set_path(data, config_key(change.field), change.new)
        if change.field == "batch_size":
            set_path(data, "grad_accum", config.grad_accum * config.batch_size // change.new)
        if change.field == "lora_r":
            set_path(data, "lora.alpha", config.lora.alpha * change.new / config.lora.r)
    return data


def describe(config: TrainConfig, result: FitResult, label: str) -> str:
    """One message: what changed, by how much, and the plan after."""
    before, after = result.original.peak_bytes, result.plan.peak_bytes
    lines = [f"auto-fit: the planned peak {format_bytes(before)} does not fit in {label}; changed:"]
    for c in result.changes:
        extra = ""
        if c.field == "batch_size":
            accum = config.grad_accum * config.batch_size // c.new
            extra = f" (grad_accum {config.grad_accum} -> {accum}: same samples per step)"
        lines.append(
            f"  {config_key(c.field)}: {c.old} -> {c.new}{extra}  -{format_bytes(c.saved_bytes)}: {c.why}"
        )
    lines.append(f"  planned peak now {format_bytes(after)}")
    return "\n".join(lines)


def auto_fit(config: TrainConfig, memory: str, *, say: Callable[[str], None] = _say) -> TrainConfig:
    """`config` changed as little as needed to fit `memory` (a size such as "12GB" or a GPU name such as
    "rtx-4090"); the same config when it fits already. Says what changed and why; CuraError if nothing fits."""
    from cura.hardware import default_device, native_bf16

    budget = resolve_memory(memory)
    device = default_device()
    bf16 = native_bf16(device)
    runtime = 0
    if device.type == "cpu":
        config = cpu_malloc_for_fit(config, say)
        runtime = runtime_rss()
    auto_checkpointing = config.gradient_checkpointing == "auto"
    if auto_checkpointing:  # start from the faster choice: recompute is fit's first (cheapest) change
        config = config.replace(gradient_checkpointing=False)
    shape = shape_from_source(config.model)
    spec = plan_spec(config, device.type, native_bf16=bf16)
    # a CPU plan is what a run adds to the process (Python, torch and transformers are resident already); with
    # cpu_malloc=fast glibc may hold up to FAST_RETENTION x the plan, so the plan must fit in that part
    room = int(budget.bytes * FIT_HEADROOM) - runtime
    if device.type == "cpu" and config.cpu_malloc == "fast":
        room = int(room / FAST_RETENTION)
    if runtime:
        say(
            f"auto-fit: {format_bytes(runtime)} of {budget.label} is this process before loading (Python, "
            f"torch, transformers); with {100 - round(100 * FIT_HEADROOM)}% kept free for the plan's error, the "
            f"run's plan must fit in the {format_bytes(max(room, 0))} left"
        )
    result = fit(shape, spec, max(room, 1), bf16_ok=bf16)
    if auto_checkpointing:
        result = dataclasses.replace(
            result,
            changes=tuple(
                dataclasses.replace(c, old="auto") if c.field == "gradient_checkpointing" else c
                for c in result.changes
            ),
        )
    if not result.fits:
        raise CuraError(
            f"--auto-fit {memory}: even after {', '.join(config_key(c.field) for c in result.changes) or 'every change'} "
            f"the planned peak is {format_bytes(result.plan.peak_bytes)}, more than {budget.label}; use a "
            "smaller model or more memory (see `cura estimate --fit`)"
        )
    if result.fits_as_is:
        without = " without checkpointing (gradient_checkpointing auto: off)" if auto_checkpointing else ""
        say(
            f"auto-fit: the planned peak {format_bytes(result.original.peak_bytes)}{without} fits in "
            f"{budget.label}; nothing changed"
        )
        return config
    say(describe(config, result, budget.label))
    return from_dict(TrainConfig, config_changes(config, result.changes), base=config)


FIT_HEADROOM = 0.9
"""The part of a budget a fitted plan may take: the planner is within 10% of measured peaks (bench/memory.py:
+7.2% at worst for training steps; a whole `cura train` of the bundled model measured +10% over its plan)."""


def runtime_rss() -> int:
    """Resident bytes of this process with transformers imported: what a CPU run holds before its model
    (the planner's CPU terms start from there, as bench/memory.py measures them)."""
    import transformers  # noqa: F401  (the import a run makes anyway, counted as it will be)

    from cura.train.measure import proc_status

    try:
        return proc_status().get("VmRSS", 0)
    except OSError:
        return 0


def cpu_malloc_for_fit(config: TrainConfig, say: Callable[[str], None] = _say) -> TrainConfig:
    """A fit on a CPU holds only where memory follows the plan: `cpu_malloc: auto` becomes pool (cura's
    caching allocator, `cura.train.cpu_pool`) where it builds, else tight (glibc's default keeps freed memory,
    measured 0.9-3.4x the plan); an explicit `fast` is kept and fitted at 1 / 3.5 of the budget
    (`cura.memory.allocator.FAST_RETENTION`)."""
    from cura.train import cpu_pool

    if config.cpu_malloc == "auto":
        mode = "pool" if cpu_pool.buildable() is None else "tight"
        say(f"auto-fit: cpu_malloc={mode}, so that the process's memory follows the plan it is fitted to")
        return config.replace(cpu_malloc=mode)
    return config


def tensor_bytes(p) -> int:
    """A CPU plan's peak without the framework's overhead: the bytes of tensors at the peak."""
    return p.peak_bytes - p.term("framework overhead")


def apply_cpu_malloc(config: TrainConfig, say: Callable[[str], None] = _say) -> str:
    """Set up this process's CPU allocator as `config.cpu_malloc` says, before the run allocates its
    tensors, and say which in one line; returns the one in use: "pool", "tight" or "fast".

    pool, and auto where it builds: cura's caching allocator (`cura.train.cpu_pool`), holding at most the
    plan's tensors (its allocator headroom included); if it cannot be installed after all, tight instead
    (the run's checkpointing was decided on memory that follows the plan). tight: glibc's mmap threshold
    fixed. fast: glibc's default.
    auto without the pool (pool too, said so): fast unless glibc's retention might not fit in the memory
    available (`cura.memory.allocator.choose_malloc`)."""
    from cura.memory.allocator import available_memory, pin_mmap_threshold
    from cura.train import cpu_pool

    mode = config.cpu_malloc
    if mode in ("tight", "fast"):
        return _glibc(mode, None, say)
    planned = _cpu_plan(config)
    unavailable = cpu_pool.buildable()
    if unavailable is not None:
        if mode == "pool":
            say(f"cpu_malloc=pool: cura's pool is not available here ({unavailable}); as cpu_malloc=auto")
        return _glibc("auto", planned.peak_bytes if planned else None, say)
    tensors = tensor_bytes(planned) if planned else None
    limit = cpu_pool.pool_limit(tensors, available_memory())
    failed = cpu_pool.install(limit)
    if failed is None:
        bound = "no limit" if limit is None else f"at most {format_bytes(limit)} held"
        if tensors is not None:
            bound += ": the plan's tensors"
        elif limit is not None:
            bound += ": half the memory available (no plan for this model)"
        say(
            f"cpu_malloc={mode}: pool, cura's caching allocator keeps freed tensors for the next step ({bound})"
        )
        return "pool"
    if pin_mmap_threshold():
        say(
            f"cpu_malloc={mode}: cura's pool could not be installed ({failed}); tight instead, so that memory "
            "follows the plan (steps up to 1.9x slower)"
        )
        return "tight"
    say(f"cpu_malloc={mode}: cura's pool could not be installed ({failed}); glibc's default kept")
    return "fast"


def _cpu_plan(config: TrainConfig):
    """The CPU plan of a settled config; None where checkpointing is unsettled or the shape unreadable."""
    from cura.hardware import native_bf16

    if not isinstance(config.gradient_checkpointing, bool):
        return None
    try:
        return plan(shape_from_source(config.model), plan_spec(config, "cpu", native_bf16=native_bf16("cpu")))
    except CuraError:
        return None  # a source the planner cannot read the shape of


def _glibc(mode: str, peak: int | None, say: Callable[[str], None]) -> str:
    """glibc's malloc as `mode` says (auto: by `peak` and the memory available); "tight" or "fast"."""
    from cura.memory.allocator import available_memory, choose_malloc, pin_mmap_threshold

    choice = choose_malloc(mode, peak, available_memory())
    if choice.tight:
        pinned = pin_mmap_threshold()
        say(choice.why if pinned else f"{choice.why}; not possible here (not glibc), glibc's default kept")
        return "tight" if pinned else "fast"
    if mode == "auto" and peak is not None:
        say(choice.why)
    return "fast"
