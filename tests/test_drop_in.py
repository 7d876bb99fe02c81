"""What users do to a torch.optim optimizer besides stepping it: edit its state, reassign
parameter data, load state_dicts, pass torch's own odd inputs. Each case runs on the fused class
and on torch's for-loop class alike and must give torch's answer (or, where lrfuse deliberately
differs, the documented error)."""

from __future__ import annotations

import copy
import inspect
import warnings

import pytest
import torch

import lrfuse
from parity import ALGORITHMS, FP32, PAIRS, assert_same, clone_like, leaf, step_both


def pair(name="adam", dtype=torch.float32, **kwargs):
    torch.manual_seed(0)
    params = [leaf(torch.randn(6, 5, dtype=dtype)), leaf(torch.randn(5, dtype=dtype))]
    ref = [clone_like(p) for p in params]
    fused_cls, torch_cls = PAIRS[name]
    return params, ref, fused_cls(params, lr=1e-2, **kwargs), torch_cls(ref, lr=1e-2, foreach=False, **kwargs)


# 1. A tensor replaced inside a parameter's state is what the next step uses.
STATE_EDITS = {
    "exp_avg replaced": lambda s: s.__setitem__("exp_avg", s["exp_avg"] * 3),
    "step reset": lambda s: s.__setitem__("step", torch.tensor(0.0)),
    "every value moved": lambda s: s.update({k: v.clone() for k, v in s.items()}),
    "state cleared": lambda s: s.clear(),
    "exp_avg_sq zeroed in place": lambda s: s["exp_avg_sq"].zero_(),
}


@pytest.mark.parametrize("edit", STATE_EDITS)
def test_state_edit_between_steps(edit):
    params, ref, fused, oracle = pair()
    for i in range(2):
        step_both(params, ref, fused, oracle, f"before {i}")
    for opt in (fused, oracle):
        for state in opt.state.values():
            STATE_EDITS[edit](state)
    for i in range(3):
        step_both(params, ref, fused, oracle, f"after {edit} {i}")
    # The state the user sees (and a checkpoint saves) is the state that was updated.
    assert_same(fused, oracle, params, ref, FP32, "state_dict")
    saved = fused.state_dict()["state"]
    assert all(float(s["step"]) == float(oracle.state[q]["step"]) for s, q in zip(saved.values(), ref))


def test_rmsprop_square_avg_replaced():
    params, ref, fused, oracle = pair("rmsprop", momentum=0.9)
    step_both(params, ref, fused, oracle, "first")
    for opt in (fused, oracle):
        for state in opt.state.values():
            state["square_avg"] = state["square_avg"] * 4
    for i in range(3):
        step_both(params, ref, fused, oracle, f"after replace {i}")


def test_state_of_one_parameter_deleted():
    params, ref, fused, oracle = pair()
    step_both(params, ref, fused, oracle, "first")
    del fused.state[params[0]], oracle.state[ref[0]]
    for i in range(2):
        step_both(params, ref, fused, oracle, f"after del {i}")


# 2. Reassigned .data is what the next step moves, complex parameters included.
@pytest.mark.parametrize("dtype", [torch.float32, torch.complex64])
@pytest.mark.parametrize("name", PAIRS)
def test_data_reassigned(name, dtype):
    params, ref, fused, oracle = pair(name, dtype=dtype)
    step_both(params, ref, fused, oracle, "first")
    for p, q in zip(params, ref):
        p.data = p.data.clone() * 0.5
        q.data = q.data.clone() * 0.5
    moved = [p.detach().clone() for p in params]
    for i in range(2):
        step_both(params, ref, fused, oracle, f"after .data {i}")
    assert not any(torch.equal(p.detach(), m) for p, m in zip(params, moved))


# 3. Coupled weight decay rounds once, as torch's grad.add(param, alpha=wd): each configuration of
# parity.ALGORITHMS' flags, for every algorithm whose decay is coupled (AdamW's scales the parameter).
def decouples_weight_decay(torch_cls) -> bool:
    return torch_cls([leaf(torch.zeros(1))]).defaults.get("decoupled_weight_decay", False)


COUPLED = [(name, i) for name, a in ALGORITHMS.items() if not decouples_weight_decay(a.torch)
           for i in range(len(a.flags))]


