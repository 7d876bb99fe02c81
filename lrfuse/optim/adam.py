"""FusedAdam and FusedAdamW: torch.optim.Adam / AdamW with every group updated in one native call."""

from __future__ import annotations

import torch

from lrfuse import ops
from lrfuse.optim._base import _FusedStep

__all__ = ["FusedAdam", "FusedAdamW"]


class _AdamStep(_FusedStep):
    _rule = ops.RULES["adam"]
    _op = staticmethod(ops.op("adam"))
    _row_keys = ("lr", "betas", "eps", "weight_decay", "maximize", "decoupled_weight_decay")

    def _row(self, values: tuple) -> list:
        lr, (beta1, beta2), eps, weight_decay, maximize, decoupled = values
        return [lr, beta1, beta2, eps, weight_decay, float(maximize), float(decoupled)]

    def _uses(self, group: dict) -> tuple[bool, ...]:
        return (bool(group["amsgrad"]),)


class FusedAdam(_AdamStep, torch.optim.Adam):
    r"""``torch.optim.Adam`` whose step updates all parameter groups in one native call per device.

    Arguments, defaults, errors and ``state_dict`` are ``torch.optim.Adam``'s; swapping the class
    name is the whole migration. For each parameter, with :math:`\gamma` the group's lr:

    .. math::
        g_t &\leftarrow \pm \nabla_\theta f_t(\theta_{t-1}) / \text{grad\_scale}
              \;(+\,\lambda\theta_{t-1} \text{ unless decoupled}) \\
        m_t &\leftarrow \beta_1 m_{t-1} + (1-\beta_1) g_t, \quad
        v_t \leftarrow \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \\
        \hat v_t &\leftarrow \max(\hat v_{t-1}, v_t) \text{ if amsgrad else } v_t \\
        \theta_t &\leftarrow \theta_{t-1}(1 - \gamma\lambda \text{ if decoupled})
              - \frac{\gamma}{1-\beta_1^t}\, \frac{m_t}{\sqrt{\hat v_t}/\sqrt{1-\beta_2^t} + \epsilon}

    ``foreach`` and ``fused`` are accepted and ignored: the step is always lrfuse's fused kernel.
    ``differentiable=True`` is not supported.
    """


class FusedAdamW(_AdamStep, torch.optim.AdamW):
    """``torch.optim.AdamW`` (decoupled weight decay, default 1e-2) as one native call per device.

    Same update as :class:`FusedAdam` with ``decoupled_weight_decay=True``.
    """
