"""One training loop for the coarse AR model, the refiner and the baseline AR model. See docs/training.md."""

from .config import TrainConfig
from .loop import CHECKPOINT_NAME, INFO_NAME, EMA, Trainer, evaluate, train

__all__ = ["CHECKPOINT_NAME", "EMA", "INFO_NAME", "TrainConfig", "Trainer", "evaluate", "train"]
