"""Bad input: a clear error naming the argument and the fix, and nothing half-updated."""

from __future__ import annotations

import warnings

import pytest
import torch

import lrfuse
from lrfuse.threads import torch_threads
from parity import ALGORITHMS, leaf


def snapshot(opt):
    """Values and versions (autograd's count of in-place writes) of every parameter and state tensor."""
    params = [(p.detach().clone(), p._version) for g in opt.param_groups for p in g["params"]]
    state = {id(p): {k: (v.clone(), v._version) for k, v in s.items()} for p, s in opt.state.items()}
    return params, state


def assert_unchanged(opt, before):
    params, state = before
    now = [p for g in opt.param_groups for p in g["params"]]
    for p, (value, version) in zip(now, params):
        assert torch.equal(p.detach(), value)
        assert p._version == version
    assert {id(p) for p in opt.state} == set(state)
    for p, s in opt.state.items():
        for k, v in s.items():
            value, version = state[id(p)][k]
            assert torch.equal(v, value), k
            assert v._version == version, k


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"lr": -1.0}, "Invalid learning rate: -1.0"),
        ({"eps": -1.0}, "Invalid epsilon value"),
        ({"betas": (1.0, 0.999)}, "Invalid beta parameter at index 0"),
        ({"weight_decay": -0.1}, "Invalid weight_decay value"),
        ({"differentiable": True}, "FusedAdam does not support differentiable=True; use torch.optim.Adam"),
    ],
)
def test_constructor_validation_is_torchs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lrfuse.FusedAdam([leaf(torch.randn(3))], **kwargs)


def test_rmsprop_constructor_validation_is_torchs():
    with pytest.raises(ValueError, match="Invalid alpha value"):
        lrfuse.FusedRMSprop([leaf(torch.randn(3))], alpha=-0.5)


def test_parameter_listed_twice_in_a_group():
    # torch warns that this will become an error and updates the parameter twice per step; one
    # native call cannot update a tensor twice, so lrfuse refuses it up front (README).
    p = leaf(torch.randn(3))
    with pytest.raises(ValueError, match="listed twice; pass each parameter once"):
        lrfuse.FusedAdam([p, p])


def test_parameter_in_two_groups():
    p = leaf(torch.randn(3))
    with pytest.raises(ValueError, match="some parameters appear in more than one parameter group"):
        lrfuse.FusedAdamW([{"params": [p]}, {"params": [p]}])


def trained_optimizer():
    a, b = leaf(torch.randn(4, 3)), leaf(torch.randn(5))
    opt = lrfuse.FusedAdam([{"params": [a]}, {"params": [b], "lr": 0.1}], amsgrad=True)
    a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
    opt.step()
    return opt, a, b


def test_sparse_gradient_updates_nothing():
    opt, a, b = trained_optimizer()
    before = snapshot(opt)
    a.grad = torch.randn_like(a)  # valid, in the first group: must not be applied either
    b.grad = torch.randn(5).to_sparse()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        opt.step()
    assert_unchanged(opt, before)


def test_parameter_resized_after_its_gradient_updates_nothing():
    """Model surgery through `.data` can leave a gradient of the old shape behind."""
    opt, a, b = trained_optimizer()
    a.grad = torch.randn_like(a)
    b.grad = torch.randn_like(b)
    b.data = torch.randn(6)
    before = snapshot(opt)
    # Named by the optimizer on its first step, by the native op's own check on a planned one.
    with pytest.raises(RuntimeError, match=r"gradient of shape \(5,\).* does not match its parameter \(\(6,\)"
                                           r"|grads\[1\] has shape \[5\] but params\[1\] has shape \[6\]"):
        opt.step()
    assert_unchanged(opt, before)


# The native op checks its own arguments too, for direct callers.

def op_args(n=2):
    params = [torch.randn(4, 3) for _ in range(n)]
    return dict(
        params=params,
        grads=[torch.randn_like(p) for p in params],
        exp_avg=[torch.zeros_like(p) for p in params],
        exp_avg_sq=[torch.zeros_like(p) for p in params],
        max_exp_avg_sq=[],
        steps=[torch.zeros(()) for _ in params],
        group_of=[0] * n,
        hyper=torch.tensor([[1e-3, 0.9, 0.999, 1e-8, 0.0, 0.0, 0.0]], dtype=torch.float64),
    )


native = pytest.mark.skipif(lrfuse.ops.backend("cpu") != "native", reason="lrfuse._C is not built")


