"""The parity suite: every fused optimizer against its torch.optim for-loop, on every backend.

Each test runs for every algorithm of parity.ALGORITHMS and every backend of conftest.py's
``backend`` fixture (native CPU, the pure-PyTorch reference, the CUDA backend's code emulated on
the host, and the GPU when there is one), comparing parameters and every state tensor after
every step. GPU-only behaviour (graphs, streams, memory) is in test_cuda.py.
"""

from __future__ import annotations

import pytest
import torch

from lrfuse.threads import torch_threads
from parity import ALGORITHMS, clone_like, leaf, run_low_precision, run_parity, step_both

CHUNK = 65536  # kChunkSize in csrc/cuda/launch_plan.h: bigger tensors span several blocks
NAMES = list(ALGORITHMS)
FLAGS = [(name, i) for name, a in ALGORITHMS.items() for i in range(len(a.flags))]


def some_missing(step: int, i: int) -> bool:
    """Tensor 1 has no gradient every third step, tensor 4 (several chunks) every fourth."""
    return not ((i == 1 and step % 3 == 0) or (i == 4 and step % 4 == 1))


def three_groups(name: str, dev: torch.device) -> list[dict]:
    """Three groups, each with its own lr and other hyper-parameters, and tensors that take every
    path of the kernels: aligned vectors, a scalar tail, an unaligned start, several CUDA chunks,
    zero elements, a transposed weight and a non-dense slice."""
    torch.manual_seed(0)
    tensors = [
        torch.randn(16, 8, device=dev),
        torch.randn(8, device=dev),
        torch.randn(33, device=dev),                         # tail after the vectors
        torch.randn(1025, device=dev)[1:],                   # 4-byte offset: the scalar path
        torch.randn(2 * CHUNK + 123, device=dev),            # three CUDA chunks: the late step update
        torch.randn(0, device=dev),                          # no elements; its step still advances
        torch.randn(12, 9, device=dev).t(),                  # dense, strides unlike its gradient's
        torch.randn(10, 6, device=dev)[:, ::2],              # not dense
    ]
    ps = [leaf(t) for t in tensors]
    extras = ALGORITHMS[name].group_extras
    lr = ALGORITHMS[name].lr
    return [
        {"params": ps[0:3], "lr": lr, **extras[0]},
        {"params": ps[3:6], "lr": lr * 0.3, **extras[1]},
        {"params": ps[6:8], **extras[2]},
    ]


def split_by_threads(name: str, dev: torch.device) -> list[dict]:
    """:func:`three_groups` plus what makes both parallel passes of the CPU kernels split at two and
    three threads: 150 small tensors (the check-and-plan pass takes chunks of kTensorGrain = 64
    tensors, csrc/cpu/fused_optim.cpp) and about 325,000 elements (the element space is cut into
    pieces of at least kGrainSize = 32,768, csrc/cpu/plan.h). Two threads cut it inside a
    transposed weight with a contiguous gradient (the strided walk); three cut it there and inside
    the flat 131,195-element tensor."""
    groups = three_groups(name, dev)
    torch.manual_seed(5)
    groups[1]["params"] += [leaf(torch.randn(17, device=dev)) for _ in range(150)]
    groups[2]["params"] += [leaf(torch.randn(300, 401, device=dev).t()), leaf(torch.randn(200, 700, device=dev)[:, ::2])]
    return groups


@pytest.mark.parametrize("backend", ["native"], indirect=True)
@pytest.mark.parametrize("name", NAMES)
def test_threads_split_the_work(name, backend):
    """Parity with the for-loop when the step runs on two and on three threads, and the very same
    bits as on one thread (no element's update depends on where the work is cut)."""
    results = {}
    for threads in (1, 2, 3):
        with torch_threads(threads):
            assert torch.get_num_threads() == threads
            groups = split_by_threads(name, backend)
            torch.manual_seed(7)  # the same gradients in every run
            fused, _ = run_parity(name, groups, steps=3, has_grad=some_missing, lr=ALGORITHMS[name].lr)
        params = [p for g in fused.param_groups for p in g["params"]]
        results[threads] = [t.detach() for p in params for t in (p, *fused.state[p].values()) if torch.is_tensor(t)]
    for threads in (2, 3):
        assert len(results[threads]) == len(results[1])
        for i, (one, many) in enumerate(zip(results[1], results[threads])):
            assert torch.equal(one, many), f"{name}: tensor {i} differs between 1 and {threads} threads"


@pytest.mark.parametrize("name", NAMES)
def test_groups_with_own_hyperparameters(name, backend):
    fused, _ = run_parity(name, three_groups(name, backend), steps=12, has_grad=some_missing,
                          lr=ALGORITHMS[name].lr)
    if fused._rule.counts_steps:  # a step without a gradient does not count
        steps = [fused.state[p]["step"].item() for g in fused.param_groups for p in g["params"]]
        assert steps == [sum(some_missing(s, i) for s in range(12)) for i in range(8)]


@pytest.mark.parametrize("name, config", FLAGS, ids=[f"{n}-{i}" for n, i in FLAGS])
def test_flags(name, config, backend):
    run_parity(name, three_groups(name, backend), steps=8, has_grad=some_missing,
               **{"lr": ALGORITHMS[name].lr, **ALGORITHMS[name].flags[config]})


