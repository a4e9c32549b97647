"""The memory planner: how much memory a fine-tuning run needs, term by term, before it runs.

    shape = shape_from_source("llama-3-8b")           # or a model folder, config.json, .gguf (no weights read)
    spec = PlanSpec(method="qlora", ...)                # the run's settings (a run's: cura.train.plan_spec)
    p = plan(shape, spec)                              # named terms in bytes, the peak and its phase
    result = fit(shape, spec, parse_size("12GB"))      # cheapest changes that fit, largest batch / sequence

Terms, formulas and sources: `cura.memory.planner`. Accuracy against measured peaks: bench/memory.py.
Formulas only: nothing here imports torch or cura's train / models / adapters (tests/test_imports.py).
"""

from cura.memory.devices import GPUS, Gpu, MemoryBudget, format_bytes, parse_size, resolve_memory
from cura.memory.fit import Change, FitResult, fit, max_batch_size, max_seq_len
from cura.memory.planner import plan
from cura.memory.rules import RuleOfThumb, rules_of_thumb
from cura.memory.shapes import KNOWN_SHAPES, ModelShape, shape_from_config, shape_from_source
from cura.memory.spec import MemoryPlan, PlanSpec, Term, resolve_compute_dtype

__all__ = [
    "GPUS",
    "KNOWN_SHAPES",
    "Change",
    "FitResult",
    "Gpu",
    "MemoryBudget",
    "MemoryPlan",
    "ModelShape",
    "PlanSpec",
    "RuleOfThumb",
    "Term",
    "fit",
    "format_bytes",
    "max_batch_size",
    "max_seq_len",
    "parse_size",
    "plan",
    "resolve_compute_dtype",
    "resolve_memory",
    "rules_of_thumb",
    "shape_from_config",
    "shape_from_source",
]
