"""Training: config, frozen-feature cache, the loop, checkpoints and resume."""

from .checkpoint import load_run, read_config
from .config import TrainConfig
from .train import train

__all__ = ["TrainConfig", "load_run", "read_config", "train"]
