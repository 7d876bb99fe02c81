"""The CUDA backend beyond the parity suite: launch splitting, mixed dtypes, CPU and CUDA kernels
side by side, CUDA graphs, compile, AMP, memory.

Parity with torch.optim for every algorithm runs on this backend in tests/test_parity.py. Tests
here marked ``on_device`` run twice: on the GPU ("cuda", marked and skipped without one), and
"emulated": the CUDA backend's own code built for the host (see conftest.py's ``backend``). That
runs everywhere, CI included; what only a GPU can show (its memory accesses and rounding, races,
graphs, compile) is in the tests marked ``cuda``. On a GPU machine: ``python -m pytest -m cuda
tests`` (or benchmarks/gpu_check.sh).
"""

from __future__ import annotations

import pytest
import torch

import lrfuse
from lrfuse import ops
from parity import (FP32, HAS_CUDA, PAIRS, ULP, assert_same, clone_like, leaf, needs_cuda, op_args,
                    run_compiled_with_lr_changes, run_parity)

DEV = torch.device("cuda", 0)
CHUNK = 65536  # kChunkSize in csrc/cuda/launch_plan.h: bigger tensors span several blocks
on_device = pytest.mark.parametrize(
    "backend", ["emulated", pytest.param("cuda", marks=[pytest.mark.cuda, needs_cuda])], indirect=True)


@pytest.mark.cuda
@needs_cuda
def test_cuda_kernels_are_built():
    """Without them every test below would silently run the pure-PyTorch reference."""
    assert ops.backend(DEV) == "native", "build with LRFUSE_CUDA=1 (lrfuse._C.with_cuda is 0)"


@on_device
@pytest.mark.parametrize("name", list(PAIRS))
def test_gradients_in_the_parameters_layout(name, backend):
    """Gradients laid out like their parameters (a transposed weight's transposed like it): the
    in-place path of every tensor, no contiguous temporaries."""
    torch.manual_seed(0)
    params = [leaf(torch.randn(12, 9, device=backend).t()), leaf(torch.randn(2 * CHUNK + 3, device=backend)),
              leaf(torch.randn(7, device=backend))]
    run_parity(name, [{"params": params}], steps=5, grad_like=lambda p: torch.randn_like(p), lr=1e-2)


@on_device
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("name", list(ops.RULES))
def test_cpu_and_cuda_kernels_agree(name, dtype, backend):
    """The same call, every optional state and a grad_scale, on the CPU kernels and the CUDA backend."""
    rule = ops.RULES[name]
    cpu_op = getattr(torch.ops.lrfuse, f"fused_{name}_")
    cuda_op = next(cls for cls, _ in PAIRS.values() if cls._rule is rule)._op  # the emulator's where it runs
    cpu, gpu = op_args(rule, torch.device("cpu"), dtype), op_args(rule, backend, dtype)
    for _ in range(1 if dtype == torch.bfloat16 else 3):  # one step: a rounding tie may differ by an ulp
        cpu_op(*cpu)
        cuda_op(*gpu)
    tol = {torch.float32: FP32, torch.float64: {"rtol": 1e-12, "atol": 1e-12},
           torch.bfloat16: {"rtol": ULP[torch.bfloat16], "atol": 1e-6}}[dtype]
    for i, (mine, theirs) in enumerate(zip(cpu, gpu)):
        if isinstance(mine, list) and mine and isinstance(mine[0], torch.Tensor):
            for a, b in zip(mine, theirs):
                torch.testing.assert_close(b.cpu(), a, **tol, msg=lambda m: f"argument {i}: {m}")
    if rule.counts_steps:
        steps = gpu[2 + len(rule.all_states)]
        assert all(s.item() == (5.0 if dtype == torch.bfloat16 else 7.0) for s in steps)


