"""The native ops' registration, the backend switch, AMP, hooks and torch.compile."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch

import lrfuse
from lrfuse import ops
from parity import leaf, run_compiled_with_lr_changes

native = pytest.mark.skipif(ops.backend("cpu") != "native", reason="lrfuse._C is not built")
ROOT = Path(__file__).resolve().parents[1]


def test_hyper_columns_match_the_native_enums():
    header = (ROOT / "csrc" / "update_rules.h").read_text()
    for namespace, columns in (("adam_col", ops.ADAM_COLUMNS), ("rmsprop_col", ops.RMSPROP_COLUMNS)):
        enum = re.search(namespace + r" \{\s*enum : int \{ ([^}]*) \};", header).group(1)
        assert [c.strip() for c in enum.split(",")] == [*columns, "count"]


def sample_args(amsgrad: bool):
    torch.manual_seed(0)
    params = [torch.randn(5, 3), torch.randn(7).t(), torch.randn(4, 6).t()]
    state = lambda: [torch.rand_like(p) for p in params]  # noqa: E731
    return (params, [torch.randn_like(p) for p in params], state(), state(), state() if amsgrad else [],
            [torch.full((), 3.0) for _ in params], [0, 1, 1],
            torch.tensor([[1e-3, 0.9, 0.999, 1e-8, 0.01, 0.0, 1.0], [1e-2, 0.8, 0.99, 1e-6, 0.0, 1.0, 0.0]],
                         dtype=torch.float64))


@native
@pytest.mark.parametrize("amsgrad", [False, True])
def test_opcheck_adam(amsgrad):
    torch.library.opcheck(torch.ops.lrfuse.fused_adam_.default, sample_args(amsgrad))


@native
@pytest.mark.parametrize("centered", [False, True])
def test_opcheck_rmsprop(centered):
    params, grads, sq, buf, _, steps, group_of, _ = sample_args(False)
    hyper = torch.tensor([[1e-2, 0.99, 1e-8, 0.0, 0.9, 0.0], [1e-3, 0.9, 1e-6, 0.1, 0.9, 1.0]], dtype=torch.float64)
    grad_avgs = [torch.rand_like(p) for p in params] if centered else []
    torch.library.opcheck(torch.ops.lrfuse.fused_rmsprop_.default,
                          (params, grads, sq, buf, grad_avgs, steps, group_of, hyper))


def test_backend_reports_the_path(monkeypatch):
    assert ops.backend("cpu") in {"native", "reference"}
    monkeypatch.setattr(ops, "_forced", "reference")
    assert ops.backend("cpu") == "reference"


def test_reference_path_warns_once(monkeypatch):
    monkeypatch.setattr(ops, "_C", None)
    monkeypatch.setattr(ops, "_load_error", ImportError("not built"))
    monkeypatch.setattr(ops, "_warned", False)
    p = leaf(torch.randn(3))
    opt = lrfuse.FusedAdam([p])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            p.grad = torch.randn(3)
            opt.step()
    messages = [str(w.message) for w in caught if "reference path" in str(w.message)]
    assert len(messages) == 1 and "pip install --no-build-isolation" in messages[0]


def amp_setup():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = lrfuse.FusedAdam(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    return model, opt, scaler


def test_grad_scaler_inf_step_changes_nothing():
    model, opt, scaler = amp_setup()
    scaler.scale(model(torch.randn(8, 4)).sum()).backward()
    scaler.step(opt)
    scaler.update()
    weights = [p.detach().clone() for p in model.parameters()]
    state = [{k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()]
    opt.zero_grad()
    scaler.scale(model(torch.randn(8, 4)).sum()).backward()
    model.weight.grad[0, 0] = float("inf")
    scaler.step(opt)
    for p, w, s in zip(model.parameters(), weights, state):
        assert torch.equal(p.detach(), w)
        for k, v in s.items():
            assert torch.equal(opt.state[p][k], v), k
    assert opt.state[model.weight]["step"].item() == 1
    scaler.update()
    assert scaler.get_scale() == 512.0


def test_grad_scaler_unscales_inside_the_kernel():
    """With a finite scaled gradient the fused step equals torch.optim.Adam on the true gradient."""
    model, opt, scaler = amp_setup()
    ref_model = torch.nn.Linear(4, 2)
    ref_model.load_state_dict(model.state_dict())
    ref_opt = torch.optim.Adam(ref_model.parameters(), lr=1e-2, foreach=False)
    x = torch.randn(8, 4)
    scaler.scale(model(x).sum()).backward()
    scaler.step(opt)
    ref_model(x).sum().backward()
    ref_opt.step()
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q)


def test_only_grad_scaler_hands_the_scale_to_the_kernel():
    model, opt, scaler = amp_setup()
    scaler.scale(model(torch.randn(8, 4)).sum()).backward()
    scaled = [p.grad.clone() for p in model.parameters()]
    scaler.step(opt)
    # GradScaler did not unscale the gradients in place: the kernel divided them as it read them.
    for p, g in zip(model.parameters(), scaled):
        assert torch.equal(p.grad, g)
    # Anyone else asking (Lightning's precision plugins) unscales first, for its hooks and clipping.
    assert opt._step_supports_amp_scaling is False
    assert getattr(opt, "_step_supports_amp_scaling") is False


def test_step_hooks_run():
    p = leaf(torch.randn(3))
    opt = lrfuse.FusedRMSprop([p])
    calls = []
    opt.register_step_pre_hook(lambda *_: calls.append("pre"))
    opt.register_step_post_hook(lambda *_: calls.append("post"))
    p.grad = torch.randn(3)
    opt.step()
    assert calls == ["pre", "post"]


@native
def test_compiled_step_does_not_recompile_when_lr_changes():
    torch.manual_seed(0)
    run_compiled_with_lr_changes([leaf(torch.randn(6, 4)), leaf(torch.randn(4))])