@pytest.mark.parametrize("name, config", COUPLED, ids=[f"{n}-{i}" for n, i in COUPLED])
def test_weight_decay_nearly_cancelled_by_the_gradient(name, config):
    torch.manual_seed(0)
    wd = 0.1
    p = leaf(torch.randn(4096))
    q = clone_like(p)
    algorithm = ALGORITHMS[name]
    kwargs = {**algorithm.flags[config], "weight_decay": wd}
    fused = algorithm.fused([p], lr=algorithm.lr, **kwargs)
    oracle = algorithm.torch([q], lr=algorithm.lr, foreach=False, **kwargs)
    sign = 1 if kwargs.get("maximize") else -1  # maximize negates the gradient before the decay is added
    for step in range(3):
        # The gradient cancels the decay to ~1e-7, so one rounding of wd * p is a 10% change of
        # the update's input; each step starts both from the same values (a one-ulp difference
        # in p from an earlier step would be amplified the same way).
        with torch.no_grad():
            q.copy_(p)
        for key, value in fused.state[p].items():
            oracle.state[q][key].copy_(value)
        p.grad = sign * wd * p.detach() + 1e-7 * torch.randn_like(p)
        q.grad = p.grad.clone()
        fused.step()
        oracle.step()
        assert_same(fused, oracle, [p], [q], FP32, f"{name} {kwargs} step {step}")


# 4. A compiled step with complex parameters.
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_step_with_complex_params(backend):
    torch.manual_seed(0)
    params = [leaf(torch.randn(4, 3, dtype=torch.complex64)), leaf(torch.randn(5))]
    ref = [clone_like(p) for p in params]
    opt = lrfuse.FusedAdam(params, lr=torch.tensor(0.01), weight_decay=0.1)
    oracle = torch.optim.Adam(ref, lr=0.01, weight_decay=0.1, foreach=False)
    torch._dynamo.reset()
    compiled = torch.compile(opt.step, fullgraph=True, backend=backend)
    for step in range(3):
        for p, q in zip(params, ref):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        opt.step() if step == 0 else compiled()
        oracle.step()
        assert_same(opt, oracle, params, ref, FP32, f"compiled {backend} step {step}")


# 5. One-element tensors of any shape, as torch's own test configurations pass them: an lr of one
# and of two dims for every algorithm, the second with betas where the algorithm has them; every
# state in use.
def one_element_hyperparameters(name: str) -> dict[str, dict]:
    a = ALGORITHMS[name]
    cases = {"1d": {"lr": torch.tensor([a.lr])}, "2d": {"lr": torch.tensor([[a.lr]])}}
    if "betas" in inspect.signature(a.torch.__init__).parameters:
        cases["2d"]["betas"] = (torch.tensor([[[0.9]]]), torch.tensor([[0.99]]))
    return cases


ONE_ELEMENT = [(name, case) for name in ALGORITHMS for case in one_element_hyperparameters(name)]


@pytest.mark.parametrize("name, case", ONE_ELEMENT, ids=[f"{n}-{c}" for n, c in ONE_ELEMENT])
def test_one_element_tensor_hyperparameters(name, case):
    torch.manual_seed(0)
    params = [leaf(torch.randn(6, 5)), leaf(torch.randn(5))]
    ref = [clone_like(p) for p in params]
    algorithm = ALGORITHMS[name]
    kwargs = {**one_element_hyperparameters(name)[case], **algorithm.low_precision}
    fused = algorithm.fused(params, **kwargs)
    oracle = algorithm.torch(ref, foreach=False, **copy.deepcopy(kwargs))
    for i in range(3):
        step_both(params, ref, fused, oracle, f"{name} step {i}")
    fused.param_groups[0]["lr"].fill_(5 * algorithm.lr)  # a scheduler's fill_ reaches the table
    oracle.param_groups[0]["lr"].fill_(5 * algorithm.lr)
    step_both(params, ref, fused, oracle, "after fill_")