@pytest.mark.parametrize("name", NAMES)
def test_grad_strides_differ_from_param(name, backend):
    """A transposed weight with a contiguous gradient (and the reverse): torch's own fused CPU Adam
    gets this wrong; lrfuse must not."""
    torch.manual_seed(3)
    params = [leaf(torch.randn(9, 4, device=backend).t()), leaf(torch.randn(4, 9, device=backend)),
              leaf(torch.randn(2, 3, 4, device=backend))]

    def odd_grad(p):
        if not p.is_contiguous():
            g = torch.randn(p.shape, device=p.device)
        else:
            g = torch.randn(tuple(reversed(p.shape)), device=p.device).permute(*reversed(range(p.dim())))
        assert g.stride() != p.stride()
        return g

    run_parity(name, [{"params": params}], steps=6, grad_like=odd_grad,
               **{"lr": ALGORITHMS[name].lr, **ALGORITHMS[name].low_precision})


@pytest.mark.parametrize("name", NAMES)
def test_odd_parameters(name, backend):
    """Permuted, 0-d, size-1 dims and complex parameters, with every state the algorithm has."""
    torch.manual_seed(2)
    params = [
        leaf(torch.randn(3, 4, 5, device=backend).permute(2, 0, 1)),
        leaf(torch.randn(6, 1, 4, device=backend)),
        leaf(torch.randn((), device=backend)),
        leaf(torch.randn(6, 3, dtype=torch.complex64, device=backend)),
    ]
    run_parity(name, [{"params": params}], steps=6,
               **{"lr": ALGORITHMS[name].lr, **ALGORITHMS[name].low_precision})


@pytest.mark.parametrize("name", NAMES)
def test_float64(name, backend):
    torch.manual_seed(6)
    run_parity(name, [{"params": [leaf(torch.randn(64, dtype=torch.float64, device=backend))]}], steps=6,
               tol={"rtol": 1e-12, "atol": 1e-12},
               **{"lr": ALGORITHMS[name].lr, **ALGORITHMS[name].low_precision})


@pytest.mark.parametrize("name", [n for n in NAMES if ALGORITHMS[n].fused._rule.counts_steps])
def test_float64_default_dtype_keeps_step_float64(name, backend):
    """torch keeps `step` in float64 under a float64 default dtype; the CUDA kernels count on a
    float32 copy, for a block-owned step and for a late one (a tensor of several chunks)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(4)
        params = [leaf(torch.randn(33, device=backend)), leaf(torch.randn(2 * CHUNK + 5, device=backend))]
        fused, _ = run_parity(name, [{"params": params}], steps=3, lr=ALGORITHMS[name].lr)
        for p in params:
            assert fused.state[p]["step"].dtype == torch.float64 and float(fused.state[p]["step"]) == 3
    finally:
        torch.set_default_dtype(old)


@pytest.mark.parametrize("name", NAMES)
def test_tensor_lr(name, backend):
    """A tensor lr on the parameters' device, changed in place between steps (what schedulers do)."""
    torch.manual_seed(8)
    params = [leaf(torch.randn(20, device=backend)), leaf(torch.randn(5, 3, device=backend))]
    ref = [clone_like(p) for p in params]
    algorithm = ALGORITHMS[name]
    fused = algorithm.fused(params, lr=torch.tensor(algorithm.lr, device=backend))
    oracle = algorithm.torch(ref, lr=algorithm.lr, foreach=False)
    for step in range(5):
        lr = algorithm.lr * 0.5**step
        fused.param_groups[0]["lr"].fill_(lr)
        oracle.param_groups[0]["lr"] = lr
        step_both(params, ref, fused, oracle, f"step {step}")


@pytest.mark.parametrize("name", NAMES)
def test_lr_change_between_steps_takes_effect(name, backend):
    """Schedulers write param_groups[i]["lr"]; the next step must use the new value."""
    groups = three_groups(name, backend)
    ref_groups = [{**g, "params": [clone_like(p) for p in g["params"]]} for g in groups]
    algorithm = ALGORITHMS[name]
    fused = algorithm.fused(groups, lr=algorithm.lr)
    oracle = algorithm.torch(ref_groups, lr=algorithm.lr, foreach=False)
    params = [p for g in fused.param_groups for p in g["params"]]
    ref_params = [p for g in oracle.param_groups for p in g["params"]]
    for step in range(6):
        for opt in (fused, oracle):
            for k, group in enumerate(opt.param_groups):
                group["lr"] = algorithm.lr * 0.7**step * (k + 1)
        step_both(params, ref_params, fused, oracle, f"step {step}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", NAMES)
def test_low_precision_matches_fp32_math(name, dtype, backend):
    torch.manual_seed(9)
    run_low_precision(name, [leaf(torch.randn(257, device=backend).to(dtype)),
                             leaf(torch.randn(16, 9, device=backend).to(dtype).t()),
                             leaf(torch.randn(CHUNK + 9, device=backend).to(dtype))], steps=8)


# The algorithms whose rule has optional state (the others' groups all keep the same state).
OPTIONAL = [name for name in NAMES if ALGORITHMS[name].fused._rule.optional_states]


@pytest.mark.parametrize("name", OPTIONAL)
def test_groups_may_differ_in_optional_state(name, backend):
    """A group with the optional state (its every-state settings) and one with the class's
    defaults, which keep none: two native calls on one device."""
    torch.manual_seed(1)
    algorithm = ALGORITHMS[name]
    groups = [{"params": [leaf(torch.randn(10, device=backend))], **algorithm.low_precision},
              {"params": [leaf(torch.randn(4, 4, device=backend))]}]
    fused, _ = run_parity(name, groups, steps=5, lr=algorithm.lr)
    with_optional, without = (fused.state[g["params"][0]].keys() for g in fused.param_groups)
    assert with_optional - without == set(fused._rule.optional_states), name
