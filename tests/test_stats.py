"""The fused step measures itself (``track_stats=True``): each group's update, parameter and
gradient norms and its count of non-finite gradient elements, from the kernel's own pass,
against the same figures computed with torch from the parameters before and after the step.

Every algorithm of ``parity.ALGORITHMS`` on every backend: the native CPU kernels, the
reference path and the CUDA kernels (emulated here, and the GPU where there is one).
"""

from __future__ import annotations

import pytest
import torch

import lrfuse
from parity import ALGORITHMS, LR, leaf, op_args

KEYS = ("update_norm", "param_norm", "grad_norm", "nonfinite", "update_ratio")


def _groups(device: torch.device) -> list[dict]:
    """Four groups: float32 tensors of several tiles (one transposed, so its gradient's layout
    differs from it), float64 and complex tensors, bfloat16 and float16 tensors, and one group
    that gets no gradient."""
    g = torch.Generator().manual_seed(0)

    def make(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)

    return [
        {"params": [leaf(make(40000)), leaf(make(60, 70).t()), leaf(make(3))], "lr": LR_SCALE[0]},
        {"params": [leaf(make(300, dtype=torch.float64)), leaf(torch.view_as_complex(make(50, 2)))], "lr": LR_SCALE[1]},
        {"params": [leaf(make(500, dtype=torch.bfloat16)), leaf(make(200, dtype=torch.float16))], "lr": LR_SCALE[2]},
        {"params": [leaf(make(10))], "lr": LR_SCALE[3]},
    ]


LR_SCALE = (1.0, 0.5, 0.25, 1.0)  # times the algorithm's suite LR


def _make(name: str, device: torch.device, **kwargs):
    a = ALGORITHMS[name]
    groups = _groups(device)
    for group in groups:
        group["lr"] *= LR[name]
    return a.fused(groups, track_stats=True, **{**a.low_precision, **kwargs})


def _set_grads(opt, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for group in opt.param_groups[:-1]:  # the last group gets no gradient
        for p in group["params"]:
            p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype).to(p.device)
    for p in opt.param_groups[-1]["params"]:
        p.grad = None


def _expected(before: list[list[torch.Tensor]], opt) -> list[dict]:
    """Each group's figures computed with torch, in float64."""
    out = []
    for group, old in zip(opt.param_groups, before):
        def norm(ts):
            return sum((t.to(torch.complex128 if t.is_complex() else torch.float64).abs() ** 2).sum().item()
                       for t in ts) ** 0.5

        grads = [p.grad for p in group["params"] if p.grad is not None]
        used = [p for p in group["params"] if p.grad is not None]
        old_used = [o for o, p in zip(old, group["params"]) if p.grad is not None]
        update = norm([p.detach().to(torch.complex128 if p.is_complex() else torch.float64)
                       - o.to(torch.complex128 if o.is_complex() else torch.float64) for p, o in zip(used, old_used)])
        param = norm(old_used)
        nonfinite = sum(int((~torch.view_as_real(g).isfinite() if g.is_complex() else ~g.isfinite()).sum())
                        for g in grads)
        out.append({"update_norm": update, "param_norm": param, "grad_norm": norm(grads), "nonfinite": nonfinite,
                    "update_ratio": update / param if param else 0.0})
    return out


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_stats_are_the_norms_torch_computes(name, backend):
    opt = _make(name, backend)
    for step in range(3):
        _set_grads(opt, step)
        before = [[p.detach().clone() for p in g["params"]] for g in opt.param_groups]
        opt.step()
        got, want = opt.group_stats(), _expected(before, opt)
        assert len(got) == len(opt.param_groups)
        for k, (mine, theirs) in enumerate(zip(got, want)):
            assert mine["skipped"] is False
            assert mine["nonfinite"] == theirs["nonfinite"] == 0
            for key in ("update_norm", "param_norm", "grad_norm", "update_ratio"):
                assert mine[key] == pytest.approx(theirs[key], rel=1e-6, abs=1e-12), (step, k, key, mine, theirs)
        assert got[-1] == {**dict.fromkeys(KEYS, 0.0), "nonfinite": 0, "skipped": False}  # no gradient
        assert got[0]["update_norm"] > 0 and got[0]["grad_norm"] > 0
        tensor = opt.group_stats_tensor()
        assert tensor.dtype == torch.float64 and tensor.shape == (len(opt.param_groups), len(KEYS))
        assert tensor.tolist() == [[row[k] for k in KEYS] for row in got]


@pytest.mark.parametrize("name", ["adam", "sgd"])
def test_nonfinite_gradients_are_counted(name):
    opt = _make(name, torch.device("cpu"))
    _set_grads(opt, 0)
    big = opt.param_groups[0]["params"][0]
    big.grad[[7, 30000]] = torch.tensor([float("inf"), float("nan")])
    opt.param_groups[2]["params"][0].grad[3] = float("-inf")  # bfloat16
    opt.step()
    assert [s["nonfinite"] for s in opt.group_stats()] == [2, 0, 1, 0]


def _many_tensors(device: torch.device) -> list[dict]:
    """Two groups, interleaved: 700 small tensors (past one CUDA launch's ~500 tensor slots) and
    one of 200,000 elements (four CUDA blocks), so sums cross blocks and launches."""
    g = torch.Generator().manual_seed(1)
    small = [leaf(torch.randn(8, generator=g).to(device)) for _ in range(700)]
    big = leaf(torch.randn(200_000, generator=g).to(device))
    return [{"params": small[0::2], "lr": 1e-2}, {"params": [*small[1::2], big], "lr": 3e-3}]


