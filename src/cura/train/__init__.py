"""Fine-tuning: the run configuration and the training recipe."""

from cura.train.config import TrainConfig
from cura.train.loop import TrainHooks, TrainResult, evaluate_loss, train

__all__ = ["TrainConfig", "TrainHooks", "TrainResult", "evaluate_loss", "train"]
