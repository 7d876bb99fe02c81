"""FusedSGD: torch.optim.SGD with every group updated in one native call."""

from __future__ import annotations

import torch

from lrfuse import ops
from lrfuse.optim._base import _FusedStep

__all__ = ["FusedSGD"]


class FusedSGD(_FusedStep, torch.optim.SGD):
    r"""``torch.optim.SGD`` whose step updates all parameter groups in one native call per device.

    Arguments, defaults, errors and ``state_dict`` are ``torch.optim.SGD``'s (no ``step`` in the
    state, a ``momentum_buffer`` only with momentum). Per parameter, with :math:`\gamma` the lr:

    .. math::
        g_t &\leftarrow \pm \nabla_\theta f_t(\theta_{t-1}) / \text{grad\_scale} + \lambda\theta_{t-1} \\
        b_t &\leftarrow g_t \text{ on the buffer's first step, else } \mu b_{t-1} + (1-\tau) g_t \\
        \theta_t &\leftarrow \theta_{t-1} - \gamma\,(g_t + \mu b_t \text{ if nesterov else } b_t)
              \quad (\theta_{t-1} - \gamma g_t \text{ when } \mu = 0)

    ``foreach`` and ``fused`` are accepted and ignored; ``differentiable=True`` is not supported.
    """

    _rule = ops.RULES["sgd"]
    _op = staticmethod(ops.op("sgd"))
    _row_keys = ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize")
    _first_step_rows = True

    def _row(self, values: tuple) -> list:
        lr, momentum, dampening, weight_decay, nesterov, maximize, *first_step = values
        return [lr, momentum, dampening, weight_decay, float(nesterov), float(maximize), float(bool(first_step))]

    def _uses(self, group: dict) -> tuple[bool, ...]:
        return (group["momentum"] != 0,)
