"""Which modules a name list selects: one rule for quantization skips, LoRA targets and LoRA excludes.

PEFT's rule for a list of target names (`peft.tuners.tuners_utils.check_target_module_exists`): a module
path matches a name when it IS the name or ENDS with "." + name, so whole dotted components match and
parts of a component never do:

    matches("model.layers.0.self_attn.q_proj", ["q_proj"])        -> True   (suffix after a dot)
    matches("model.layers.0.self_attn.q_proj", ["self_attn.q_proj"]) -> True (a dotted suffix)
    matches("lm_head", ["lm_head"])                               -> True   (the whole path)
    matches("model.layers.0.mlp.gate_proj", ["proj"])             -> False  (part of a component)
    matches("model.layers.0.mlp", ["model"])                      -> False  (a prefix is not a suffix)

`"all-linear"` selects every linear layer except the model's output layer (whatever it is called), as in
PEFT; `exclude` uses the same rule and wins over the targets. Torch-free, so the memory planner can use it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from cura.constants import ALL_LINEAR

__all__ = ["ALL_LINEAR", "matches", "select"]


def matches(path: str, names: Iterable[str]) -> bool:
    """True when module `path` is one of `names` or ends with "." + one of them (see the module docstring)."""
    return any(path == name or path.endswith("." + name) for name in names)


def select(
    paths: Iterable[str],
    targets: str | Sequence[str],
    exclude: Iterable[str] = (),
    *,
    output_layer: str | None = None,
) -> list[str]:
    """The `paths` (in their order) that `targets` selects and `exclude` does not.

    `targets` is "all-linear" (every path but `output_layer`) or a list of names matched by `matches`. A
    single string other than "all-linear" is one name (not a comma list: the config layer splits those).
    """
    exclude = tuple(exclude)
    if isinstance(targets, str) and targets == ALL_LINEAR:
        return [p for p in paths if p != output_layer and not matches(p, exclude)]
    names = (targets,) if isinstance(targets, str) else tuple(targets)
    return [p for p in paths if matches(p, names) and not matches(p, exclude)]