def _measured_step(device: torch.device) -> tuple[torch.Tensor, list[torch.Tensor]]:
    opt = lrfuse.FusedAdam(_many_tensors(device), track_stats=True)
    g = torch.Generator().manual_seed(2)
    for p in (p for group in opt.param_groups for p in group["params"]):
        p.grad = torch.randn(p.shape, generator=g).to(device)
    opt.step()
    return opt.group_stats_tensor().cpu(), [p.detach().cpu() for group in opt.param_groups for p in group["params"]]


def test_sums_across_blocks_and_launches_are_the_same_bits_every_run(backend, monkeypatch):
    stats, params = _measured_step(backend)
    again, _ = _measured_step(backend)
    assert torch.equal(stats, again)
    monkeypatch.undo()  # the native CPU kernels, checked against torch above, as the yardstick
    want, want_params = _measured_step(torch.device("cpu"))
    torch.testing.assert_close(stats, want, rtol=1e-6, atol=0)
    for p, q in zip(params, want_params):
        torch.testing.assert_close(p, q)


def test_a_skipped_step_adds_nothing_to_the_stats(backend):
    args = list(op_args(lrfuse.ops.RULES["adam"], backend))
    args[-1] = torch.ones((), device=backend)  # found_inf
    params = [p.clone() for p in args[0]]
    stats = torch.full((2, len(lrfuse.ops.STAT_COLUMNS)), 7.0, dtype=torch.float64, device=backend)
    lrfuse.FusedAdam._op(*args, stats)
    assert torch.equal(stats, torch.full_like(stats, 7.0))
    assert all(torch.equal(p, q) for p, q in zip(params, args[0]))


def test_the_same_step_gives_the_same_bits_at_any_thread_count():
    def measured(threads: int) -> torch.Tensor:
        torch.set_num_threads(threads)  # restored by conftest's autouse fixture
        opt = _make("adam", torch.device("cpu"))
        _set_grads(opt, 0)
        opt.step()
        return opt.group_stats_tensor()

    once = measured(2)
    assert torch.equal(once, measured(2))
    assert torch.equal(once, measured(1))


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_threads_split_the_tiles_by_elements_and_sum_each_once(threads):
    # Tensors of many tiles beside one-tile and empty ones, in two interleaved groups: the
    # threads' shares of the element space start inside tiles and inside tensors.
    torch.set_num_threads(threads)  # restored by conftest's autouse fixture
    g = torch.Generator().manual_seed(3)
    sizes = [70_001, 5, 0, 16_384, 100_000, 1, 33_000, 0, 250, 16_385]
    params = [leaf(torch.randn(n, generator=g)) for n in sizes]
    opt = lrfuse.FusedSGD([{"params": params[0::2]}, {"params": params[1::2], "lr": 0.3}], lr=0.1, momentum=0.9,
                          track_stats=True)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    before = [[p.detach().clone() for p in group["params"]] for group in opt.param_groups]
    opt.step()
    got, want = opt.group_stats(), _expected(before, opt)
    for mine, theirs in zip(got, want):
        for key in ("update_norm", "param_norm", "grad_norm"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-6), (key, mine, theirs)


def test_gradscaler_unscaled_norms_and_a_skipped_step():
    # A real GradScaler on the CPU: the kernel unscales, and a step with an inf gradient is
    # skipped and reports zeros, saying so.
    torch.manual_seed(0)
    model = torch.nn.Linear(30, 20)
    opt = lrfuse.FusedAdam(model.parameters(), lr=1e-2, track_stats=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x = torch.randn(8, 30)
    scaler.scale(model(x).square().mean()).backward()
    grads = [p.grad.clone() / 1024.0 for p in model.parameters()]
    scaler.step(opt)
    scaler.update()
    (stats,) = opt.group_stats()
    want = sum(g.double().square().sum() for g in grads).sqrt().item()
    assert stats["grad_norm"] == pytest.approx(want, rel=1e-5) and stats["skipped"] is False

    opt.zero_grad()
    scaler.scale(model(x).square().mean()).backward()
    model.weight.grad[0, 0] = float("inf")
    before = [p.detach().clone() for p in model.parameters()]
    scaler.step(opt)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert opt.group_stats() == [{**dict.fromkeys(KEYS, 0.0), "nonfinite": 0, "skipped": True}]


def test_without_track_stats_nothing_is_measured_and_asking_says_how():
    opt = lrfuse.FusedAdam([leaf(torch.randn(4))], lr=1e-3)
    opt.param_groups[0]["params"][0].grad = torch.randn(4)
    opt.step()
    assert opt._stats == {}
    with pytest.raises(RuntimeError, match="track_stats=True"):
        opt.group_stats()
    with pytest.raises(TypeError, match="track_stats must be True or False"):
        lrfuse.FusedAdam([leaf(torch.randn(4))], track_stats="yes")


def test_before_any_step_every_group_reports_zeros():
    opt = _make("rmsprop", torch.device("cpu"))
    assert opt.group_stats() == [{**dict.fromkeys(KEYS, 0.0), "nonfinite": 0, "skipped": False}] * 4


@pytest.mark.parametrize("stats", [torch.zeros(2, 3, dtype=torch.float64), torch.zeros(2, 4),
                                   torch.zeros(3, 4, dtype=torch.float64)], ids=["columns", "dtype", "rows"])
def test_a_bad_stats_table_is_refused_before_anything_is_written(stats):
    rule = lrfuse.ops.RULES["adam"]
    args = op_args(rule, torch.device("cpu"))
    params = [p.clone() for p in args[0]]
    with pytest.raises(RuntimeError, match=r"stats must be a contiguous float64 table of shape \(2, 4\)"):
        torch.ops.lrfuse.fused_adam_(*args, stats)
    assert all(torch.equal(p, q) for p, q in zip(params, args[0]))