@on_device
@pytest.mark.parametrize("name", ["adam", "sgd"])
def test_more_tensors_and_chunks_than_one_launch_holds(name, backend):
    """1,200 small tensors in 40 groups and one tensor of 1,100 chunks: the launches split
    between tensors and inside a tensor, and every tensor is updated exactly once."""
    torch.manual_seed(3)
    small = [leaf(torch.randn(97 + i % 7, device=backend)) for i in range(1200)]
    big = leaf(torch.randn(1100 * CHUNK + 5, device=backend))
    groups = [{"params": small[30 * k:30 * (k + 1)], "lr": 1e-3 * (1 + k)} for k in range(40)]
    groups[20]["params"].append(big)
    run_parity(name, groups, steps=3, **({"momentum": 0.9} if name == "sgd" else {}))


@on_device
def test_mixed_dtypes_in_one_optimizer_match_one_dtype_each(backend):
    """One call with four dtypes (one launch each) gives what four single-dtype optimizers give."""
    torch.manual_seed(10)
    dtypes = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
    values = [torch.randn(300, device=backend).to(d) for d in dtypes]
    mixed = [leaf(v.clone()) for v in values]
    alone = [leaf(v.clone()) for v in values]
    opt = lrfuse.FusedAdam(mixed, lr=1e-2, weight_decay=0.01)
    opts = [lrfuse.FusedAdam([p], lr=1e-2, weight_decay=0.01) for p in alone]
    for _ in range(5):
        for p, q in zip(mixed, alone):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        opt.step()
        for o in opts:
            o.step()
    for p, q, o in zip(mixed, alone, opts):
        assert torch.equal(p, q), p.dtype
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p][key], o.state[q][key]), (p.dtype, key)


@pytest.mark.cuda
@needs_cuda
def test_cuda_graph_replays_a_step_with_a_new_lr():
    """A captured step, replayed with new gradients and a new lr (tensor, fill_) each time,
    follows torch.optim.Adam step by step: the kernel reads lr and step on the device."""
    torch.manual_seed(5)
    shapes = [(64, 32), (32,), (3 * CHUNK,), (7, 5)]
    params = [leaf(torch.randn(s, device=DEV)) for s in shapes]
    ref = [clone_like(p) for p in params]
    lrs = [torch.tensor(1e-2, device=DEV), torch.tensor(3e-3, device=DEV)]  # on the device: graph-safe
    opt = lrfuse.FusedAdam([{"params": params[:2], "lr": lrs[0]}, {"params": params[2:], "lr": lrs[1]}],
                           weight_decay=0.01)
    oracle = torch.optim.Adam([{"params": ref[:2]}, {"params": ref[2:], "lr": 3e-3}], lr=1e-2, weight_decay=0.01,
                              foreach=False)
    grads = [torch.zeros_like(p) for p in params]
    for p, g in zip(params, grads):
        p.grad = g  # static gradients: the graph reads these addresses

    def set_grads():
        for g, q in zip(grads, ref):
            g.copy_(torch.randn_like(g))
            q.grad = g.clone()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: state, plan and hyper table exist before capture
        for _ in range(3):
            set_grads()
            opt.step()
            oracle.step()
    torch.cuda.current_stream().wait_stream(side)
    assert_same(opt, oracle, params, ref, FP32, "warm-up")

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for step in range(6):
        lr0, lr1 = 1e-2 * 0.7**step, 3e-3 * 0.5**step
        opt.param_groups[0]["lr"].fill_(lr0)  # what torch's schedulers do to a tensor lr
        opt.param_groups[1]["lr"].fill_(lr1)
        oracle.param_groups[0]["lr"], oracle.param_groups[1]["lr"] = lr0, lr1
        set_grads()
        graph.replay()
        oracle.step()
        torch.cuda.synchronize()
        assert_same(opt, oracle, params, ref, FP32, f"replay {step}")
    assert opt.state[params[2]]["step"].item() == 9  # 3 warm-up steps + 6 replays; the capture ran nothing


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("name", list(PAIRS))
def test_compiled_step_does_not_recompile_when_lr_changes(name):
    torch.manual_seed(6)
    run_compiled_with_lr_changes([leaf(torch.randn(6, 4, device=DEV)), leaf(torch.randn(2 * CHUNK, device=DEV))],
                                 name)


