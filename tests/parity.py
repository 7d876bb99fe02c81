"""Runs a fused optimizer beside its torch.optim for-loop oracle and compares every step.

The one parity suite (tests/test_parity.py) runs these over every algorithm of ``ALGORITHMS``
and every backend (tests/conftest.py's ``backend``); other tests use them too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch

import lrfuse

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


@dataclass(frozen=True)
class Algorithm:
    """One fused class and what the parity suite varies for it."""

    fused: type
    torch: type
    rule: str                 # its rule in lrfuse.ops.RULES
    lr: float                 # the suite's learning rate: a step moves parameters by about 1e-2
    group_extras: list[dict]  # three groups' own hyper-parameters (besides lr)
    flags: list[dict]         # configurations that between them take every switch of the rule
    low_precision: dict = field(default_factory=dict)  # settings with every state in use


# Adding an optimizer: one entry here.
ALGORITHMS = {
    "adam": Algorithm(lrfuse.FusedAdam, torch.optim.Adam, "adam", 1e-2,
                      [{"betas": (0.8, 0.99), "eps": 1e-6}, {"weight_decay": 0.1, "betas": (0.9, 0.95)}, {"eps": 1e-4}],
                      [{"amsgrad": a, "maximize": m, "weight_decay": 0.05} for a in (False, True) for m in (False, True)],
                      {"amsgrad": True, "weight_decay": 0.01}),
    "adamw": Algorithm(lrfuse.FusedAdamW, torch.optim.AdamW, "adam", 1e-2,
                       [{"betas": (0.8, 0.99), "eps": 1e-6}, {"weight_decay": 0.1, "betas": (0.9, 0.95)}, {"eps": 1e-4}],
                       [{"amsgrad": a, "maximize": m} for a in (False, True) for m in (False, True)],
                       {"amsgrad": True, "weight_decay": 0.01}),
    "rmsprop": Algorithm(lrfuse.FusedRMSprop, torch.optim.RMSprop, "rmsprop", 1e-2,
                         [{"alpha": 0.9, "eps": 1e-6}, {"weight_decay": 0.1, "alpha": 0.95}, {"momentum": 0.5}],
                         [{"centered": c, "momentum": mo, "maximize": m}
                          for c in (False, True) for mo in (0.0, 0.9) for m in (False, True)],
                         {"momentum": 0.9, "centered": True, "weight_decay": 0.01}),
    "sgd": Algorithm(lrfuse.FusedSGD, torch.optim.SGD, "sgd", 1e-2,
                     [{"momentum": 0.9, "dampening": 0.1}, {"weight_decay": 0.1, "momentum": 0.5, "nesterov": True},
                      {"momentum": 0.0}],
                     [{"momentum": 0.0, "maximize": True, "weight_decay": 0.05}, {"momentum": 0.9},
                      {"momentum": 0.9, "dampening": 0.3, "maximize": True},
                      {"momentum": 0.9, "nesterov": True, "weight_decay": 0.05}],
                     {"momentum": 0.9, "nesterov": True, "weight_decay": 0.01}),
    "adagrad": Algorithm(lrfuse.FusedAdagrad, torch.optim.Adagrad, "adagrad", 1e-1,
                         [{"lr_decay": 0.1, "eps": 1e-6}, {"weight_decay": 0.1}, {"initial_accumulator_value": 0.2}],
                         [{"lr_decay": 0.05, "maximize": m, "weight_decay": wd, "initial_accumulator_value": 0.1}
                          for m in (False, True) for wd in (0.0, 0.05)],
                         {"lr_decay": 0.01, "weight_decay": 0.01}),
    "adadelta": Algorithm(lrfuse.FusedAdadelta, torch.optim.Adadelta, "adadelta", 1.0,
                          [{"rho": 0.8, "eps": 1e-5}, {"weight_decay": 0.1}, {"rho": 0.95}],
                          [{"maximize": m, "weight_decay": wd} for m in (False, True) for wd in (0.0, 0.05)],
                          {"weight_decay": 0.01}),
}

PAIRS = {name: (a.fused, a.torch) for name, a in ALGORITHMS.items()}
# Each algorithm's suite learning rate by name (``ALGORITHMS[name].lr``), for the tests that index it so.
LR = {name: a.lr for name, a in ALGORITHMS.items()}

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


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: dict, msg) -> None:
    # Bit-equal tensors (most here) pass assert_close's checks; torch.equal says so in one pass,
    # where assert_close's isclose takes several (14 of the 31 s of the largest parity test).
    if actual.dtype == expected.dtype and actual.shape == expected.shape and torch.equal(actual, expected):
        return
    torch.testing.assert_close(actual, expected, **tol, msg=msg)


def assert_same(fused, oracle, params, ref_params, tol, where: str) -> None:
    for i, (p, q) in enumerate(zip(params, ref_params)):
        _assert_close(p, q.to(p.device), tol, msg=lambda m: f"{where}, param {i}: {m}")
        mine, theirs = fused.state.get(p, {}), oracle.state.get(q, {})
        assert mine.keys() == theirs.keys(), f"{where}, param {i}: state keys {mine.keys()} != {theirs.keys()}"
        for key, value in theirs.items():
            _assert_close(mine[key].cpu(), value.cpu(), tol, msg=lambda m: f"{where}, param {i}, state {key!r}: {m}")


def run_low_precision(name: str, params: list[torch.Tensor], steps: int = 20) -> None:
    """bf16/fp16 ``params`` and state: each step, from identical values, the fused result must
    equal torch's float32 update (for-loop) rounded to the dtype, within one unit in the last
    place. Starting every compared step from the same values keeps rounding from compounding, as
    torch's own optimizer tests do."""
    fused_cls, torch_cls = PAIRS[name]
    dtype = params[0].dtype
    ref = [leaf(p.detach().float()) for p in params]
    kwargs = {"lr": ALGORITHMS[name].lr, **ALGORITHMS[name].low_precision}
    fused = fused_cls(params, **kwargs)
    oracle = torch_cls(ref, foreach=False, **kwargs)
    for step in range(steps):
        for p, q in zip(params, ref):
            p.grad = torch.randn_like(p)
            with torch.no_grad():
                q.copy_(p)
            q.grad = p.grad.float()
        # Start the oracle's state from ours: from the second step on, and before the first where
        # torch creates state at construction (Adagrad).
        for p, q in zip(params, ref):
            for key, value in oracle.state.get(q, {}).items():
                value.copy_(fused.state[p][key])
        fused.step()
        oracle.step()
        for p, q in zip(params, ref):
            torch.testing.assert_close(p.float(), q.to(dtype).float(), rtol=ULP[dtype], atol=1e-6)
            for key, value in oracle.state[q].items():
                if key != "step":
                    torch.testing.assert_close(fused.state[p][key].float(), value.to(dtype).float(),
                                               rtol=ULP[dtype], atol=1e-6)


