"""Fused optimizers vs torch.optim (for-loop) on the CPU: parameters and state, every step."""

from __future__ import annotations

import pytest
import torch

import lrfuse
from parity import clone_like, leaf, run_low_precision, run_parity, step_both


@pytest.fixture(params=["native", "reference"], autouse=True)
def backend(request, monkeypatch):
    """Every parity test runs on the compiled kernel and on the pure-PyTorch fallback."""
    if request.param == "native" and lrfuse.ops.backend("cpu") != "native":
        pytest.skip("lrfuse._C is not built")
    monkeypatch.setattr(lrfuse.ops, "_forced", None if request.param == "native" else "reference")
    return request.param


def three_groups(name: str) -> list[dict]:
    """Three groups, each with its own lr and other hyper-parameters."""
    torch.manual_seed(0)
    shapes = [(16, 8), (8,), (33,), (5, 7, 3), (1000,), (2,)]
    ps = [leaf(torch.randn(s)) for s in shapes]
    if name == "rmsprop":
        extra = [{"alpha": 0.9, "eps": 1e-6}, {"weight_decay": 0.1, "alpha": 0.95}, {"lr": 3e-3}]
    else:
        extra = [{"betas": (0.8, 0.99), "eps": 1e-6}, {"weight_decay": 0.1, "betas": (0.9, 0.95)}, {"eps": 1e-4}]
    return [
        {"params": ps[0:2], "lr": 1e-2, **extra[0]},
        {"params": ps[2:4], "lr": 3e-4, **extra[1]},
        {"params": ps[4:6], **extra[2]},
    ]


@pytest.mark.parametrize("name", ["adam", "adamw", "rmsprop"])
def test_groups_with_own_hyperparameters(name):
    run_parity(name, three_groups(name))


@pytest.mark.parametrize("name", ["adam", "adamw"])
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("maximize", [False, True])
def test_adam_flags(name, amsgrad, maximize):
    run_parity(name, three_groups(name), amsgrad=amsgrad, maximize=maximize, weight_decay=0.05)


@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("maximize", [False, True])
def test_rmsprop_flags(centered, momentum, maximize):
    run_parity("rmsprop", three_groups("rmsprop"), centered=centered, momentum=momentum, maximize=maximize)


def test_groups_may_differ_in_amsgrad():
    torch.manual_seed(1)
    groups = [{"params": [leaf(torch.randn(10))], "amsgrad": True}, {"params": [leaf(torch.randn(4, 4))]}]
    run_parity("adam", groups, lr=1e-2)


def strided_params() -> list[torch.Tensor]:
    torch.manual_seed(2)
    return [
        leaf(torch.randn(7, 5).t()),               # transposed: dense, not contiguous
        leaf(torch.randn(10, 8)[:, ::2]),          # sliced: not dense
        leaf(torch.randn(3, 4, 5).permute(2, 0, 1)),
        leaf(torch.randn(6, 1, 4)),                # size-1 dim
        leaf(torch.randn(())),                     # 0-d
    ]


@pytest.mark.parametrize("name", ["adam", "adamw", "rmsprop"])
def test_non_contiguous_params(name):
    run_parity(name, [{"params": strided_params()}], lr=1e-2, weight_decay=0.01)


@pytest.mark.parametrize("name", ["adam", "rmsprop"])
def test_grad_strides_differ_from_param(name):
    """A transposed weight with a contiguous gradient (and the reverse): torch's own fused CPU Adam
    gets this wrong; lrfuse must not."""
    torch.manual_seed(3)
    params = [leaf(torch.randn(9, 4).t()), leaf(torch.randn(4, 9)), leaf(torch.randn(2, 3, 4))]

    def odd_grad(p):
        # Contiguous for the transposed weight; dims reversed in memory for contiguous ones.
        if not p.is_contiguous():
            g = torch.randn(p.shape)
        else:
            g = torch.randn(tuple(reversed(p.shape))).permute(*reversed(range(p.dim())))
        assert g.stride() != p.stride()
        return g

    kwargs = {"momentum": 0.9} if name == "rmsprop" else {"amsgrad": True}
    run_parity(name, [{"params": params}], grad_like=odd_grad, lr=1e-2, **kwargs)


@pytest.mark.parametrize("name", ["adam", "rmsprop"])
def test_zero_size_param(name):
    torch.manual_seed(4)
    run_parity(name, [{"params": [leaf(torch.randn(0, 3)), leaf(torch.randn(5))]}])


@pytest.mark.parametrize("name", ["adam", "adamw", "rmsprop"])
def test_grad_none_at_some_steps(name):
    """A parameter without a gradient is skipped and its step does not advance."""
    fused, _ = run_parity(name, three_groups(name), has_grad=lambda step, i: (step + i) % 3 != 0)
    steps = [fused.state[p]["step"].item() for g in fused.param_groups for p in g["params"]]
    assert steps == [sum((s + i) % 3 != 0 for s in range(20)) for i in range(6)]


