"""FusedAdagrad: torch.optim.Adagrad with every group updated in one native call."""

from __future__ import annotations

import torch
from torch import Tensor

from lrfuse import ops
from lrfuse.optim._base import _FusedStep

__all__ = ["FusedAdagrad"]


class FusedAdagrad(_FusedStep, torch.optim.Adagrad):
    r"""``torch.optim.Adagrad`` whose step updates all parameter groups in one native call per device.

    Arguments, defaults, errors and ``state_dict`` are ``torch.optim.Adagrad``'s (state is created
    at construction, as torch does). Per parameter, with :math:`\gamma` the lr and :math:`\eta` lr_decay:

    .. math::
        g_t &\leftarrow \pm \nabla_\theta f_t(\theta_{t-1}) / \text{grad\_scale} + \lambda\theta_{t-1} \\
        s_t &\leftarrow s_{t-1} + g_t^2, \quad
        \theta_t \leftarrow \theta_{t-1} - \frac{\gamma}{1 + (t-1)\eta}\, \frac{g_t}{\sqrt{s_t} + \epsilon}

    ``foreach`` and ``fused`` are accepted and ignored; ``differentiable=True`` is not supported.
    """

    _rule = ops.RULES["adagrad"]
    _op = staticmethod(ops.op("adagrad"))
    _row_keys = ("lr", "lr_decay", "weight_decay", "eps", "maximize")

    def _row(self, values: tuple) -> list:
        lr, lr_decay, weight_decay, eps, maximize = values
        return [lr, lr_decay, weight_decay, eps, float(maximize)]

    def _initial_state(self, key: str, p: Tensor, group: dict) -> Tensor:
        # A sum lost from the state starts again where torch's constructor starts it.
        return torch.full_like(p, group["initial_accumulator_value"], memory_format=torch.preserve_format)
