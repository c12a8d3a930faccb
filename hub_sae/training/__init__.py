"""The trainer: config, activation stream, SAE set (replicate or modules), loop, checkpoints, plan."""

from hub_sae.training.config import LaunchOptions, TrainConfig, parse_args
from hub_sae.training.loop import train

__all__ = ["LaunchOptions", "TrainConfig", "parse_args", "train"]
