"""One training loop (accelerate) for LiSA, SA healing and PostShare: configs, losses, objectives, checkpoints."""

from .loop import TrainConfig, TrainResult, batch_indices, latest_checkpoint, lr_factor, select_trainable, train
from .losses import (
    Objective,
    attention_map_kl,
    distill_objective,
    kl_distill,
    lm_loss,
    lm_objective,
    pair_frobenius,
)
from .shared import plans_fingerprint, train_shared, trainable_names

__all__ = [
    "Objective",
    "TrainConfig",
    "TrainResult",
    "attention_map_kl",
    "batch_indices",
    "distill_objective",
    "kl_distill",
    "latest_checkpoint",
    "lm_loss",
    "lm_objective",
    "lr_factor",
    "pair_frobenius",
    "plans_fingerprint",
    "select_trainable",
    "train",
    "train_shared",
    "trainable_names",
]
