"""The native ops' registration, the backend switch, AMP, hooks and torch.compile."""

from __future__ import annotations

import os
import re
import types
import warnings
from pathlib import Path

import pytest
import torch

import lrfuse
from lrfuse import ops
from parity import ALGORITHMS, leaf, op_args, run_compiled_with_lr_changes

native = pytest.mark.skipif(ops.backend("cpu") != "native", reason="lrfuse._C is not built")
ROOT = Path(__file__).resolve().parents[1]


def test_every_fused_class_and_rule_has_a_test_entry():
    """parity.ALGORITHMS drives every per-algorithm test: each fused class lrfuse exports is one
    of its entries, beside its torch class and its rule, and every rule is run by one."""
    exported = {getattr(lrfuse.optim, name) for name in lrfuse.optim.__all__}
    assert {a.fused for a in ALGORITHMS.values()} == exported, "add the new class to tests/parity.py's ALGORITHMS"
    for name, a in ALGORITHMS.items():
        assert issubclass(a.fused, a.torch) and a.fused._rule is ops.RULES[a.rule], name
    assert {a.rule for a in ALGORITHMS.values()} == set(ops.RULES)


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_a_group_becomes_a_row_of_the_rules_columns(name):
    """A fused class turns a group into one value per column of its rule, and says for each of the
    rule's optional states whether the group keeps it (settings with every state in use)."""
    algorithm = ALGORITHMS[name]
    rule = ops.RULES[algorithm.rule]
    opt = algorithm.fused([leaf(torch.randn(3))], **algorithm.low_precision)
    group = opt.param_groups[0]
    values = tuple(group[k] for k in opt._row_keys)
    rows = [opt._row(values)] + ([opt._row((*values, True))] if opt._first_step_rows else [])
    assert all(len(row) == len(rule.columns) for row in rows)
    assert dict(zip(rule.columns, rows[0]))["lr"] == group["lr"]
    if opt._first_step_rows:
        assert [dict(zip(rule.columns, row))["first_step"] for row in rows] == [0.0, 1.0]
    assert opt._uses(group) == (True,) * len(rule.optional_states)


@pytest.mark.parametrize("name", list(ops.RULES))
def test_python_and_native_rules_agree(name):
    """The rule's columns are the native rule's Column enum, in order (csrc/rules/<name>.h)."""
    header = (ROOT / "csrc" / "rules" / f"{name}.h").read_text()
    enum = re.search(r"enum Column : int \{ ([^}]*) \};", header).group(1)
    assert [c.strip() for c in enum.split(",")] == [*ops.RULES[name].columns, "kColumns"]


@native
@pytest.mark.parametrize("name", list(ops.RULES))
def test_native_schema_is_the_rules(name):
    """One state list per state key, named after it, in order, and `steps` exactly for rules that
    count them."""
    rule = ops.RULES[name]
    schema = getattr(torch.ops.lrfuse, f"fused_{name}_").default._schema
    names = [a.name for a in schema.arguments]
    expected = 2 + len(rule.all_states) + rule.counts_steps + 5
    assert len(names) == expected and names[:2] == ["params", "grads"] and names[-5:] == [
        "group_of", "hyper", "grad_scale", "found_inf", "stats"]
    assert schema.arguments[-1].alias_info.is_write  # the kernel adds the step's sums to it
    assert names[2:2 + len(rule.all_states)] == list(rule.all_states)
    assert ("steps" in names) == rule.counts_steps
    assert all(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments[2:2 + len(rule.all_states)])


@native
@pytest.mark.parametrize("name, optional", [(name, optional) for name, rule in ops.RULES.items()
                                            for optional in ([False, True] if rule.optional_states else [True])])
def test_opcheck(name, optional):
    """torch's checks of a custom op: schema, fake kernel, autograd registration, dispatch."""
    torch.library.opcheck(getattr(torch.ops.lrfuse, f"fused_{name}_").default,
                          op_args(ops.RULES[name], torch.device("cpu"), optional=optional)[:-2])


def test_backend_reports_the_path(monkeypatch):
    # native exactly when the extension loaded (and the reference path is not forced); CI requires it
    if os.environ.get("LRFUSE_REQUIRE_NATIVE", "0") not in ("", "0"):
        assert ops._C is not None, f"lrfuse._C did not load: {ops._load_error}"
    monkeypatch.setattr(ops, "_forced", None)
    loaded = "native" if ops._C is not None else "reference"
    assert [ops.backend("cpu"), ops.backend("meta"), ops.backend(torch.device("cpu"))] == [loaded] * 3
    assert ops.backend("cuda") == ("native" if ops._C is not None and ops._C.with_cuda else "reference")
    monkeypatch.setattr(ops, "_forced", "reference")
    assert ops.backend("cpu") == ops.backend("meta") == "reference"
    monkeypatch.setattr(ops, "_forced", None)
    monkeypatch.setattr(ops, "_C", None)
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


def test_a_build_without_cuda_kernels_says_how_to_get_them(monkeypatch):
    # A GPU user whose build found no nvcc: the step on CUDA falls back, and says why and what to run.
    monkeypatch.setattr(ops, "_C", types.SimpleNamespace(with_cuda=False))
    monkeypatch.setattr(ops, "_warned", False)
    with pytest.warns(RuntimeWarning, match="reference path on cuda") as caught:
        ops._warn_reference(torch.device("cuda"))
    message = str(caught[0].message)
    assert "built without cuda kernels" in message and "LRFUSE_CUDA=1 pip install --no-build-isolation" in message


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
@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_compiled_step_does_not_recompile_when_lr_changes(name):
    torch.manual_seed(0)
    run_compiled_with_lr_changes([leaf(torch.randn(6, 4)), leaf(torch.randn(4))], name)


def test_grad_scaler_skip_before_sgd_momentum_starts_leaves_no_buffer():
    """A first SGD step that GradScaler skips (inf gradient) creates no momentum buffer, as torch's
    for-loop never sees it; the next step starts the buffer from its gradient, as torch's does."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    ref_model = torch.nn.Linear(4, 2)
    ref_model.load_state_dict(model.state_dict())
    opt = lrfuse.FusedSGD(model.parameters(), lr=0.1, momentum=0.9, dampening=0.5)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.1, momentum=0.9, dampening=0.5, foreach=False)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x = torch.randn(8, 4)
    before = [p.detach().clone() for p in model.parameters()]
    scaler.scale(model(x).sum()).backward()
    model.weight.grad[0, 0] = float("inf")
    scaler.step(opt)
    scaler.update()
    assert len(opt.state) == 0
    assert all(torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))
    for _ in range(3):
        opt.zero_grad()
        ref_opt.zero_grad()
        scaler.scale(model(x).sum()).backward()
        scaler.step(opt)
        scaler.update()
        ref_model(x).sum().backward()
        ref_opt.step()
        for p, q in zip(model.parameters(), ref_model.parameters()):
            torch.testing.assert_close(p, q)
            torch.testing.assert_close(opt.state[p]["momentum_buffer"], ref_opt.state[q]["momentum_buffer"])
