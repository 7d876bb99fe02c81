"""Layer-wise / discriminative parameter groups."""

import pytest
import torch
from torch import nn

import lrfuse
from lrfuse.groups import discriminative_groups, layer_names, layerwise_groups
from parity import FP32, assert_same


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))
        self.embed = nn.Linear(4, 8)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)) for _ in range(2)])
        self.frozen = nn.Linear(8, 8).requires_grad_(False)
        self.head = nn.Linear(8, 2)


def test_default_layers_are_top_level_children_in_order():
    assert layer_names(Net()) == ["", "embed", "blocks", "head"]


def test_layerwise_decay_from_the_head_down():
    groups = layerwise_groups(Net(), lr=1e-3, decay=0.5)
    assert [g["name"] for g in groups] == ["<root>", "embed", "blocks", "head"]
    assert [g["lr"] for g in groups] == pytest.approx([1.25e-4, 2.5e-4, 5e-4, 1e-3])
    assert [g["lr_scale"] for g in groups] == pytest.approx([0.125, 0.25, 0.5, 1.0])
    n_params = sum(len(g["params"]) for g in groups)
    assert n_params == sum(1 for p in Net().parameters() if p.requires_grad)


def test_prefixes_pick_finer_layers_and_longest_prefix_wins():
    model = Net()
    groups = layerwise_groups(model, lr=1.0, decay=0.5, layers=["", "embed", "blocks", "blocks.1", "head"])
    by_name = {g["name"]: g for g in groups}
    assert {id(p) for p in by_name["blocks.1"]["params"]} == {id(p) for p in model.blocks[1].parameters()}
    assert {id(p) for p in by_name["blocks"]["params"]} == {id(p) for p in model.blocks[0].parameters()}
    assert by_name["blocks.1"]["lr"] == 0.5 and by_name["blocks"]["lr"] == 0.25


def test_no_decay_for_biases_and_norms():
    model = Net()
    groups = layerwise_groups(model, lr=1.0, decay=1.0, weight_decay=0.05, no_decay_norm_bias=True)
    by_name = {g["name"]: g for g in groups}
    nd = {id(p) for p in by_name["blocks/no_decay"]["params"]}
    assert id(model.blocks[0][1].weight) in nd and id(model.blocks[0][0].bias) in nd
    assert id(model.blocks[0][0].weight) not in nd
    assert by_name["blocks/no_decay"]["weight_decay"] == 0.0 and by_name["blocks"]["weight_decay"] == 0.05


def test_groups_feed_fused_and_torch_optimizers():
    """The same groups drive lrfuse's AdamW and torch's alike: after each step, every parameter and
    every state tensor equals torch's for-loop AdamW on a copy of the model, each group at its LR."""
    model = Net()
    copy_ = Net()
    copy_.load_state_dict(model.state_dict())
    opt = lrfuse.FusedAdamW(layerwise_groups(model, lr=1e-2, decay=0.8))
    ref = torch.optim.AdamW(layerwise_groups(copy_, lr=1e-2, decay=0.8), foreach=False)
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in ref.param_groups]
    assert [g["name"] for g in opt.param_groups] == [g["name"] for g in ref.param_groups]
    params = [p for g in opt.param_groups for p in g["params"]]
    ref_params = [p for g in ref.param_groups for p in g["params"]]
    before = [p.detach().clone() for p in params]
    torch.manual_seed(0)
    for step in range(3):
        for p, q in zip(params, ref_params):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
        assert_same(opt, ref, params, ref_params, FP32, f"step {step}")
    assert all(not torch.equal(p, b) for p, b in zip(params, before))  # every group stepped
    assert opt.param_groups[-1]["lr_scale"] == 1.0


def test_discriminative_explicit_lrs():
    groups = discriminative_groups(Net(), [0.0, 1e-4, 1e-3, 1e-2])
    assert [g["lr_scale"] for g in groups] == pytest.approx([0.0, 0.01, 0.1, 1.0])


@pytest.mark.parametrize("call, match", [
    (lambda m: layerwise_groups(m, lr=1.0, decay=0.0), "decay must be in"),
    (lambda m: layerwise_groups(m, lr=-1.0), "lr must be >= 0"),
    (lambda m: layerwise_groups(m, lr=1.0, layers=["embed", "head"]), "belong to none of the layers"),
    (lambda m: layerwise_groups(m, lr=1.0, layers=["", "embed", "blocks", "head", "nope"]), "matches no trainable"),
    (lambda m: discriminative_groups(m, [1.0]), "one LR per layer"),
])
def test_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call(Net())


def test_lazy_names_resolve():
    assert lrfuse.layerwise_groups is layerwise_groups
    assert "layerwise_groups" in lrfuse.__all__
