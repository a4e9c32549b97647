"""Fine-tuning: the run configuration, the run's setup and the training recipe.

run = build_run(config, device)     # model, tokenizer, optimizer, schedule, data streams (cura.train.run)
result = train(config)              # setup, loop, teardown (cura.train.loop)
"""

from cura._lazy import lazy_getattr
from cura.train.config import TrainConfig

__getattr__ = lazy_getattr(
    __name__,
    {
        **dict.fromkeys(("TrainHooks", "TrainResult", "train"), "cura.train.loop"),
        **dict.fromkeys(("Run", "build_run"), "cura.train.run"),
        "TrainerState": "cura.train.checkpoint",
        "evaluate_loss": "cura.train.steps",
        "plan_spec": "cura.train.plan",
    },
    globals(),
)

__all__ = [
    "Run",
    "TrainConfig",
    "TrainHooks",
    "TrainResult",
    "TrainerState",
    "build_run",
    "evaluate_loss",
    "plan_spec",
    "train",
]
