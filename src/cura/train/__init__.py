"""Fine-tuning: the run configuration and the training recipe."""

from cura._lazy import lazy_getattr
from cura.train.config import TrainConfig

__getattr__ = lazy_getattr(
    __name__,
    dict.fromkeys(("TrainHooks", "TrainResult", "evaluate_loss", "train"), "cura.train.loop"),
    globals(),
)

__all__ = ["TrainConfig", "TrainHooks", "TrainResult", "evaluate_loss", "train"]
