"""Fused drop-in replacements for torch.optim optimizers."""

from lrfuse.optim.adadelta import FusedAdadelta
from lrfuse.optim.adagrad import FusedAdagrad
from lrfuse.optim.adam import FusedAdam, FusedAdamW
from lrfuse.optim.rmsprop import FusedRMSprop
from lrfuse.optim.sgd import FusedSGD

__all__ = ["FusedAdadelta", "FusedAdagrad", "FusedAdam", "FusedAdamW", "FusedRMSprop", "FusedSGD"]