# 6. Meta parameters step as in torch's for-loop: no computation, state on meta, no warning.
@pytest.mark.parametrize("name", PAIRS)
def test_meta_parameters(name):
    p = leaf(torch.empty(4, 3, device="meta"))
    fused_cls, torch_cls = PAIRS[name]
    opt, oracle = fused_cls([p]), torch_cls([leaf(torch.empty(4, 3, device="meta"))], foreach=False)
    for o in (opt, oracle):
        for q in o.param_groups[0]["params"]:
            q.grad = torch.empty(4, 3, device="meta")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
    oracle.step()
    assert lrfuse.ops.backend("meta") == "native"
    ref_state = next(iter(oracle.state.values()), {})  # SGD without momentum keeps none
    assert opt.state.get(p, {}).keys() == ref_state.keys()
    for key, value in opt.state.get(p, {}).items():
        if key != "step":
            assert value.device.type == "meta" and value.shape == p.shape


# 7. Under a float64 default dtype `step` is float64, as torch keeps it (SGD keeps no step).
@pytest.mark.parametrize("name", [name for name, (cls, _) in PAIRS.items() if cls._rule.counts_steps])
def test_float64_default_dtype_keeps_step_float64(name):
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        params, ref, fused, oracle = pair(name)
        for i in range(3):
            step_both(params, ref, fused, oracle, f"step {i}")
        for p, q in zip(params, ref):
            assert fused.state[p]["step"].dtype == oracle.state[q]["step"].dtype == torch.float64
    finally:
        torch.set_default_dtype(old)


# 8. Integer parameters and capturable on the CPU (duplicates: test_errors.py).
@pytest.mark.parametrize("name", PAIRS)
def test_integer_parameter_without_gradient_is_accepted_and_never_stepped(name):
    torch.manual_seed(0)
    counter = torch.zeros(3, dtype=torch.int64)
    params = [leaf(torch.randn(5))]
    ref = [clone_like(params[0])]
    fused_cls, torch_cls = PAIRS[name]
    fused = fused_cls([*params, counter], lr=1e-2)
    oracle = torch_cls([*ref, counter.clone()], lr=1e-2, foreach=False)
    for i in range(2):
        step_both(params, ref, fused, oracle, f"step {i}")
    assert torch.equal(counter, torch.zeros(3, dtype=torch.int64))
    # No state, or (Adagrad, which creates it at construction as torch's does) torch's untouched state.
    theirs = oracle.param_groups[0]["params"][1]
    assert fused.state.get(counter, {}).keys() == oracle.state.get(theirs, {}).keys()
    for key, value in fused.state.get(counter, {}).items():
        assert torch.equal(value, oracle.state[theirs][key]), key


@pytest.mark.parametrize("name", [name for name, (_, torch_cls) in PAIRS.items()
                                  if "capturable" in inspect.signature(torch_cls.__init__).parameters])
def test_capturable_on_cpu_is_refused_at_step_before_any_state(name):
    p = leaf(torch.randn(3))
    p.grad = torch.randn(3)
    fused_cls, torch_cls = PAIRS[name]
    opt = fused_cls([p], capturable=True)
    before = p.detach().clone()
    with pytest.raises(RuntimeError, match="capturable=True needs CUDA parameters"):
        opt.step()
    assert not opt.state and torch.equal(p.detach(), before)
    # torch refuses it too
    with pytest.raises((RuntimeError, AssertionError)):
        q = leaf(torch.randn(3))
        q.grad = torch.randn(3)
        torch_cls([q], capturable=True, foreach=False).step()


# 9. A state_dict that does not fit is refused at load time and changes nothing.
def stepped(name="adam", **kwargs):
    torch.manual_seed(0)
    p = leaf(torch.randn(4, 3))
    opt = PAIRS[name][0]([p], lr=1e-2, **kwargs)
    p.grad = torch.randn_like(p)
    opt.step()
    return opt, p


@pytest.mark.parametrize("missing", ["exp_avg", "exp_avg_sq", "step"])
def test_state_dict_with_a_missing_key_is_refused(missing):
    opt, p = stepped()
    sd = copy.deepcopy(opt.state_dict())
    del sd["state"][0][missing]
    state, groups, exp_avg = opt.state, opt.param_groups, opt.state[p]["exp_avg"].clone()
    # torch's own load raises KeyError for a missing step (half-way through its load); the rest
    # lrfuse names.
    with pytest.raises(KeyError if missing == "step" else ValueError, match=f"has no '{missing}'|'step'"):
        opt.load_state_dict(sd)
    assert opt.state is state and opt.param_groups is groups
    assert torch.equal(opt.state[p]["exp_avg"], exp_avg)


