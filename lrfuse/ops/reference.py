"""The pure-PyTorch version of every fused op: the path that runs without a built extension.

Same arguments and effects as ``torch.ops.lrfuse.fused_<rule>_``: each rule's math
(:mod:`lrfuse.ops.rules`) in float32 (float64 for float64 tensors), written back in the
tensor's dtype, as the native kernels do.
"""

from __future__ import annotations

import torch

from lrfuse.ops.rules import STAT_COLUMNS, Rule


def _opmath(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float64 if t.dtype == torch.float64 else torch.float32)


def _check_written(op: str, names: tuple[str, ...], lists: list[list[torch.Tensor]]) -> None:
    """Raises before any write if a tensor the op writes has overlapping memory (as the native
    checks do): an expanded view would be written many times, and copy_ refuses it mid-loop."""
    for name, tensors in zip(names, lists):
        for i, t in enumerate(tensors):
            if torch._debug_has_internal_overlap(t) == 1:
                raise RuntimeError(f"{op}: {name}[{i}] has overlapping memory (an expanded view); "
                                   "give it memory of its own (e.g. .clone())")


def fused(rule: Rule, params, grads, states, steps, group_of, hyper, grad_scale=None, found_inf=None,
          stats=None) -> None:
    """``rule``'s op: ``states`` are its state lists in order, ``steps`` None for a rule without;
    ``stats`` None, or the float64 table (a row per row of ``hyper``) the step's sums are added to:
    squared update as applied, squared parameter before the step, squared gradient as used
    (unscaled, before weight decay), count of non-finite gradient elements."""
    op = f"fused_{rule.name}_"
    _check_written(op, ("params", *rule.all_states), [params, *states])
    columns = len(STAT_COLUMNS)
    if stats is not None and (stats.dtype != torch.float64 or tuple(stats.shape) != (hyper.shape[0], columns)):
        raise RuntimeError(f"{op}: stats must be a contiguous float64 table of shape ({hyper.shape[0]}, {columns}), one row "
                           f"per row of hyper, got {stats.dtype} of shape {tuple(stats.shape)}")
    if found_inf is not None and bool(found_inf.item()):
        return
    rows = hyper.tolist()
    for i, param in enumerate(params):
        row = dict(zip(rule.columns, rows[group_of[i]]))
        step = None
        if steps is not None:
            steps[i] += 1
            step = steps[i].item()
        g = _opmath(grads[i])
        if grad_scale is not None:
            g = g / grad_scale.to(g.dtype)
        if stats is not None:
            before = param.to(torch.float64, copy=True)
            used = g.to(torch.float64)
        p = _opmath(param)
        s = [_opmath(lst[i]) if lst else None for lst in states]
        rule.reference(p, -g if row["maximize"] else g, s, row, step)
        param.copy_(p)
        if stats is not None:
            stats[group_of[i]] += torch.stack([(param.to(torch.float64) - before).square().sum(), before.square().sum(),
                                               used.square().sum(), (~used.isfinite()).sum().to(torch.float64)])
        for lst, value in zip(states, s):
            if lst:
                lst[i].copy_(value)
