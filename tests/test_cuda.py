"""The CUDA backend: parity with torch.optim, CPU vs CUDA, CUDA graphs, compile, AMP.

Tests taking the ``dev`` fixture run twice: on the GPU ("cuda", marked and skipped without one),
and "emulated": the CUDA backend's own code from tensor lists to launches (csrc/cuda/fused_call.h)
and of each block (csrc/cuda/kernels.h), built for the host by tests/cuda_emulator.cpp and run on
CPU tensors, block after block. That runs everywhere, CI included; what only a GPU can show
(its memory accesses and rounding, races, graphs, compile) is in the tests marked ``cuda``.
On a GPU machine: ``python -m pytest -m cuda tests`` (or benchmarks/gpu_check.sh).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

import lrfuse
from lrfuse import ops
from lrfuse.optim.adam import _AdamStep
from parity import (FP32, PAIRS, ULP, assert_same, clone_like, leaf, run_compiled_with_lr_changes, run_low_precision,
                    run_parity)

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
DEV = torch.device("cuda", 0)
CHUNK = 65536  # kChunkSize in csrc/cuda/launch_plan.h: bigger tensors span several blocks


@pytest.fixture(scope="session")
def cuda_emulator(tmp_path_factory):
    """tests/cuda_emulator.cpp, compiled against the torch in use (~30 s, once per session)."""
    if not cpp_extension.is_ninja_available():
        pytest.skip("building the CUDA emulator needs ninja")
    root = Path(__file__).resolve().parents[1]
    return cpp_extension.load(name="lrfuse_cuda_emulator", sources=[str(root / "tests" / "cuda_emulator.cpp")],
                              extra_include_paths=[str(root / "csrc")], extra_cflags=["-O2"],
                              build_directory=str(tmp_path_factory.mktemp("cuda_emulator")))


@pytest.fixture(params=[pytest.param("cuda", marks=[pytest.mark.cuda, needs_cuda]), "emulated"])
def dev(request, monkeypatch) -> torch.device:
    """Where the CUDA backend runs: the GPU, or the host (lrfuse's classes call the emulator)."""
    if request.param == "cuda":
        return DEV
    emulator = request.getfixturevalue("cuda_emulator")
    monkeypatch.setattr(_AdamStep, "_op", staticmethod(emulator.fused_adam_))
    monkeypatch.setattr(lrfuse.FusedRMSprop, "_op", staticmethod(emulator.fused_rmsprop_))
    return torch.device("cpu")


@pytest.mark.cuda
@needs_cuda
def test_cuda_kernels_are_built():
    """Without them every test below would silently run the pure-PyTorch reference."""
    assert ops.backend(DEV) == "native", "build with LRFUSE_CUDA=1 (lrfuse._C.with_cuda is 0)"


def device_groups(name: str, dev: torch.device) -> list[dict]:
    """Three groups with their own lr / betas (alpha) / eps / weight decay, and tensors that take
    every path of the kernel: aligned vectors, a scalar tail, an unaligned start, several chunks,
    zero elements, a transposed weight and a non-dense slice (contiguous temporaries)."""
    torch.manual_seed(0)
    tensors = [
        torch.randn(16, 8, device=dev),
        torch.randn(8, device=dev),
        torch.randn(33, device=dev),                         # tail after the vectors
        torch.randn(1025, device=dev)[1:],                   # 4-byte offset: the scalar path
        torch.randn(2 * CHUNK + 123, device=dev),            # three chunks: the late step update
        torch.randn(0, device=dev),                          # no elements; its step still advances
        torch.randn(12, 9, device=dev).t(),                  # dense, strides unlike its gradient's
        torch.randn(10, 6, device=dev)[:, ::2],              # not dense
    ]
    ps = [leaf(t) for t in tensors]
    if name == "rmsprop":
        extra = [{"alpha": 0.9, "eps": 1e-6}, {"weight_decay": 0.1, "alpha": 0.95}, {"lr": 3e-3}]
    else:
        extra = [{"betas": (0.8, 0.99), "eps": 1e-6}, {"weight_decay": 0.1, "betas": (0.9, 0.95)}, {"eps": 1e-4}]
    return [
        {"params": ps[0:3], "lr": 1e-2, **extra[0]},
        {"params": ps[3:6], "lr": 3e-4, **extra[1]},
        {"params": ps[6:8], **extra[2]},
    ]


def some_missing(step: int, i: int) -> bool:
    """Tensor 1 has no gradient every third step, tensor 4 (several chunks) every fourth."""
    return not ((i == 1 and step % 3 == 0) or (i == 4 and step % 4 == 1))


@pytest.mark.parametrize("name", ["adam", "adamw", "rmsprop"])
def test_groups_with_own_hyperparameters(name, dev):
    run_parity(name, device_groups(name, dev), steps=25, has_grad=some_missing)


@pytest.mark.parametrize("name", ["adam", "adamw"])
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("maximize", [False, True])
def test_adam_flags(name, amsgrad, maximize, dev):
    run_parity(name, device_groups(name, dev), has_grad=some_missing, amsgrad=amsgrad, maximize=maximize,
               weight_decay=0.05)


@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("maximize", [False, True])
def test_rmsprop_flags(centered, momentum, maximize, dev):
    run_parity("rmsprop", device_groups("rmsprop", dev), has_grad=some_missing, centered=centered,
               momentum=momentum, maximize=maximize)


def test_gradients_in_the_parameters_layout(dev):
    """Gradients laid out like their parameters (transposed like it): the fused path, no copies."""
    run_parity("adam", device_groups("adam", dev), grad_like=lambda p: torch.randn_like(p), amsgrad=True)


def test_groups_may_differ_in_amsgrad(dev):
    torch.manual_seed(1)
    groups = [{"params": [leaf(torch.randn(10, device=dev))], "amsgrad": True},
              {"params": [leaf(torch.randn(4, 4, device=dev))]}]
    run_parity("adam", groups, lr=1e-2)


def test_tensor_lr_on_the_device(dev):
    torch.manual_seed(2)
    run_parity("adam", [{"params": [leaf(torch.randn(20, device=dev))]}],
               lr=torch.tensor(0.01, device=dev))


@pytest.mark.parametrize("name", ["adam", "rmsprop"])
def test_float64_default_dtype_keeps_step_float64(name, dev):
    """torch keeps `step` in float64 under a float64 default dtype; the kernels count on a float32
    copy, for a block-owned step and for a late one (a tensor of several chunks)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(4)
        params = [leaf(torch.randn(33, device=dev)), leaf(torch.randn(2 * CHUNK + 5, device=dev))]
        fused, oracle = run_parity(name, [{"params": params}], steps=3)
        for p in params:
            assert fused.state[p]["step"].dtype == torch.float64 and float(fused.state[p]["step"]) == 3
    finally:
        torch.set_default_dtype(old)


def test_more_tensors_and_chunks_than_one_launch_holds(dev):
    """1,200 small tensors in 40 groups and one tensor of 1,100 chunks: the launches split
    between tensors and inside a tensor, and every tensor is updated exactly once."""
    torch.manual_seed(3)
    small = [leaf(torch.randn(97 + i % 7, device=dev)) for i in range(1200)]
    big = leaf(torch.randn(1100 * CHUNK + 5, device=dev))
    groups = [{"params": small[30 * k:30 * (k + 1)], "lr": 1e-3 * (1 + k)} for k in range(40)]
    groups[20]["params"].append(big)
    run_parity("adam", groups, steps=3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["adam", "adamw", "rmsprop"])
def test_low_precision_matches_fp32_math(name, dtype, dev):
    torch.manual_seed(9)
    run_low_precision(name, [leaf(torch.randn(257, device=dev).to(dtype)),
                             leaf(torch.randn(16, 9, device=dev).to(dtype).t()),
                             leaf(torch.randn(CHUNK + 9, device=dev).to(dtype))])


def test_mixed_dtypes_in_one_optimizer_match_one_dtype_each(dev):
    """One call with four dtypes (one launch each) gives what four single-dtype optimizers give."""
    torch.manual_seed(10)
    dtypes = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
    values = [torch.randn(300, device=dev).to(d) for d in dtypes]
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


def op_args(name: str, device: torch.device, dtype: torch.dtype):
    """Arguments of one native call: two groups, one non-contiguous tensor, every optional state."""
    g = torch.Generator().manual_seed(4)
    shapes = [(70000,), (33,), (9, 5)]
    params = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    grads = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    state = lambda: [torch.rand(s, generator=g, dtype=torch.float64) for s in shapes]  # noqa: E731
    if name == "adam":
        states = [state(), state(), state()]
        hyper = [[1e-3, 0.9, 0.999, 1e-8, 0.01, 0.0, 1.0], [1e-2, 0.8, 0.99, 1e-6, 0.1, 1.0, 0.0]]
    else:
        # square_avg well above grad_avg**2: the centered variance stays positive (no NaN).
        states = [[t + 0.5 for t in state()], state(),
                  [torch.randn(s, generator=g, dtype=torch.float64) * 0.01 for s in shapes]]
        hyper = [[1e-3, 0.99, 1e-8, 0.01, 0.9, 0.0], [1e-2, 0.9, 1e-6, 0.0, 0.5, 1.0]]

    def place(t: torch.Tensor, i: int) -> torch.Tensor:
        t = t.to(device=device, dtype=dtype)
        return t.t().contiguous().t() if i == 2 else t  # a column-major matrix

    return (
        [place(t, i) for i, t in enumerate(params)],
        [place(t, i) for i, t in enumerate(grads)],
        *[[place(t, i) for i, t in enumerate(lst)] for lst in states],
        [torch.full((), 4.0, device=device) for _ in shapes],
        [0, 1, 1],
        torch.tensor(hyper, dtype=torch.float64, device=device),
        torch.full((), 8.0, device=device),  # grad_scale
        torch.zeros((), device=device),      # found_inf
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("name", ["adam", "rmsprop"])
def test_cpu_and_cuda_kernels_agree(name, dtype, dev):
    cpu_op = getattr(torch.ops.lrfuse, f"fused_{name}_")
    cuda_op = (_AdamStep if name == "adam" else lrfuse.FusedRMSprop)._op  # the emulator's where it runs
    cpu, gpu = op_args(name, torch.device("cpu"), dtype), op_args(name, dev, dtype)
    for _ in range(1 if dtype == torch.bfloat16 else 3):  # one step: a rounding tie may differ by an ulp
        cpu_op(*cpu)
        cuda_op(*gpu)
    tol = {torch.float32: FP32, torch.float64: {"rtol": 1e-12, "atol": 1e-12},
           torch.bfloat16: {"rtol": ULP[torch.bfloat16], "atol": 1e-6}}[dtype]
    for i, (mine, theirs) in enumerate(zip(cpu, gpu)):
        if isinstance(mine, list) and mine and isinstance(mine[0], torch.Tensor):
            for a, b in zip(mine, theirs):
                torch.testing.assert_close(b.cpu(), a, **tol, msg=lambda m: f"argument {i}: {m}")
    assert all(s.item() == (5.0 if dtype == torch.bfloat16 else 7.0) for s in gpu[5])


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
def test_compiled_step_does_not_recompile_when_lr_changes():
    torch.manual_seed(6)
    run_compiled_with_lr_changes([leaf(torch.randn(6, 4, device=DEV)), leaf(torch.randn(2 * CHUNK, device=DEV))])


def amp_model(dev: torch.device):
    torch.manual_seed(7)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)).to(dev)
    model.register_parameter("big", torch.nn.Parameter(torch.randn(2 * CHUNK + 1, device=dev)))
    return model


def test_grad_scaler_with_an_inf_gradient_changes_nothing(dev):
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


@pytest.mark.parametrize("name", ["adam", "rmsprop"])
def test_grad_scaler_unscales_inside_the_kernel(name, dev):
    """With a finite scaled gradient the fused step equals torch's on the true gradient."""
    fused_cls, torch_cls = PAIRS[name]
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


def test_hyper_table_is_one_tensor_updated_in_place(dev):
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
