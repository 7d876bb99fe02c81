"""What an optimizer keeps between steps (lrfuse/optim/_cache.py) must never act on a stale tensor
or value: StepCache on its own, then through the optimizer."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

import lrfuse
from lrfuse import ops
from lrfuse.optim._cache import StepCache, StepCalls
from parity import FP32, assert_same, clone_like, leaf, step_both


# StepCache on its own -------------------------------------------------------------------------


needs_extension = pytest.mark.skipif(ops._C is None, reason="lrfuse._C is not built (no calls are kept without it)")


def kept_setup():
    params = [torch.zeros(3), torch.zeros(2), torch.zeros(4)]  # the third has no gradient
    for p in params[:2]:
        p.grad = torch.ones_like(p)
    state = {params[0]: {"step": torch.zeros(()), "exp_avg": torch.zeros(3)},
             params[1]: {"step": torch.zeros(()), "exp_avg": torch.zeros(2)}}
    cache = StepCache()
    calls = StepCalls(by_layout={}, checked_natively=True)
    cache.keep(calls, ("key",), list(params), [p.grad for p in params], state)
    return cache, calls, params, state


@needs_extension
def test_calls_are_kept_while_everything_is_the_same_object():
    cache, calls, params, state = kept_setup()
    params[0].grad = torch.full_like(params[0], 2.0)  # backward replaces gradients: that is allowed
    kept_calls, grads = cache.kept(("key",), [params[:2], params[2:]], state)
    assert kept_calls is calls
    assert grads[0] is params[0].grad and grads[1] is params[1].grad and grads[2] is None


def test_no_calls_are_kept_without_the_extension(monkeypatch):
    cache, calls, params, state = kept_setup()
    monkeypatch.setattr(ops, "_C", None)
    assert cache.kept(("key",), [params], state) is None


@needs_extension
@pytest.mark.parametrize("change", [
    "key", "gradient gone", "gradient new", "parameter swapped", "parameter added", "state dict replaced",
    "value replaced", "value added", "state cleared", "value replaced by an equal tensor", "state key renamed",
    "state moved to another parameter", "state of a parameter added", "state dict is not a dict"])
def test_any_change_of_what_the_calls_were_built_from_drops_them(change):
    cache, calls, params, state = kept_setup()
    key, lists = ("key",), [params[:2], params[2:]]
    if change == "key":
        key = ("other",)
    elif change == "gradient gone":
        params[1].grad = None
    elif change == "gradient new":
        params[2].grad = torch.ones(4)
    elif change == "parameter swapped":
        lists[0][1] = torch.zeros(2)
    elif change == "parameter added":
        lists[1].append(torch.zeros(1))
    elif change == "state dict replaced":
        state[params[0]] = dict(state[params[0]])
    elif change == "value replaced":
        state[params[1]]["exp_avg"] = torch.ones(2)
    elif change == "value added":
        state[params[1]]["max_exp_avg_sq"] = torch.zeros(2)
    elif change == "state cleared":
        state[params[0]].clear()
    elif change == "value replaced by an equal tensor":  # same values, another tensor: the calls would update the old one
        state[params[0]]["step"] = state[params[0]]["step"].clone()
    elif change == "state key renamed":  # same tensors in the same order, but torch would make a new exp_avg
        state[params[1]]["momentum"] = state[params[1]].pop("exp_avg")
    elif change == "state moved to another parameter":  # params[1] would start afresh, params[2] keep it
        state[params[2]] = state.pop(params[1])
    elif change == "state of a parameter added":
        state[params[2]] = {}
    else:
        state[params[0]] = list(state[params[0]].items())
    assert cache.kept(key, lists, state) is None


def row(values):
    lr, beta = values
    return [lr, beta[0] if isinstance(beta, (list, tuple)) else beta]


def test_hyper_table_is_rewritten_only_when_a_number_changed():
    cache = StepCache()
    dev = torch.device("cpu")
    groups = [(0.1, (0.9,)), (0.2, (0.8,))]
    table = cache.hyper(dev, list(groups), row, compiling=False)
    assert table.tolist() == [[0.1, 0.9], [0.2, 0.8]]
    first = cache.tables[dev]
    assert cache.hyper(dev, list(groups), row, compiling=False) is table and cache.tables[dev] is first
    groups[1] = (0.5, (0.8,))  # a scheduler assigns a new float
    assert cache.hyper(dev, list(groups), row, compiling=False) is table  # same tensor, new row
    assert table.tolist() == [[0.1, 0.9], [0.5, 0.8]]


@pytest.mark.parametrize("mutable", ["list", "numpy array"])
def test_values_that_change_in_place_are_read_every_call(mutable):
    import numpy as np

    cache = StepCache()
    dev = torch.device("cpu")
    value = [0.9] if mutable == "list" else np.array(0.1)
    groups = [(0.1, value)] if mutable == "list" else [(value, (0.9,))]
    cache.hyper(dev, groups, row, compiling=False)
    assert cache.tables[dev].sources is None  # no identity fast path for this table
    if mutable == "list":
        value[0] = 0.5
    else:
        value[...] = 0.5
    assert 0.5 in cache.hyper(dev, groups, row, compiling=False).tolist()[0]


def test_tensor_cells_are_copied_every_call_whatever_their_one_element_shape():
    cache = StepCache()
    dev = torch.device("cpu")
    lr = torch.tensor([[0.1]])
    groups = [(lr, (0.9,))]
    assert cache.hyper(dev, groups, row, compiling=False)[0].tolist() == pytest.approx([0.1, 0.9])  # float32 lr
    lr.fill_(0.3)
    assert cache.hyper(dev, groups, row, compiling=False).tolist()[0][0] == pytest.approx(0.3)


# Through the optimizer ---------------------------------------------------------------------------


def pair(lr=1e-2):
    torch.manual_seed(0)
    params = [leaf(torch.randn(6, 5)), leaf(torch.randn(5))]
    ref = [clone_like(p) for p in params]
    return params, ref, lrfuse.FusedAdam(params, lr=lr), torch.optim.Adam(ref, lr=lr, foreach=False)


def test_load_state_dict_into_a_stepped_optimizer():
    params, ref, fused, oracle = pair()
    for i in range(3):
        step_both(params, ref, fused, oracle, f"before load {i}")
    # Rewind both to an earlier optimizer state: the fused one must use the loaded tensors.
    other = lrfuse.FusedAdam([clone_like(p) for p in params], lr=1e-2)
    for p in other.param_groups[0]["params"]:
        p.grad = torch.randn_like(p)
    other.step()
    # Deep copies: load_state_dict keeps the given tensors, which the two must not share.
    fused.load_state_dict(copy.deepcopy(other.state_dict()))
    oracle.load_state_dict(copy.deepcopy(other.state_dict()))
    for i in range(3):
        step_both(params, ref, fused, oracle, f"after load {i}")


def test_state_replaced_per_parameter_as_lightning_moves_it():
    params, ref, fused, oracle = pair()
    step_both(params, ref, fused, oracle, "first")
    for p in params:  # what Lightning's optimizer_to_device does: a new dict of new tensors
        fused.state[p] = {k: v.clone() for k, v in fused.state[p].items()}
    for i in range(3):
        step_both(params, ref, fused, oracle, f"after move {i}")


def test_param_group_added_mid_training():
    params, ref, fused, oracle = pair()
    step_both(params, ref, fused, oracle, "first")
    extra = leaf(torch.randn(4, 4))
    extra_ref = clone_like(extra)
    fused.add_param_group({"params": [extra], "lr": 0.1})
    oracle.add_param_group({"params": [extra_ref], "lr": 0.1})
    for i in range(3):
        step_both(params + [extra], ref + [extra_ref], fused, oracle, f"after add {i}")


def test_amsgrad_switched_on_between_steps():
    """A structural change of a group (new state appears) rebuilds the calls, and the steps after it
    are amsgrad's: ``max_exp_avg_sq`` starts at zero (torch's for-loop raises KeyError there instead,
    see the README), so they equal torch's amsgrad steps from a zero max. Gradients far smaller than
    before make the running average fall, so the max (which started at zero, not at the average)
    sets the denominator."""
    params, ref, fused, oracle = pair()
    for i in range(2):
        step_both(params, ref, fused, oracle, f"before {i}")
    fused.param_groups[0]["amsgrad"] = oracle.param_groups[0]["amsgrad"] = True
    for p, q in zip(params, ref):
        assert "max_exp_avg_sq" not in fused.state[p]
        oracle.state[q]["max_exp_avg_sq"] = torch.zeros_like(q)
    for i in range(4):
        for p, q in zip(params, ref):
            p.grad = torch.randn_like(p) * 1e-3 * 0.1**i
            q.grad = p.grad.clone()
        fused.step()
        oracle.step()
        assert_same(fused, oracle, params, ref, FP32, f"amsgrad step {i}")
    # The max is in use: above the running average now that the gradients shrink.
    for p in params:
        assert bool((fused.state[p]["max_exp_avg_sq"] > fused.state[p]["exp_avg_sq"]).any())


def test_parameter_swapped_in_place_in_its_group():
    """Model surgery that replaces a parameter inside a group's list keeps the list's length."""
    params, ref, fused, oracle = pair()
    step_both(params, ref, fused, oracle, "first")
    new = leaf(torch.randn(5))
    new_ref = clone_like(new)
    fused.param_groups[0]["params"][1] = new
    oracle.param_groups[0]["params"][1] = new_ref
    params[1], ref[1] = new, new_ref
    for i in range(3):
        step_both(params, ref, fused, oracle, f"after swap {i}")


def test_sparse_gradient_with_kept_calls_is_named():
    params, ref, fused, oracle = pair()
    step_both(params, ref, fused, oracle, "first")
    before = [p.clone() for p in params]
    params[0].grad = torch.randn_like(params[0])
    params[1].grad = torch.randn(5).to_sparse()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        fused.step()
    for p, b in zip(params, before):
        assert torch.equal(p, b)


def test_optimizer_with_kept_calls_copies_and_pickles():
    """The kept calls (and their C++ references) stay out of copies: they build their own."""
    params, ref, fused, oracle = pair()
    step_both(params, ref, fused, oracle, "first")
    for clone in (copy.deepcopy(fused), pickle.loads(pickle.dumps(fused))):
        assert clone._cache is not fused._cache and clone._cache.calls is None and clone._cache.built_from is None
        cloned = [p for g in clone.param_groups for p in g["params"]]
        for p in cloned:
            p.grad = torch.ones_like(p)
        before = [p.detach().clone() for p in cloned]
        clone.step()
        assert all(not torch.equal(p, b) for p, b in zip(cloned, before))
    step_both(params, ref, fused, oracle, "original after copies")