def amp_model(dev: torch.device):
    torch.manual_seed(7)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)).to(dev)
    model.register_parameter("big", torch.nn.Parameter(torch.randn(2 * CHUNK + 1, device=dev)))
    return model


@on_device
def test_grad_scaler_with_an_inf_gradient_changes_nothing(backend):
    dev = backend
    model = amp_model(dev)
    opt = lrfuse.FusedAdam(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler(dev.type)
    x = torch.randn(8, 4, device=dev)

    def loss():
        return model(x).sum() + model.big.square().sum()

    scaler.scale(loss()).backward()
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()
    before = {p: {k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()}
    values = [p.detach().clone() for p in model.parameters()]
    scaler.scale(loss()).backward()
    model[0].weight.grad[0, 0] = float("inf")
    scaler.step(opt)
    scaler.update()
    for p, v in zip(model.parameters(), values):
        assert torch.equal(p, v)
        for key, value in before[p].items():
            assert torch.equal(opt.state[p][key], value), key
        assert opt.state[p]["step"].item() == 1


@on_device
@pytest.mark.parametrize("name", list(PAIRS))
def test_grad_scaler_unscales_inside_the_kernel(name, backend):
    """With a finite scaled gradient the fused step equals torch's on the true gradient."""
    fused_cls, torch_cls = PAIRS[name]
    dev = backend
    model = amp_model(dev)
    ref_model = amp_model(dev)
    opt = fused_cls(model.parameters(), lr=1e-2)
    ref_opt = torch_cls(ref_model.parameters(), lr=1e-2, foreach=False)
    scaler = torch.amp.GradScaler(dev.type, init_scale=2.0**10)
    x = torch.randn(8, 4, device=dev)
    for _ in range(3):
        opt.zero_grad()
        ref_opt.zero_grad()
        scaler.scale(model(x).sum() + model.big.square().sum()).backward()
        scaler.step(opt)
        scaler.update()
        (ref_model(x).sum() + ref_model.big.square().sum()).backward()
        ref_opt.step()
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, **FP32)


@on_device
def test_hyper_table_is_one_tensor_updated_in_place(backend):
    dev = backend
    """A captured graph keeps the table's address: float changes are written into it."""
    p = leaf(torch.randn(4, device=dev))
    opt = lrfuse.FusedAdam([p], lr=1e-3)
    table = opt._hyper(dev)
    opt.param_groups[0]["lr"] = 5e-3
    assert opt._hyper(dev) is table
    assert table[0, 0].item() == 5e-3


HUGE = 2**31 + 4099  # elements: offsets past 2^31 need 64-bit indexing


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA or torch.cuda.mem_get_info()[0] < 24 * 2**30,
                    reason="needs 24 GiB of free GPU memory")
def test_tensor_over_2_31_elements():
    """A bf16 parameter of more than 2^31 elements: the update at its start, around 2^31 and at
    its end equals torch's float32 Adam on those elements, rounded (elementwise math)."""
    torch.manual_seed(11)
    p = torch.randn(HUGE, device=DEV, dtype=torch.bfloat16).requires_grad_()
    p.grad = torch.randn(HUGE, device=DEV, dtype=torch.bfloat16)
    spans = [slice(0, 1000), slice(2**31 - 500, 2**31 + 500), slice(HUGE - 1000, HUGE)]
    ref = [leaf(p.detach()[s].float()) for s in spans]
    for q, s in zip(ref, spans):
        q.grad = p.grad[s].float()
    opt = lrfuse.FusedAdam([p], lr=1e-2)
    oracle = torch.optim.Adam(ref, lr=1e-2, foreach=False)
    opt.step()
    oracle.step()
    for q, s in zip(ref, spans):
        torch.testing.assert_close(p.detach()[s].float(), q.to(torch.bfloat16).float(), rtol=ULP[torch.bfloat16],
                                   atol=1e-6)
    assert opt.state[p]["step"].item() == 1
