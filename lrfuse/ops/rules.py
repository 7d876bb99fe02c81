"""The update rules on the Python side: each rule's hyper-table columns, its state, and its math
as the pure-PyTorch reference computes it.

The native side defines the same rules once each in ``csrc/rules/`` (the op schemas, CPU loops
and CUDA kernel are generated from those); ``tests/test_ops.py`` checks that both sides name the
same columns and state lists. The reference functions follow torch.optim's for-loop
implementations op by op, on float32 (float64 for float64 tensors) copies: ``p`` and ``s`` (the
states, in the op's order; ``None`` where an optional state is absent) are updated in place,
``g`` is the gradient already unscaled and negated when maximizing, ``row`` the group's row by
column name and ``step`` the tensor's step after this update (None for rules without one).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

Reference = Callable[[Tensor, Tensor, list, dict, "float | None"], None]


@dataclass(frozen=True)
class Rule:
    name: str                          # the op is torch.ops.lrfuse.fused_<name>_
    columns: tuple[str, ...]           # the hyper table's columns, in order
    states: tuple[str, ...]            # optimizer.state keys always kept, in the op's order (its argument names)
    optional_states: tuple[str, ...]   # state keys kept when the group's settings call for them
    counts_steps: bool                 # the op takes `steps` and advances them
    reference: Reference

    @property
    def all_states(self) -> tuple[str, ...]:
        return self.states + self.optional_states


def _adam(p, g, s, row, step):
    m, v, v_max = s
    if row["weight_decay"] != 0:
        if row["decoupled"]:
            p.mul_(1 - row["lr"] * row["weight_decay"])
        else:
            g = g.add(p, alpha=row["weight_decay"])
    m.lerp_(g, 1 - row["beta1"])
    v.mul_(row["beta2"]).addcmul_(g, g, value=1 - row["beta2"])
    second = v
    if v_max is not None:
        second = v_max.copy_(v_max.maximum(v))
    denom = (second.sqrt() / (1 - row["beta2"] ** step) ** 0.5).add_(row["eps"])
    p.addcdiv_(m, denom, value=-row["lr"] / (1 - row["beta1"] ** step))


def _rmsprop(p, g, s, row, step):
    square_avg, buf, grad_avg = s
    alpha = row["alpha"]
    if row["weight_decay"] != 0:
        g = g.add(p, alpha=row["weight_decay"])
    square_avg.mul_(alpha).addcmul_(g, g, value=1 - alpha)
    if grad_avg is not None:
        grad_avg.lerp_(g, 1 - alpha)
        avg = square_avg.addcmul(grad_avg, grad_avg, value=-1).sqrt_()
    else:
        avg = square_avg.sqrt()
    avg.add_(row["eps"])
    if buf is not None:
        buf.mul_(row["momentum"]).addcdiv_(g, avg)
        p.add_(buf, alpha=-row["lr"])
    else:
        p.addcdiv_(g, avg, value=-row["lr"])


def _sgd(p, g, s, row, step):
    (buf,) = s
    if row["weight_decay"] != 0:
        g = g.add(p, alpha=row["weight_decay"])
    if buf is not None:
        if row["first_step"]:  # torch starts the buffer as the first gradient
            buf.copy_(g)
        else:
            buf.mul_(row["momentum"]).add_(g, alpha=1 - row["dampening"])
        g = g.add(buf, alpha=row["momentum"]) if row["nesterov"] else buf
    p.add_(g, alpha=-row["lr"])


def _adagrad(p, g, s, row, step):
    (state_sum,) = s
    if row["weight_decay"] != 0:
        g = g.add(p, alpha=row["weight_decay"])
    clr = row["lr"] / (1 + (step - 1) * row["lr_decay"])
    state_sum.addcmul_(g, g, value=1)
    p.addcdiv_(g, state_sum.sqrt().add_(row["eps"]), value=-clr)


def _adadelta(p, g, s, row, step):
    square_avg, acc_delta = s
    rho = row["rho"]
    if row["weight_decay"] != 0:
        g = g.add(p, alpha=row["weight_decay"])
    square_avg.mul_(rho).addcmul_(g, g, value=1 - rho)
    std = square_avg.add(row["eps"]).sqrt_()
    delta = acc_delta.add(row["eps"]).sqrt_().div_(std).mul_(g)
    acc_delta.mul_(rho).addcmul_(delta, delta, value=1 - rho)
    p.add_(delta, alpha=-row["lr"])


# The columns of a fused op's `stats` table, in order (csrc/fused_op.h's Stat): sums over a
# row's tensors of the squared update as applied, the squared parameter before the step, the
# squared gradient as used (unscaled, before weight decay), and the non-finite gradient count.
STAT_COLUMNS = ("update_sq", "param_sq", "grad_sq", "nonfinite")

RULES = {rule.name: rule for rule in (
    Rule("adam", ("lr", "beta1", "beta2", "eps", "weight_decay", "maximize", "decoupled"),
         ("exp_avg", "exp_avg_sq"), ("max_exp_avg_sq",), True, _adam),
    Rule("rmsprop", ("lr", "alpha", "eps", "weight_decay", "momentum", "maximize"),
         ("square_avg",), ("momentum_buffer", "grad_avg"), True, _rmsprop),
    # `first_step` is 1 in the second copy of each group's row, which new momentum buffers read
    # (see csrc/rules/sgd.h). torch keeps no step for SGD.
    Rule("sgd", ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize", "first_step"),
         (), ("momentum_buffer",), False, _sgd),
    Rule("adagrad", ("lr", "lr_decay", "weight_decay", "eps", "maximize"), ("sum",), (), True, _adagrad),
    Rule("adadelta", ("lr", "rho", "eps", "weight_decay", "maximize"), ("square_avg", "acc_delta"), (), True,
         _adadelta),
)}
