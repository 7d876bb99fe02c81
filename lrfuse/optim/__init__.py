"""Fused drop-in replacements for torch.optim optimizers."""

from lrfuse.optim.adam import FusedAdam, FusedAdamW
from lrfuse.optim.rmsprop import FusedRMSprop

__all__ = ["FusedAdam", "FusedAdamW", "FusedRMSprop"]
