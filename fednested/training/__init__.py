"""Training: the edge adapter loop and the packed forward/loss it shares with evaluation."""

from fednested.config.training import Precision
from fednested.training.edge import (
    EdgeTrainConfig,
    StopReason,
    TrainMetrics,
    train_adapters,
    trainable_parameters,
)
from fednested.training.forward import causal_lm_parts, packed_loss_sum, resolve_precision

__all__ = [
    "EdgeTrainConfig",
    "Precision",
    "StopReason",
    "TrainMetrics",
    "causal_lm_parts",
    "packed_loss_sum",
    "resolve_precision",
    "train_adapters",
    "trainable_parameters",
]
