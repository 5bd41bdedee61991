"""Training: Lightning modules and the recipes behind ``dspark train``."""

from dspark.training.recipes import TrainConfig, load_train_config, train

__all__ = ["TrainConfig", "load_train_config", "train"]