def run_compiled_with_lr_changes(params: list[torch.Tensor], name: str = "adam", steps: int = 4) -> None:
    """The fused step of ``name`` under ``torch.compile(fullgraph=True)`` with a tensor lr on the
    parameters' device (what torch recommends for compiled optimizers): a new lr value is seen
    without a recompile, and parameters and state follow torch's for-loop every step. Step 0 runs
    eagerly to create the state (its creation would otherwise be one more graph)."""
    algorithm = ALGORITHMS[name]
    ref = [clone_like(p) for p in params]
    opt = algorithm.fused(params, lr=torch.tensor(algorithm.lr, device=params[0].device), **algorithm.low_precision)
    ref_opt = algorithm.torch(ref, lr=algorithm.lr, foreach=False, **algorithm.low_precision)
    torch._dynamo.reset()
    compiled = torch.compile(opt.step, fullgraph=True)
    for step in range(steps):
        lr = algorithm.lr * 0.5**step
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


# A plausible value of every hyper-table column, for calling the ops directly.
COLUMN_VALUES = {"lr": 1e-2, "beta1": 0.9, "beta2": 0.999, "eps": 1e-6, "weight_decay": 0.01, "maximize": 0.0,
                 "decoupled": 1.0, "alpha": 0.99, "momentum": 0.9, "dampening": 0.1, "nesterov": 1.0,
                 "first_step": 0.0, "lr_decay": 0.01, "rho": 0.9}


def op_args(rule, device: torch.device, dtype: torch.dtype = torch.float32, optional: bool = True) -> tuple:
    """Arguments of one call of ``rule``'s native op: three tensors (one column-major) in two
    groups whose rows differ (the second maximizes and, for SGD, starts its buffers), every
    optional state when ``optional``, a grad_scale of 8 and a found_inf of 0."""
    g = torch.Generator().manual_seed(4)
    shapes = [(70000,), (33,), (9, 5)]

    def place(t: torch.Tensor, i: int) -> torch.Tensor:
        t = t.to(device=device, dtype=dtype)
        return t.t().contiguous().t() if i == 2 else t

    def tensors(scale: float = 1.0, shift: float = 0.0) -> list[torch.Tensor]:
        return [place(torch.rand(s, generator=g, dtype=torch.float64) * scale + shift, i) for i, s in enumerate(shapes)]

    # Small state values (RMSprop's grad_avg) keep centered variances positive.
    states = [tensors(0.01 if "grad_avg" in key else 1.0, 0.5 if key == "square_avg" else 0.0)
              for key in rule.states]
    states += [tensors(0.01 if "grad_avg" in key else 1.0) if optional else [] for key in rule.optional_states]
    rows = [[COLUMN_VALUES[c] for c in rule.columns] for _ in range(2)]
    for c, value in (("maximize", 1.0), ("first_step", 1.0), ("lr", 3e-3), ("weight_decay", 0.0)):
        if c in rule.columns:
            rows[1][rule.columns.index(c)] = value
    steps = [[torch.full((), 4.0, device=device) for _ in shapes]] if rule.counts_steps else []
    return (tensors(2.0, -1.0), tensors(2.0, -1.0), *states, *steps, [0, 1, 1],
            torch.tensor(rows, dtype=torch.float64, device=device),
            torch.full((), 8.0, device=device), torch.zeros((), device=device))
