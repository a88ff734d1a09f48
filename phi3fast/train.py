"""phi3fast.train: the public entry point of fine-tuning (`train(TrainConfig(...))`); the work is in
phi3fast.training."""

from phi3fast.lora.adapter import TARGETS
from phi3fast.training.config import TrainConfig
from phi3fast.training.trainer import TrainResult, train

__all__ = ["TARGETS", "TrainConfig", "TrainResult", "train"]