@native
@pytest.mark.parametrize(
    "change, match",
    [
        (lambda a: a["grads"].pop(), "grads has 1 entries but params has 2; pass one per parameter"),
        (lambda a: a.update(max_exp_avg_sq=[torch.zeros(4, 3)]),
         r"max_exp_avg_sq has 1 entries; pass none \(feature off\) or one per parameter"),
        (lambda a: a.update(hyper=a["hyper"].float()), "hyper must be a contiguous float64 table"),
        (lambda a: a["group_of"].__setitem__(1, 3), r"group_of\[1\] is 3 but hyper has 1 rows"),
        (lambda a: a["grads"].__setitem__(1, torch.randn(3, 4)), r"grads\[1\] has shape \[3, 4\] but params\[1\]"),
        (lambda a: a["exp_avg"].__setitem__(0, torch.zeros(4, 3, dtype=torch.float64)),
         r"exp_avg\[0\] is Double but params\[0\] is Float; cast it"),
        (lambda a: a["params"].__setitem__(1, a["params"][0]), r"params\[0\] and params\[1\] share memory"),
        (lambda a: a["params"].__setitem__(1, torch.randn(1, 3).expand(4, 3)), "overlapping memory"),
        (lambda a: a["params"].__setitem__(0, torch.randn(4, 3, dtype=torch.complex64)), "view_as_real"),
        (lambda a: a["steps"].__setitem__(0, torch.zeros(2)), r"steps\[0\] must be a one-element float32 or float64 tensor"),
    ],
)
def test_op_rejects_bad_arguments_before_writing(change, match):
    args = op_args()
    change(args)
    written = [t for key in ("params", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "steps") for t in args[key]]
    before = [(t.clone(), t._version) for t in written]
    with pytest.raises(RuntimeError, match=match):
        torch.ops.lrfuse.fused_adam_(**args)
    for t, (value, version) in zip(written, before):
        assert torch.equal(t, value)
        assert t._version == version  # a refused call bumps no version either


@native
def test_op_refuses_to_write_a_tensor_that_requires_grad_under_grad_mode():
    """As torch refuses an in-place update of a leaf that requires grad; a step runs under no_grad."""
    args = op_args()
    args["params"] = [p.requires_grad_() for p in args["params"]]
    before = [(p.detach().clone(), p._version) for p in args["params"]]
    with pytest.raises(RuntimeError, match=r"fused_adam_: a tensor it writes requires grad.*torch.no_grad\(\)"):
        torch.ops.lrfuse.fused_adam_(**args)
    for p, (value, version) in zip(args["params"], before):
        assert torch.equal(p.detach(), value) and p._version == version
    with torch.no_grad():
        torch.ops.lrfuse.fused_adam_(**args)
    assert all(p._version > version for p, (_, version) in zip(args["params"], before))


@native
def test_op_names_the_first_bad_tensor_of_a_large_call():
    """A large call checks its tensors in parallel; the error is still the first bad tensor's."""
    for _ in range(5):
        args = op_args(n=3000)
        # Late in the first half, early and late in the second: with two threads the second
        # finds its error first.
        args["exp_avg"][1400] = torch.zeros(4, 3, dtype=torch.float64)
        args["grads"][1501] = torch.randn(2, 4)
        args["grads"][2900] = torch.randn(3, 4)
        message = r"exp_avg\[1400\] is Double but params\[1400\] is Float"
        with torch_threads(2), pytest.raises(RuntimeError, match=message):
            torch.ops.lrfuse.fused_adam_(**args)


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_expanded_state_updates_nothing(backend, monkeypatch):
    """State is written like the parameter: an expanded view (stride 0) would be written many times."""
    if backend == "native" and lrfuse.ops.backend("cpu") != "native":
        pytest.skip("lrfuse._C is not built")
    monkeypatch.setattr(lrfuse.ops, "_forced", None if backend == "native" else "reference")
    opt, a, b = trained_optimizer()
    opt.state[b] = {**opt.state[b], "exp_avg": torch.zeros(1).expand(5)}
    a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
    before = snapshot(opt)
    with pytest.raises(RuntimeError, match=r"exp_avg\[1\] has overlapping memory"):
        opt.step()
    assert_unchanged(opt, before)


def torch_takes_sparse_gradients(torch_cls) -> bool:
    """Whether torch's own class (for-loop) steps with a sparse gradient."""
    p = leaf(torch.randn(5))
    opt = torch_cls([p], lr=0.1, foreach=False)
    p.grad = torch.randn(5).to_sparse()
    try:
        with warnings.catch_warnings():  # torch's Adagrad: sparse invariant checks are off
            warnings.simplefilter("ignore", UserWarning)
            opt.step()
    except RuntimeError as e:
        assert "does not support sparse gradients" in str(e), e
        return False
    return True


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_sparse_gradient_names_the_fix(name):
    """torch's SGD and Adagrad take sparse gradients; the fused ones say to use those. The others
    point to SparseAdam, as torch's Adam does."""
    cls, torch_cls = ALGORITHMS[name].fused, ALGORITHMS[name].torch
    fix = (f"use torch.optim.{torch_cls.__name__}, which does" if torch_takes_sparse_gradients(torch_cls)
           else "please consider SparseAdam")
    p = leaf(torch.randn(5))
    before = p.detach().clone()
    opt = cls([p], lr=0.1)
    p.grad = torch.randn(5).to_sparse()
    with pytest.raises(RuntimeError, match=f"{cls.__name__} does not support sparse gradients, {fix}"):
        opt.step()
    assert torch.equal(p.detach(), before)
