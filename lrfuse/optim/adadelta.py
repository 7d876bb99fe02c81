"""FusedAdadelta: torch.optim.Adadelta with every group updated in one native call."""

from __future__ import annotations

import torch

from lrfuse import ops
from lrfuse.optim._base import _FusedStep

__all__ = ["FusedAdadelta"]


class FusedAdadelta(_FusedStep, torch.optim.Adadelta):
    r"""``torch.optim.Adadelta`` whose step updates all parameter groups in one native call per device.

    Arguments, defaults, errors and ``state_dict`` are ``torch.optim.Adadelta``'s. Per parameter:

    .. math::
        g_t &\leftarrow \pm \nabla_\theta f_t(\theta_{t-1}) / \text{grad\_scale} + \lambda\theta_{t-1} \\
        v_t &\leftarrow \rho v_{t-1} + (1-\rho) g_t^2, \quad
        \Delta_t \leftarrow \frac{\sqrt{u_{t-1} + \epsilon}}{\sqrt{v_t + \epsilon}}\, g_t \\
        u_t &\leftarrow \rho u_{t-1} + (1-\rho) \Delta_t^2, \quad \theta_t \leftarrow \theta_{t-1} - \gamma \Delta_t

    ``foreach`` is accepted and ignored; ``differentiable=True`` is not supported.
    """

    _rule = ops.RULES["adadelta"]
    _op = staticmethod(ops.op("adadelta"))
    _row_keys = ("lr", "rho", "eps", "weight_decay", "maximize")

    def _row(self, values: tuple) -> list:
        lr, rho, eps, weight_decay, maximize = values
        return [lr, rho, eps, weight_decay, float(maximize)]
