"""Runs a fused optimizer beside its torch.optim for-loop oracle and compares every step.

Shared by the CPU and CUDA parity tests.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

import lrfuse

PAIRS = {
    "adam": (lrfuse.FusedAdam, torch.optim.Adam),
    "adamw": (lrfuse.FusedAdamW, torch.optim.AdamW),
    "rmsprop": (lrfuse.FusedRMSprop, torch.optim.RMSprop),
}

# torch's default float32 tolerances.
FP32 = {"rtol": 1.3e-6, "atol": 1e-5}
# One unit in the last place of bfloat16 / float16, relative.
ULP = {torch.bfloat16: 2**-7, torch.float16: 2**-10}

GradRule = Callable[[int, int], bool]  # (step, tensor index) -> has a gradient this step


def leaf(t: torch.Tensor) -> torch.Tensor:
    """A trainable leaf that keeps ``t``'s strides (so views stay non-contiguous)."""
    return t.detach().requires_grad_()


def clone_like(t: torch.Tensor) -> torch.Tensor:
    """An exact copy with the same strides."""
    out = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
    return leaf(out.copy_(t))


def run_parity(
    name: str,
    groups: list[dict],
    steps: int = 20,
    has_grad: GradRule = lambda step, i: True,
    grad_like: Callable[[torch.Tensor], torch.Tensor] | None = None,
    tol: dict | None = None,
    **defaults,
) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    """Steps the fused optimizer and ``torch.optim`` (foreach=False) on identical copies.

    After every step, parameters and every state tensor must agree. ``grad_like(p)`` makes a
    gradient for ``p`` (default: random, contiguous); both optimizers get identical values.
    """
    fused_cls, torch_cls = PAIRS[name]
    tol = tol or FP32
    ref_groups = [{**g, "params": [clone_like(p) for p in g["params"]]} for g in groups]
    fused = fused_cls(groups, **defaults)
    oracle = torch_cls(ref_groups, foreach=False, **defaults)
    params = [p for g in fused.param_groups for p in g["params"]]
    ref_params = [p for g in oracle.param_groups for p in g["params"]]
    make_grad = grad_like or (lambda p: torch.randn_like(p, memory_format=torch.contiguous_format))
    for step in range(steps):
        for i, (p, q) in enumerate(zip(params, ref_params)):
            if has_grad(step, i):
                p.grad = make_grad(p)
                q.grad = torch.empty_strided(p.grad.shape, p.grad.stride(), dtype=p.dtype, device=q.device)
                q.grad.copy_(p.grad)
            else:
                p.grad = q.grad = None
        fused.step()
        oracle.step()
        assert_same(fused, oracle, params, ref_params, tol, f"{name} step {step}")
    return fused, oracle


def step_both(params, ref, fused, oracle, where: str) -> None:
    """One step of both optimizers with the same random gradients, then :func:`assert_same`."""
    for p, q in zip(params, ref):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
    fused.step()
    oracle.step()
    assert_same(fused, oracle, params, ref, FP32, where)


def assert_same(fused, oracle, params, ref_params, tol, where: str) -> None:
    for i, (p, q) in enumerate(zip(params, ref_params)):
        torch.testing.assert_close(p, q.to(p.device), **tol, msg=lambda m: f"{where}, param {i}: {m}")
        mine, theirs = fused.state.get(p, {}), oracle.state.get(q, {})
        assert mine.keys() == theirs.keys(), f"{where}, param {i}: state keys {mine.keys()} != {theirs.keys()}"
        for key, value in theirs.items():
            torch.testing.assert_close(mine[key].cpu(), value.cpu(), **tol,
                                       msg=lambda m: f"{where}, param {i}, state {key!r}: {m}")


def run_low_precision(name: str, params: list[torch.Tensor], steps: int = 20) -> None:
    """bf16/fp16 ``params`` and state: each step, from identical values, the fused result must
    equal torch's float32 update (for-loop) rounded to the dtype, within one unit in the last
    place. Starting every compared step from the same values keeps rounding from compounding, as
    torch's own optimizer tests do."""
    fused_cls, torch_cls = PAIRS[name]
    dtype = params[0].dtype
    ref = [leaf(p.detach().float()) for p in params]
    kwargs = {"momentum": 0.9, "centered": True} if name == "rmsprop" else {"amsgrad": True}
    fused = fused_cls(params, lr=1e-2, weight_decay=0.01, **kwargs)
    oracle = torch_cls(ref, lr=1e-2, weight_decay=0.01, foreach=False, **kwargs)
    for step in range(steps):
        for p, q in zip(params, ref):
            p.grad = torch.randn_like(p)
            with torch.no_grad():
                q.copy_(p)
            q.grad = p.grad.float()
        if step:  # from the second step on, state exists: start the oracle from ours
            for p, q in zip(params, ref):
                for key, value in fused.state[p].items():
                    oracle.state[q][key].copy_(value)
        fused.step()
        oracle.step()
        for p, q in zip(params, ref):
            torch.testing.assert_close(p.float(), q.to(dtype).float(), rtol=ULP[dtype], atol=1e-6)
            for key, value in oracle.state[q].items():
                if key != "step":
                    torch.testing.assert_close(fused.state[p][key].float(), value.to(dtype).float(),
                                               rtol=ULP[dtype], atol=1e-6)


def run_compiled_with_lr_changes(params: list[torch.Tensor], steps: int = 4) -> None:
    """FusedAdam's step under ``torch.compile(fullgraph=True)`` with a tensor lr on the parameters'
    device (what torch recommends for compiled optimizers): a new lr value is seen without a
    recompile, and parameters and state follow torch.optim.Adam every step. Step 0 runs eagerly to
    create the state (its creation would otherwise be one more graph)."""
    ref = [clone_like(p) for p in params]
    opt = lrfuse.FusedAdam(params, lr=torch.tensor(0.01, device=params[0].device))
    ref_opt = torch.optim.Adam(ref, lr=0.01, foreach=False)
    torch._dynamo.reset()
    compiled = torch.compile(opt.step, fullgraph=True)
    for step in range(steps):
        lr = 0.01 * 0.5**step
        opt.param_groups[0]["lr"].fill_(lr)
        ref_opt.param_groups[0]["lr"] = lr
        for p, q in zip(params, ref):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        if step == 0:
            opt.step()
        else:
            with torch._dynamo.config.patch(error_on_recompile=step > 1):
                compiled()
        ref_opt.step()
        assert_same(opt, ref_opt, params, ref, FP32, f"compiled step {step}")