@pytest.mark.parametrize("name", ["adam", "rmsprop"])
def test_frozen_then_unfrozen_layer(name):
    """Parameters 0-1 get no gradient for 8 steps (frozen), then train: no state until then."""
    fused, _ = run_parity(name, three_groups(name), has_grad=lambda step, i: i > 1 or step >= 8)
    first = fused.param_groups[0]["params"][0]
    assert fused.state[first]["step"].item() == 12


@pytest.mark.parametrize("name", ["adam", "rmsprop"])
def test_complex_params(name):
    torch.manual_seed(5)
    run_parity(name, [{"params": [leaf(torch.randn(6, 3, dtype=torch.complex64)), leaf(torch.randn(4))]}],
               weight_decay=0.1)


@pytest.mark.parametrize("name", ["adam", "rmsprop"])
def test_float64(name):
    torch.manual_seed(6)
    run_parity(name, [{"params": [leaf(torch.randn(64, dtype=torch.float64))]}],
               tol={"rtol": 1e-12, "atol": 1e-12})


def test_lr_change_between_steps_takes_effect():
    """Schedulers write param_groups[i]["lr"]; the next step must use the new value."""
    torch.manual_seed(7)
    groups = three_groups("adam")
    ref_groups = [{**g, "params": [clone_like(p) for p in g["params"]]} for g in groups]
    fused, oracle = lrfuse.FusedAdam(groups), torch.optim.Adam(ref_groups, foreach=False)
    params = [p for g in fused.param_groups for p in g["params"]]
    ref_params = [p for g in oracle.param_groups for p in g["params"]]
    for step in range(10):
        for opt in (fused, oracle):
            for k, group in enumerate(opt.param_groups):
                group["lr"] = 1e-2 * 0.7**step * (k + 1)
        step_both(params, ref_params, fused, oracle, f"step {step}")


def test_every_kind_of_hyperparameter_change_takes_effect():
    """What schedulers and users do between steps: a new number, a tensor lr changed in place
    (and later replaced), a new betas tuple (OneCycleLR's momentum), betas as a list edited in
    place, weight decay switched on, a number set back to a value it had before."""
    torch.manual_seed(11)
    params = [leaf(torch.randn(12)), leaf(torch.randn(5, 3))]
    ref = [clone_like(p) for p in params]
    groups = [{"params": [params[0]], "lr": torch.tensor(0.01)}, {"params": [params[1]], "betas": [0.9, 0.999]}]
    ref_groups = [{"params": [ref[0]], "lr": 0.01}, {"params": [ref[1]], "betas": (0.9, 0.999)}]
    fused, oracle = lrfuse.FusedAdamW(groups, lr=0.02), torch.optim.AdamW(ref_groups, lr=0.02, foreach=False)
    changes = [
        lambda f, o: (f[0]["lr"].fill_(0.005), o[0].__setitem__("lr", 0.005)),
        lambda f, o: [g.__setitem__("betas", (0.8, g["betas"][1])) for g in (f[0], o[0])],
        lambda f, o: (f[1]["betas"].__setitem__(0, 0.7), o[1].__setitem__("betas", (0.7, 0.999))),
        lambda f, o: [g.__setitem__("weight_decay", 0.1) for g in (f[1], o[1])],
        lambda f, o: [g.__setitem__("lr", 0.02) for g in (f[1], o[1])],
        lambda f, o: (f[0].__setitem__("lr", torch.tensor(0.03)), o[0].__setitem__("lr", 0.03)),
        lambda f, o: [g.__setitem__("lr", 0.01) for g in (f[1], o[1])],
    ]
    for step in range(2 * len(changes)):
        if step % 2 == 1:  # a step with the change, then one without
            changes[step // 2](fused.param_groups, oracle.param_groups)
        step_both(params, ref, fused, oracle, f"step {step}")


def test_tensor_lr():
    torch.manual_seed(8)
    run_parity("adam", [{"params": [leaf(torch.randn(20))]}], lr=torch.tensor(0.01))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["adam", "adamw", "rmsprop"])
def test_low_precision_matches_fp32_math(name, dtype):
    torch.manual_seed(9)
    run_low_precision(name, [leaf(torch.randn(257).to(dtype)), leaf(torch.randn(16, 9).to(dtype).t())])


def test_mixed_dtypes_in_one_optimizer():
    torch.manual_seed(10)
    params = [leaf(torch.randn(50)), leaf(torch.randn(50, dtype=torch.float64)), leaf(torch.randn(50).bfloat16())]
    fused = lrfuse.FusedAdam(params, lr=1e-2)
    for p in params:
        p.grad = torch.randn_like(p)
    before = [p.detach().clone() for p in params]
    fused.step()
    for p, b in zip(params, before):
        assert not torch.equal(p, b)
        assert fused.state[p]["exp_avg"].dtype == p.dtype


def test_closure_is_called_with_grad_enabled():
    model = torch.nn.Linear(3, 1)
    opt = lrfuse.FusedAdam(model.parameters())

    def closure():
        opt.zero_grad()
        loss = model(torch.ones(2, 3)).sum()
        loss.backward()
        return loss

    assert isinstance(opt.step(closure), torch.Tensor)
    assert opt.state[model.weight]["step"].item() == 1
