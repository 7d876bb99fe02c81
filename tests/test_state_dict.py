"""state_dict compatibility with torch.optim, both directions, through torch.save / torch.load."""

from __future__ import annotations

import io

import pytest
import torch

from parity import ALGORITHMS, FP32, PAIRS, assert_same, clone_like, leaf

KWARGS = {name: a.low_precision for name, a in ALGORITHMS.items()}  # every state in use


def groups():
    torch.manual_seed(0)
    return [
        {"params": [leaf(torch.randn(8, 4)), leaf(torch.randn(4))], "lr": 1e-2},
        {"params": [leaf(torch.randn(7, 3).t())], "lr": 1e-3},
    ]


def train(opt, params, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()


def through_disk(state_dict: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("name", list(PAIRS))
@pytest.mark.parametrize("direction", ["torch_to_fused", "fused_to_torch"])
def test_resume_across_implementations(name, direction):
    """Train 5 steps with one implementation, save, load into the other, continue 10 steps: the
    run must match the first implementation continuing on its own."""
    fused_cls, torch_cls = PAIRS[name]
    first_cls, second_cls = (torch_cls, fused_cls) if direction == "torch_to_fused" else (fused_cls, torch_cls)
    extra = lambda cls: {"foreach": False} if cls is torch_cls else {}  # noqa: E731

    g = groups()
    first = first_cls(g, **KWARGS[name], **extra(first_cls))
    params = [p for grp in first.param_groups for p in grp["params"]]
    train(first, params, 5, seed=1)

    resumed_params = [clone_like(p) for p in params]
    second = second_cls([{"params": resumed_params[:2]}, {"params": resumed_params[2:]}],
                        **KWARGS[name], **extra(second_cls))
    second.load_state_dict(through_disk(first.state_dict()))
    assert [grp["lr"] for grp in second.param_groups] == [1e-2, 1e-3]

    train(first, params, 10, seed=2)
    train(second, resumed_params, 10, seed=2)
    assert_same(second, first, resumed_params, params, FP32, f"{name} {direction}")


@pytest.mark.parametrize("name", list(PAIRS))
def test_state_dict_keys_match_torch(name):
    fused_cls, torch_cls = PAIRS[name]
    sds = []
    for cls in (fused_cls, torch_cls):
        opt = cls(groups(), **KWARGS[name])
        train(opt, [p for grp in opt.param_groups for p in grp["params"]], 1, seed=0)
        sds.append(opt.state_dict())
    mine, theirs = sds
    assert mine["param_groups"] == theirs["param_groups"]
    assert mine["state"].keys() == theirs["state"].keys()
    for k in theirs["state"]:
        assert mine["state"][k].keys() == theirs["state"][k].keys()
        for key, value in theirs["state"][k].items():
            assert mine["state"][k][key].dtype == value.dtype and mine["state"][k][key].shape == value.shape
