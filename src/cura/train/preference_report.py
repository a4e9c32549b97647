"""What a preference run adds to summary.json: the held-out pair metrics before and after training."""

from __future__ import annotations

from typing import Any


def preference_summary(config, before: dict | None, after: dict | None) -> dict[str, Any]:
    """`objective`, the preference settings, and the held-out metrics of the base (before) and the tuned
    model (after): `preference_accuracy` (how often log pi(chosen) > log pi(rejected)), `logp_margin` (its
    mean gap), and the reward metrics as TRL names them (rewards are 0 for the base by construction)."""
    before, after = before or {}, after or {}
    out: dict[str, Any] = {
        "objective": config.objective,
        "preference": {k: getattr(config.preference, k) for k in config.preference.__dataclass_fields__},
        "eval_preference_before": before,
        "eval_preference_after": after,
    }
    for key in ("preference_accuracy", "logp_margin", "rewards/accuracies", "rewards/margins"):
        name = key.replace("rewards/", "reward_")
        out[f"eval_{name}_before"] = before.get(key)
        out[f"eval_{name}_after"] = after.get(key)
    return out


def preference_text(summary: dict[str, Any]) -> str | None:
    """One line for the end of a run: the held-out preference accuracy and margin, before -> after."""

    def fmt(x, spec=".3f"):
        return "n/a" if x is None else format(x, spec)

    if (
        summary.get("eval_preference_accuracy_before") is None
        and summary.get("eval_reward_margins_after") is None
    ):
        return None
    return (
        f"{summary['objective']}: held-out preference accuracy {fmt(summary['eval_preference_accuracy_before'])} "
        f"-> {fmt(summary['eval_preference_accuracy_after'])}, log-prob margin "
        f"{fmt(summary['eval_logp_margin_before'])} -> {fmt(summary['eval_logp_margin_after'])}, reward margin "
        f"after {fmt(summary['eval_reward_margins_after'])}"
    )
