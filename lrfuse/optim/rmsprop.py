"""FusedRMSprop: torch.optim.RMSprop with every group updated in one native call."""

from __future__ import annotations

import torch

from lrfuse import ops
from lrfuse.optim._base import _FusedStep

__all__ = ["FusedRMSprop"]


class FusedRMSprop(_FusedStep, torch.optim.RMSprop):
    r"""``torch.optim.RMSprop`` whose step updates all parameter groups in one native call per device.

    Arguments, defaults, errors and ``state_dict`` are ``torch.optim.RMSprop``'s. Per parameter:

    .. math::
        g_t &\leftarrow \pm \nabla_\theta f_t(\theta_{t-1}) / \text{grad\_scale} + \lambda\theta_{t-1} \\
        v_t &\leftarrow \alpha v_{t-1} + (1-\alpha) g_t^2, \quad
        \bar g_t \leftarrow \alpha \bar g_{t-1} + (1-\alpha) g_t \text{ (centered)} \\
        a_t &\leftarrow \sqrt{v_t - \bar g_t^2 \text{ (centered) }} + \epsilon \\
        b_t &\leftarrow \mu b_{t-1} + g_t / a_t, \quad \theta_t \leftarrow \theta_{t-1} - \gamma b_t
              \quad (\text{or } \theta_{t-1} - \gamma g_t / a_t \text{ when } \mu = 0)

    ``foreach`` is accepted and ignored; ``differentiable=True`` is not supported.
    """

    _rule = ops.RULES["rmsprop"]
    _op = staticmethod(ops.op("rmsprop"))
    _row_keys = ("lr", "alpha", "eps", "weight_decay", "momentum", "maximize")

    def _row(self, values: tuple) -> list:
        lr, alpha, eps, weight_decay, momentum, maximize = values
        return [lr, alpha, eps, weight_decay, momentum, float(maximize)]

    def _uses(self, group: dict) -> tuple[bool, ...]:
        return (group["momentum"] > 0, bool(group["centered"]))
