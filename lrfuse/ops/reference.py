"""Pure-PyTorch versions of the fused ops: the path that runs without a built extension.

Same arguments and effects as ``torch.ops.lrfuse.*``; the math is torch.optim's for-loop
update, done in float32 (float64 for float64 tensors) and written back in the tensor's dtype,
as the native kernels do.
"""

from __future__ import annotations

import torch



def _opmath(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float64 if t.dtype == torch.float64 else torch.float32)


def _check_written(op: str, **lists: list[torch.Tensor]) -> None:
    """Raises before any write if a tensor the op writes has overlapping memory (as the native
    checks do): an expanded view would be written many times, and copy_ refuses it mid-loop."""
    for name, tensors in lists.items():
        for i, t in enumerate(tensors):
            if torch._debug_has_internal_overlap(t) == 1:
                raise RuntimeError(f"{op}: {name}[{i}] has overlapping memory (an expanded view); "
                                   "give it memory of its own (e.g. .clone())")


def _skip(found_inf: torch.Tensor | None) -> bool:
    return found_inf is not None and bool(found_inf.item())


def _grad(g: torch.Tensor, grad_scale: torch.Tensor | None, maximize: float) -> torch.Tensor:
    g = _opmath(g)
    if grad_scale is not None:
        g = g / grad_scale.to(g.dtype)
    return -g if maximize else g


def fused_adam_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, group_of, hyper,
                grad_scale=None, found_inf=None) -> None:
    _check_written("fused_adam_", params=params, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs,
                   max_exp_avg_sqs=max_exp_avg_sqs)
    if _skip(found_inf):
        return
    rows = hyper.tolist()
    for i, param in enumerate(params):
        lr, beta1, beta2, eps, weight_decay, maximize, decoupled = rows[group_of[i]]
        steps[i] += 1
        step = steps[i].item()
        p, m, v = _opmath(param), _opmath(exp_avgs[i]), _opmath(exp_avg_sqs[i])
        g = _grad(grads[i], grad_scale, maximize)
        if weight_decay != 0:
            if decoupled:
                p.mul_(1 - lr * weight_decay)
            else:
                g = g.add(p, alpha=weight_decay)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        second = v
        if max_exp_avg_sqs:
            v_max = torch.maximum(_opmath(max_exp_avg_sqs[i]), v)
            max_exp_avg_sqs[i].copy_(v_max)
            second = v_max
        denom = (second.sqrt() / (1 - beta2**step) ** 0.5).add_(eps)
        p.addcdiv_(m, denom, value=-lr / (1 - beta1**step))
        for target, value in ((param, p), (exp_avgs[i], m), (exp_avg_sqs[i], v)):
            target.copy_(value)


def fused_rmsprop_(params, grads, square_avgs, momentum_buffers, grad_avgs, steps, group_of, hyper,
                   grad_scale=None, found_inf=None) -> None:
    _check_written("fused_rmsprop_", params=params, square_avgs=square_avgs, momentum_buffers=momentum_buffers,
                   grad_avgs=grad_avgs)
    if _skip(found_inf):
        return
    rows = hyper.tolist()
    for i, param in enumerate(params):
        lr, alpha, eps, weight_decay, momentum, maximize = rows[group_of[i]]
        steps[i] += 1
        p, square_avg = _opmath(param), _opmath(square_avgs[i])
        g = _grad(grads[i], grad_scale, maximize)
        if weight_decay != 0:
            g = g.add(p, alpha=weight_decay)
        square_avg.mul_(alpha).addcmul_(g, g, value=1 - alpha)
        if grad_avgs:
            grad_avg = _opmath(grad_avgs[i]).lerp_(g, 1 - alpha)
            grad_avgs[i].copy_(grad_avg)
            avg = square_avg.addcmul(grad_avg, grad_avg, value=-1).sqrt_()
        else:
            avg = square_avg.sqrt()
        avg.add_(eps)
        if momentum_buffers:
            buf = _opmath(momentum_buffers[i]).mul_(momentum).addcdiv_(g, avg)
            momentum_buffers[i].copy_(buf)
            p.add_(buf, alpha=-lr)
        else:
            p.addcdiv_(g, avg, value=-lr)
        param.copy_(p)
        square_avgs[i].copy_(square_avg)