def test_amsgrad_state_dict_without_max_exp_avg_sq_is_refused():
    opt, p = stepped(amsgrad=True)
    sd = copy.deepcopy(opt.state_dict())
    del sd["state"][0]["max_exp_avg_sq"]
    with pytest.raises(ValueError, match="has no 'max_exp_avg_sq'"):
        opt.load_state_dict(sd)


def test_rmsprop_state_dict_into_fused_adam_is_refused_at_load():
    rms, _ = stepped("rmsprop")
    opt, p = stepped()
    state, groups = opt.state, opt.param_groups
    with pytest.raises(ValueError, match="has no 'exp_avg'"):
        opt.load_state_dict(rms.state_dict())
    assert opt.state is state and opt.param_groups is groups and "square_avg" not in opt.state[p]


def test_state_dict_of_other_shapes_is_refused():
    opt, p = stepped()
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0]["exp_avg"] = torch.zeros(7)
    with pytest.raises(ValueError, match="'exp_avg' of parameter 0 of group 0 is \\(7,\\)"):
        opt.load_state_dict(sd)


def test_fitting_state_dict_still_loads_and_continues():
    params, ref, fused, oracle = pair()
    step_both(params, ref, fused, oracle, "first")
    fused.load_state_dict(copy.deepcopy(oracle.state_dict()))
    for i in range(2):
        step_both(params, ref, fused, oracle, f"after load {i}")


# Group values that change in place (a betas list, a 0-d numpy array lr) reach the next step.
@pytest.mark.parametrize("edit", ["numpy lr", "betas list"])
def test_group_value_changed_in_place(edit):
    import numpy as np

    torch.manual_seed(0)
    params = [leaf(torch.randn(6, 5))]
    ref = [clone_like(params[0])]
    make = (lambda: {"lr": np.array(0.01)}) if edit == "numpy lr" else dict
    fused, oracle = lrfuse.FusedAdam(params, **make()), torch.optim.Adam(ref, foreach=False, **make())
    if edit == "betas list":  # torch keeps constructor betas as a tuple; a user may set a list
        for opt in (fused, oracle):
            opt.param_groups[0]["betas"] = [0.9, 0.999]
    step_both(params, ref, fused, oracle, "first")
    for opt in (fused, oracle):
        if edit == "numpy lr":
            opt.param_groups[0]["lr"][...] = 0.05
        else:
            opt.param_groups[0]["betas"][0] = 0.5
    step_both(params, ref, fused, oracle, f"after {edit} changed in place")


# Autograd counts in-place writes (a tensor's `_version`) to catch a backward that would read a
# saved tensor changed since: the step writes like torch's default (for-loop, foreach) steps.
@pytest.mark.parametrize("name", PAIRS)
def test_step_bumps_the_version_of_every_tensor_it_writes(name):
    params = [leaf(torch.randn(6, 5)), leaf(torch.randn(5))]
    opt = PAIRS[name][0](params, lr=ALGORITHMS[name].lr, **ALGORITHMS[name].low_precision)  # every state in use
    for step in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        grads = [(p.grad, p.grad._version) for p in params]
        before = [(t, t._version) for p in params for t in (p, *opt.state.get(p, {}).values())]
        opt.step()
        written = [(t, t._version) for p in params for t in (p, *opt.state[p].values())]
        assert len(written) == len(params) * (1 + len(opt._rule.all_states) + opt._rule.counts_steps)
        for t, version in before:
            assert t._version > version, f"step {step}: a written tensor kept version {version}"
        for grad, version in grads:
            assert grad._version == version  # read only


@pytest.mark.parametrize("name", PAIRS)
def test_backward_through_a_parameter_the_step_changed_raises_as_in_torch(name):
    for cls in PAIRS[name]:
        w, x = leaf(torch.randn(3, 3)), leaf(torch.randn(2, 3))
        loss = (x @ w).sum()  # saves w for x's gradient
        w.grad = torch.ones(3, 3)
        cls([w], lr=ALGORITHMS[name].lr).step()
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()
