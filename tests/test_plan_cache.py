"""The call plan kept between steps must never act on stale tensors."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

import lrfuse
from parity import clone_like, leaf, step_both


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
    """A structural change of a group (new state appears) rebuilds the plan."""
    params, ref, fused, oracle = pair()
    step_both(params, ref, fused, oracle, "first")
    fused.param_groups[0]["amsgrad"] = True
    for p in params:
        assert "max_exp_avg_sq" not in fused.state[p]
    for p in params:
        p.grad = torch.randn_like(p)
    fused.step()
    for p in params:
        assert fused.state[p]["max_exp_avg_sq"].shape == p.shape


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


def test_sparse_gradient_on_a_kept_plan_is_named():
    params, ref, fused, oracle = pair()
    step_both(params, ref, fused, oracle, "first")
    before = [p.clone() for p in params]
    params[0].grad = torch.randn_like(params[0])
    params[1].grad = torch.randn(5).to_sparse()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        fused.step()
    for p, b in zip(params, before):
        assert torch.equal(p, b)


def test_optimizer_with_a_kept_plan_copies_and_pickles():
    """The kept plan (and its C++ references) stays out of copies: they rebuild their own."""
    params, ref, fused, oracle = pair()
    step_both(params, ref, fused, oracle, "first")
    for clone in (copy.deepcopy(fused), pickle.loads(pickle.dumps(fused))):
        assert "_plan_cache" not in clone.__dict__
        cloned = [p for g in clone.param_groups for p in g["params"]]
        for p in cloned:
            p.grad = torch.ones_like(p)
        before = [p.detach().clone() for p in cloned]
        clone.step()
        assert all(not torch.equal(p, b) for p, b in zip(cloned, before))
    step_both(params, ref, fused, oracle, "original after copies")
