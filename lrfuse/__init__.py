"""lrfuse: fused per-group learning-rate optimizers and LR tools for PyTorch Lightning."""

from lrfuse.optim import FusedAdam, FusedAdamW, FusedRMSprop

__all__ = ["FusedAdam", "FusedAdamW", "FusedRMSprop"]
__version__ = "0.1.0"
