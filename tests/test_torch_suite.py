"""PyTorch's own optimizer test suite (test/test_optim.py, ``TestOptimRenewed``), ported to lrfuse.

lrfuse's classes claim to be drop-ins for torch.optim.Adam / AdamW / RMSprop / SGD / Adagrad /
Adadelta on the CPU, so they must pass what torch checks of those optimizers. The configurations are torch's own, taken from
``torch.testing._internal.common_optimizers`` (``optim_db``): ``optim_inputs_func`` for the
constructor arguments and ``optim_error_inputs_func`` for the bad ones, so a new torch release
brings its new configurations here by itself. Where torch's test compares two implementations
(its for-loop against foreach / fused), the fused class is compared with torch's for-loop
(``foreach=False``), on the parameters and every state tensor. The code is written for lrfuse;
each test names the torch test it ports.

How torch's configurations are used on a CPU drop-in:

- ``optim_inputs_func`` is read for the "cpu", "cuda" and "mps" devices. The CUDA-only entries
  are there for ``capturable=True``, which is a CUDA-graph feature that torch refuses at step on
  CPU parameters (and so does lrfuse, see ``test_capturable_is_refused_on_cpu_at_step``). The
  flag is therefore dropped from them, while what else they carry (tensor ``lr``, ``betas`` as
  tensors of shape [1, 1, 1] / [1, 1] / []) still applies to the CPU and is kept. Entries that
  become duplicates once the flag is dropped are kept once. The MPS-only entry is a tensor lr.
- The global "cliquey" flags are added as torch's ``_get_optim_inputs_including_global_cliquey_kwargs``
  does: each configuration with all flags off, then with ``foreach=True``, then ``fused=True``
  where torch supports fused on the CPU (Adam, AdamW). lrfuse accepts and ignores them, so its
  result must still equal torch's for-loop.
- ``differentiable=True`` is left out everywhere: lrfuse refuses it on purpose (its step is a
  native kernel that autograd cannot see through); ``test_differentiable_is_refused`` checks that.
- A configuration that torch's own constructor refuses (a tensor lr or tensor betas together with
  ``foreach=True``) is left out of the configuration lists: those are error inputs, and
  ``test_errors`` checks that lrfuse refuses them exactly as torch does.
- A few configurations that torch's database lacks but lrfuse's kernels branch on are added
  (``EXTRA``): Adam's ``decoupled_weight_decay``, RMSprop's momentum without ``centered``, and a
  one-element tensor lr that is not 0-dim.

Left out as GPU-only: the CUDA / multi-GPU / MPS tests, peak-memory, large-tensor, ``found_inf``
on fused CUDA, device-moving state_dict tests. Left out as not applicable: sparse gradients (only
torch's SGD and Adagrad take them, and lrfuse refuses them with a clear error: see test_errors),
LBFGS-style closures (step_requires_closure is False for all six).
"""

from __future__ import annotations

import copy
import inspect
import io
import re
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor
from torch.nn import Parameter
from torch.optim.lr_scheduler import ReduceLROnPlateau
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from parity import PAIRS  # every algorithm of the parity suite: (fused class, torch class)

# torch.testing._internal.common_utils (imported by common_optimizers) needs the small
# `expecttest` package, and calls torch.backends.disable_global_flags() when imported, which
# would make every later bare `torch.backends.cudnn.benchmark = ...` in this pytest process raise
# (Lightning's Trainer does that in tests/lightning): that is undone right after the import.
#
# The port is skipped only when torch's module needs a package that the test set-up does not
# install. Anything else is an error: a missing `expecttest` (pyproject's [test] extra installs
# it, so CI has it), a torch module or name that moved (an API change under another torch).
_INSTALLED_FOR_TESTS = {"expecttest", "torch", "numpy"}
_flags_were_frozen = torch.backends.flags_frozen()
try:
    from torch.testing._internal.common_optimizers import OptimizerErrorEnum, optim_db
    _missing = None
except ModuleNotFoundError as exc:
    if exc.name is None or exc.name.split(".")[0] in _INSTALLED_FOR_TESTS:
        raise ImportError(f"torch.testing._internal.common_optimizers cannot be imported ({exc}); the [test] extra "
                          "installs what it needs (pip install -e '.[test]'), and a torch module that moved is an "
                          "API change to port") from exc
    _missing = exc
finally:
    if not _flags_were_frozen and torch.backends.flags_frozen():
        torch.backends.flags_frozen.__globals__["__allow_nonbracketed_mutation_flag"] = True
if _missing is not None:
    pytest.skip(f"torch.testing._internal.common_optimizers needs {_missing.name!r}, which the test set-up does not "
                f"install ({_missing})", allow_module_level=True)


def _info(name: str, torch_cls: type):
    """torch's optim_db entry of ``torch_cls``: its configurations, error inputs and schedulers."""
    found = [info for info in optim_db if info.optim_cls is torch_cls]
    if not found:
        raise LookupError(f"torch's optim_db has no entry for torch.optim.{torch_cls.__name__} (parity.ALGORITHMS' "
                          f"{name!r}): its port here needs configurations of its own")
    return found[0]


INFO = {name: _info(name, torch_cls) for name, (_, torch_cls) in PAIRS.items()}
CLIQUEY = ("foreach", "fused", "differentiable")
STEPS = 7  # torch's _compare_between: "iteration 7 is where we start to see differences"

# Configurations torch's database does not have, on branches of lrfuse's kernels: an entry for
# every algorithm of parity.ALGORITHMS (an empty list where torch's cover every branch).
EXTRA = {
    "adam": [
        ({"weight_decay": 0.1, "decoupled_weight_decay": True}, "decoupled_weight_decay"),
        ({"weight_decay": 0.1, "decoupled_weight_decay": True, "amsgrad": True, "maximize": True},
         "decoupled_weight_decay, amsgrad, maximize"),
        ({"lr": torch.tensor([0.01])}, "1-d one-element Tensor lr"),
    ],
    "adamw": [
        ({"lr": torch.tensor([0.01]), "amsgrad": True}, "1-d one-element Tensor lr, amsgrad"),
    ],
    "rmsprop": [
        ({"momentum": 0.9}, "momentum, not centered"),
        ({"lr": torch.tensor([0.01]), "centered": True, "momentum": 0.5, "maximize": True},
         "1-d one-element Tensor lr, centered, momentum, maximize"),
    ],
    "sgd": [
        ({"momentum": 0.9, "dampening": 0.3, "weight_decay": 0.1, "maximize": True},
         "momentum, dampening, weight_decay, maximize"),
        ({"lr": torch.tensor([0.01]), "momentum": 0.9, "nesterov": True}, "1-d one-element Tensor lr, nesterov"),
    ],
    "adagrad": [
        ({"lr_decay": 0.1, "weight_decay": 0.1, "initial_accumulator_value": 0.3, "maximize": True},
         "lr_decay, weight_decay, initial_accumulator_value, maximize"),
    ],
    "adadelta": [
        ({"lr": torch.tensor([0.5]), "rho": 0.8, "weight_decay": 0.1, "maximize": True},
         "1-d one-element Tensor lr, rho, weight_decay, maximize"),
    ],
}


if EXTRA.keys() != PAIRS.keys():
    raise LookupError(f"EXTRA has entries for {sorted(EXTRA)} but parity.ALGORITHMS has {sorted(PAIRS)}: give every "
                      "algorithm an entry (an empty list where torch's configurations cover every kernel branch)")


@dataclass(frozen=True, eq=False)
class Config:
    """One constructor configuration of one optimizer pair."""

    name: str     # key of PAIRS
    desc: str
    kwargs: dict  # a template: every optimizer gets its own deep copy (tensor lr is mutable)

    def make(self, **override) -> dict:
        return {**copy.deepcopy(self.kwargs), **override}

    def forloop(self, **override) -> dict:
        """The same configuration for torch's for-loop oracle."""
        kwargs = {k: v for k, v in self.make(**override).items() if k not in CLIQUEY}
        return {**kwargs, "foreach": False}

    @property
    def maximize(self) -> bool:
        return bool(self.kwargs.get("maximize", False))

    @property
    def id(self) -> str:
        return f"{self.name}-{self.desc}"


def _slug(text: str) -> str:
    return re.sub(r"[^0-9A-Za-z]+", "_", text).strip("_")


def _torch_accepts(torch_cls, kwargs: dict) -> bool:
    try:
        torch_cls([torch.zeros(2, requires_grad=True)], **copy.deepcopy(kwargs))
    except (ValueError, RuntimeError):
        return False
    return True


def _base_configs(name: str) -> list[Config]:
    info = INFO[name]
    entries = [(device, inp.kwargs, inp.desc)
               for device in ("cpu", "cuda", "mps") for inp in info.optim_inputs_func(device=device)]
    entries += [("lrfuse", kwargs, desc) for kwargs, desc in EXTRA[name]]
    configs, seen = [], set()
    for device, kwargs, desc in entries:
        kwargs = dict(kwargs)
        if kwargs.pop("capturable", False):  # CUDA-graph only; see the module docstring
            desc = f"{desc} (capturable dropped)"
        key = repr(sorted(kwargs.items()))
        if key in seen:
            continue
        seen.add(key)
        tag = "" if device == "cpu" else f"{device}: "
        configs.append(Config(name, _slug(tag + desc), kwargs))
    return configs


def _all_configs(name: str) -> list[Config]:
    info = INFO[name]
    flags = ["foreach"] + (["fused"] if "fused" in info.supported_impls and "cpu" in info.supports_fused_on else [])
    torch_cls = PAIRS[name][1]
    out = []
    for base in BASE[name]:
        off = {flag: False for flag in flags}
        variants = [(base.desc, {**base.kwargs, **off})]
        variants += [(f"{base.desc}_{flag}", {**base.kwargs, **off, flag: True}) for flag in flags]
        for desc, kwargs in variants:
            if _torch_accepts(torch_cls, kwargs):  # else an error input: see test_errors
                out.append(Config(name, desc, kwargs))
    return out


BASE = {name: _base_configs(name) for name in PAIRS}
ALL = {name: _all_configs(name) for name in PAIRS}
BASE_CONFIGS = [c for name in PAIRS for c in BASE[name]]
ALL_CONFIGS = [c for name in PAIRS for c in ALL[name]]


def over(configs):
    return pytest.mark.parametrize("cfg", configs, ids=[c.id for c in configs])


by_name = pytest.mark.parametrize("name", list(PAIRS))


# ------------------------------------------------------------------------------------------------
# Helpers


def leaf(t: Tensor) -> Tensor:
    return t.detach().requires_grad_()


def clone_leaf(p: Tensor) -> Tensor:
    """An exact copy of ``p`` with the same strides, as a new leaf."""
    out = torch.empty_strided(p.shape, p.stride(), dtype=p.dtype)
    return leaf(out.copy_(p.detach()))


def make_params(dtype: torch.dtype, seed: int = 0) -> list[Tensor]:
    """Contiguous, strided, transposed, 0-dim and empty parameters; with a complex dtype the last
    one stays real (torch's test_complex mixes them too)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, dt=dtype):
        return torch.randn(*shape, generator=gen, dtype=dt)

    return [leaf(t) for t in (
        randn(4, 3),
        randn(5, 2)[:, 0],       # non-contiguous
        randn(3, 4).t(),         # transposed
        randn(()),               # 0-dim (torch's tests add one as the last param)
        torch.empty(0, 3, dtype=dtype),  # no elements
        randn(2, 3, dt=torch.float32 if dtype.is_complex else dtype),
    )]


def has_grad(step: int, i: int) -> bool:
    """torch's _compare_between: no gradients at all on step 2, a frozen layer on steps 3 and 4;
    and here one parameter that gets its first gradient only on step 1."""
    return step != 2 and not (i == 0 and step in (3, 4)) and not (i == 5 and step == 0)


def set_grads(params, ref, step: int, rule=lambda step, i: True) -> None:
    gen = torch.Generator().manual_seed(1000 + step)
    for i, (p, q) in enumerate(zip(params, ref)):
        if rule(step, i):
            g = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            p.grad, q.grad = g, g.clone()
        else:
            p.grad = q.grad = None


# torch.testing.assert_close's default tolerances by dtype.
DEFAULT_TOL = {torch.float16: (1e-3, 1e-5), torch.bfloat16: (1.6e-2, 1e-5), torch.float32: (1.3e-6, 1e-5),
               torch.float64: (1e-7, 1e-7), torch.complex64: (1.3e-6, 1e-5), torch.complex128: (1e-7, 1e-7)}


def check_close(actual: Tensor, expected: Tensor, msg, rtol=None, atol=None) -> None:
    """torch.testing.assert_close (dtype, shape and device checked too), with a cheap path for the
    common case where the tensors are close: assert_close itself costs ~100 us a call."""
    if (actual.dtype == expected.dtype and actual.shape == expected.shape and actual.device == expected.device
            and actual.layout == expected.layout == torch.strided):
        if torch.equal(actual, expected):
            return
        if actual.dtype in DEFAULT_TOL:
            default_rtol, default_atol = DEFAULT_TOL[actual.dtype]
            rtol = default_rtol if rtol is None else rtol
            atol = default_atol if atol is None else atol
            if bool(torch.isclose(actual, expected, rtol=rtol, atol=atol, equal_nan=True).all()):
                return
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=msg)


def assert_same(fused, oracle, params, ref, where: str, **tol) -> None:
    """Parameters and every state entry agree (torch's default tolerances by dtype, dtypes equal);
    a parameter has state in one exactly when it has it in the other."""
    for i, (p, q) in enumerate(zip(params, ref)):
        check_close(p.detach(), q.detach(), lambda m: f"{where}, param {i}: {m}", **tol)
        assert (p in fused.state) == (q in oracle.state), f"{where}, param {i}: state created in only one"
        mine, theirs = fused.state.get(p, {}), oracle.state.get(q, {})
        assert mine.keys() == theirs.keys(), f"{where}, param {i}: state keys {sorted(mine)} != {sorted(theirs)}"
        for key, value in theirs.items():
            if isinstance(value, Tensor):
                assert isinstance(mine[key], Tensor), f"{where}, param {i}, {key!r}: {type(mine[key])}"
                check_close(mine[key], value, lambda m: f"{where}, param {i}, state {key!r}: {m}", **tol)
            else:
                assert mine[key] == value, f"{where}, param {i}, state {key!r}: {mine[key]!r} != {value!r}"


def pair_over(cfg: Config, params: list[Tensor]) -> tuple[list[Tensor], torch.optim.Optimizer, torch.optim.Optimizer]:
    """Exact copies of ``params``, the fused optimizer of ``cfg`` over ``params`` and torch's
    for-loop over the copies."""
    fused_cls, torch_cls = PAIRS[cfg.name]
    ref = [clone_leaf(p) for p in params]
    return ref, fused_cls(params, **cfg.make()), torch_cls(ref, **cfg.forloop())


def step_both(fused, oracle, params, ref, steps, rule=lambda step, i: True, where: str | None = None, **tol) -> None:
    """Both optimizers through ``steps`` on the same gradients; after each step, when ``where`` is
    given, parameters and state must agree (:func:`assert_same`)."""
    for step in steps:
        set_grads(params, ref, step, rule)
        fused.step()
        oracle.step()
        if where is not None:
            assert_same(fused, oracle, params, ref, f"{where}step {step}", **tol)



@torch.no_grad()
def resync(oracle, fused, ref, params) -> None:
    """Copies the fused optimizer's parameters and state into the oracle's, so that the next step
    is compared from identical values. Past torch's seven compared steps, the last-place
    differences of a fused kernel (torch's own fused Adam has them too) otherwise compound on
    an ill-conditioned quadratic (centered RMSprop near the optimum) until the tolerance is spent."""
    for p, q in zip(params, ref):
        q.copy_(p)
        for key, value in fused.state.get(p, {}).items():
            if isinstance(value, Tensor):
                oracle.state[q][key].copy_(value)


def assert_tree(a, b, where: str = "", **tol) -> None:
    """Nested dicts / lists / tensors equal: tensors by assert_close (``tol``), the rest by ==."""
    if isinstance(b, Tensor):
        assert isinstance(a, Tensor), f"{where}: {type(a).__name__} vs a tensor"
        check_close(a, b, lambda m: f"{where}: {m}", **tol)
    elif isinstance(b, dict):
        assert isinstance(a, dict) and a.keys() == b.keys(), f"{where}: keys {list(a)} != {list(b)}"
        for k in b:
            assert_tree(a[k], b[k], f"{where}[{k!r}]", **tol)
    elif isinstance(b, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), f"{where}: {a!r} != {b!r}"
        for k, (x, y) in enumerate(zip(a, b)):
            assert_tree(x, y, f"{where}[{k}]", **tol)
    else:
        assert a == b and type(a) is type(b), f"{where}: {a!r} != {b!r}"


EXACT = {"rtol": 0, "atol": 0}


def without_names(state_dict: dict) -> dict:
    out = copy.deepcopy(state_dict)
    for group in out["param_groups"]:
        group.pop("param_names", None)
    return out


def named(params, is_named: bool):
    return [(f"name{i}", p) for i, p in enumerate(params)] if is_named else params


def through_disk(obj, weights_only: bool = True):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=weights_only)


def linear_problem(seed: int = 0, shape=(2, 3), contiguous: bool = True):
    """torch's ``(weight.mv(input) + bias).pow(2).sum()`` problem."""
    gen = torch.Generator().manual_seed(seed)
    rows, cols = shape
    if contiguous:
        weight = Parameter(torch.randn(rows, cols, generator=gen))
        bias = Parameter(torch.randn(rows, generator=gen))
    else:
        weight = Parameter(torch.randn(rows, cols, 2, generator=gen)[..., 0])
        bias = Parameter(torch.randn(rows, 2, generator=gen)[..., 0])
    inp = torch.randn(cols, generator=gen)
    return weight, bias, inp


def loss_closure(opt, weight, bias, inp):
    def closure():
        opt.zero_grad()
        loss = (weight.mv(inp) + bias).pow(2).sum()
        loss.backward()
        return loss
    return closure


def clone_param(p: Tensor) -> Parameter:
    with torch.no_grad():
        return Parameter(p.clone())


def small_mlp(seed: int = 1):
    """Two layers, four parameters named 0.weight, 0.bias, 1.weight, 1.bias (as torch's conv +
    batch-norm model, at a fraction of the cost)."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))


def fwd_bwd(opt, model, inp):
    opt.zero_grad()
    loss = model(inp).pow(2).sum()
    loss.backward()
    return loss


# ------------------------------------------------------------------------------------------------
# Correctness against torch's for-loop (test_foreach_matches_forloop / test_fused_matches_forloop)


DTYPES = [torch.float32, torch.float64, torch.complex64]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@over(ALL_CONFIGS)
def test_matches_forloop(cfg, dtype):
    """Seven steps beside torch's for-loop with gradients that come and go; parameters and every
    state tensor (dtype included) after each step."""
    if dtype.is_complex and not INFO[cfg.name].supports_complex:
        pytest.skip("torch does not support complex parameters for this optimizer")
    params = make_params(dtype)
    ref, fused, oracle = pair_over(cfg, params)
    step_both(fused, oracle, params, ref, range(STEPS), has_grad, where="")


# ------------------------------------------------------------------------------------------------
# Errors (test_errors)


ERROR_CASES = [
    pytest.param(name, i, id=f"{name}-{_slug(entry.optimizer_error_input.desc)}")
    for name in PAIRS
    for i, entry in enumerate(INFO[name].optim_error_inputs_func(device="cpu", dtype=torch.float32))
]


def _expect(error_type, regex):
    if issubclass(error_type, Warning):
        return pytest.warns(error_type, match=regex)
    return pytest.raises(error_type, match=regex)


@pytest.mark.parametrize("name, index", ERROR_CASES)
def test_errors(name, index):
    """Every error input of torch's database: the fused class raises what torch's class raises, at
    construction or at step as torch does."""
    fused_cls, torch_cls = PAIRS[name]
    entry = INFO[name].optim_error_inputs_func(device="cpu", dtype=torch.float32)[index]
    inp = entry.optimizer_error_input
    expected = {torch_cls: (entry.error_type, entry.error_regex), fused_cls: (entry.error_type, entry.error_regex)}
    if issubclass(entry.error_type, Warning) and "duplicate" in inp.desc:
        # A parameter listed twice in one group: torch only warns (and would update it twice per
        # step); lrfuse refuses it on purpose (tests/test_errors.py::test_parameter_listed_twice_in_a_group).
        expected[fused_cls] = (ValueError, "listed twice")
    for cls in (torch_cls, fused_cls):  # torch's first, so a change in torch shows as such
        error_type, regex = expected[cls]
        if entry.error_on == OptimizerErrorEnum.CONSTRUCTION_ERROR:
            with _expect(error_type, regex):
                cls(inp.params, **copy.deepcopy(inp.kwargs))
        else:
            opt = cls(inp.params, **copy.deepcopy(inp.kwargs))
            with _expect(error_type, regex):
                opt.step()


@pytest.mark.parametrize("name", [n for n, (_, torch_cls) in PAIRS.items()
                                  if "capturable" in inspect.signature(torch_cls.__init__).parameters])
def test_capturable_is_refused_on_cpu_at_step(name):
    """capturable=True with CPU parameters: accepted by the constructor, refused by step (torch
    raises an AssertionError there), and nothing updated."""
    fused_cls, torch_cls = PAIRS[name]
    for cls in (torch_cls, fused_cls):
        p = leaf(torch.randn(3))
        p.grad = torch.randn(3)
        before = p.detach().clone()
        opt = cls([p], capturable=True)
        with pytest.raises((AssertionError, RuntimeError), match="capturable"):
            opt.step()
        assert torch.equal(p.detach(), before), cls.__name__


@by_name
def test_differentiable_is_refused(name):
    fused_cls, _ = PAIRS[name]
    with pytest.raises(ValueError, match="differentiable"):
        fused_cls([leaf(torch.randn(3))], differentiable=True)


# ------------------------------------------------------------------------------------------------
# state_dict


@over(ALL_CONFIGS)
def test_state_dict_deterministic(cfg):
    """Save after priming, load into a fresh optimizer over equal (not identical) parameters, then
    both continue identically; their state_dicts are then equal; loading leaves its argument
    unchanged; a repeated group has the same representation. With and without parameter names."""
    fused_cls, _ = PAIRS[cfg.name]
    for named0, named1 in ((False, False), (True, False), (False, True), (True, True)):
        weight, bias, inp = linear_problem()
        opt = fused_cls(named([weight, bias], named0), **cfg.make())
        closure = loss_closure(opt, weight, bias, inp)
        for _ in range(5):
            opt.step(closure)
        weight_c, bias_c = clone_param(weight), clone_param(bias)
        opt_c = fused_cls(named([weight_c, bias_c], named1), **cfg.make())
        closure_c = loss_closure(opt_c, weight_c, bias_c, inp)
        saved = copy.deepcopy(opt.state_dict())
        given = copy.deepcopy(saved)
        opt_c.load_state_dict(given)
        assert_tree(given, saved, "state_dict after load_state_dict", **EXACT)
        for step in range(5):
            opt.step(closure)
            opt_c.step(closure_c)
            torch.testing.assert_close(weight_c, weight, msg=lambda m: f"named={named0, named1} step {step}: {m}")
            torch.testing.assert_close(bias_c, bias, msg=lambda m: f"named={named0, named1} step {step}: {m}")
        assert_tree(without_names(opt_c.state_dict()), without_names(opt.state_dict()), "state_dict")
        opt_c.param_groups.extend(opt_c.param_groups)
        assert_tree(without_names(opt_c.state_dict())["param_groups"][-1],
                    without_names(opt.state_dict())["param_groups"][-1], "repeated group")


@over(ALL_CONFIGS)
def test_load_nontensor_step(cfg):
    """A state_dict whose ``step`` is a Python number (older checkpoints) loads, and the next step
    is torch's after the same load."""
    gen = torch.Generator().manual_seed(0)
    params = [Parameter(torch.randn(2, 3, generator=gen)) for _ in range(2)]
    ref, fused, oracle = pair_over(cfg, params)
    step_both(fused, oracle, params, ref, range(3))
    for opt in (fused, oracle):
        state_dict = copy.deepcopy(opt.state_dict())
        for state in state_dict["state"].values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].item()
        opt.load_state_dict(state_dict)
    assert_same(fused, oracle, params, ref, "after loading")
    step_both(fused, oracle, params, ref, range(3, 5), where="")


@pytest.mark.parametrize("direction", ["torch_to_fused", "fused_to_torch"])
@over(BASE_CONFIGS)
def test_state_dict_across_implementations(cfg, direction):
    """Train with one class, torch.save / torch.load(weights_only=True) its state_dict, load it
    into the other class: the state_dict reads back equal and the run continues as the first."""
    fused_cls, torch_cls = PAIRS[cfg.name]
    first_cls, second_cls = (torch_cls, fused_cls) if direction == "torch_to_fused" else (fused_cls, torch_cls)
    params = make_params(torch.float32)[:3]
    groups = lambda ps: [{"params": ps[:2]}, {"params": ps[2:], "lr": 0.02}]  # noqa: E731
    first = first_cls(groups(params), **cfg.make())
    late = lambda step, i: i != 1 or step >= 3  # noqa: E731 - no state for param 1 when saved
    for step in range(3):
        set_grads(params, params, step, late)
        first.step()
    resumed = [clone_leaf(p) for p in params]
    second = second_cls(groups(resumed), **cfg.make())
    second.load_state_dict(through_disk(first.state_dict()))
    assert_tree(second.state_dict(), first.state_dict(), "state_dict after loading", **EXACT)
    for step in range(3, 6):
        set_grads(params, resumed, step)
        first.step()
        second.step()
        assert_same(second, first, resumed, params, f"step {step}")


@over(ALL_CONFIGS)
def test_state_dict_matches_torch(cfg):
    """After identical training the fused class's state_dict is torch's: same param_groups
    (every key and value), same state keys, dtypes, shapes and values."""
    params = make_params(torch.float32)
    ref, fused, oracle = pair_over(cfg, params)
    # The same arguments, flags included, give torch's param_groups; its numbers come from the
    # for-loop (torch's fused CPU Adam gets strided and transposed parameters wrong).
    same_args = PAIRS[cfg.name][1]([clone_leaf(p) for p in params], **cfg.make())
    step_both(fused, oracle, params, ref, range(3), has_grad)
    mine = fused.state_dict()
    assert_tree(mine["param_groups"], same_args.state_dict()["param_groups"], "param_groups", **EXACT)
    assert_tree(mine["state"], oracle.state_dict()["state"], "state")


@over(ALL_CONFIGS)
def test_save_load_equality_with_weights_only(cfg):
    fused_cls, _ = PAIRS[cfg.name]
    for is_named in (False, True):
        weight, bias, inp = linear_problem()
        opt = fused_cls(named([weight, bias], is_named), **cfg.make())
        closure = loss_closure(opt, weight, bias, inp)
        for _ in range(3):
            opt.step(closure)
        state_dict = opt.state_dict()
        assert_tree(through_disk(state_dict, weights_only=False), state_dict, "torch.load", **EXACT)
        assert_tree(through_disk(state_dict, weights_only=True), state_dict, "torch.load(weights_only)", **EXACT)


@over(ALL_CONFIGS)
def test_can_load_older_state_dict(cfg):
    """A state_dict from before the flags torch added later (foreach, maximize, capturable, ...)
    loads and steps, as torch's does after the same load. (torch's test trains a conv + batch-norm
    model, whose summed output gives gradients of rounding-noise size that Adam / RMSprop blow up to
    full steps: fine for "it still steps", useless for a comparison, so a small MLP here.)"""
    fused_cls, torch_cls = PAIRS[cfg.name]
    model = small_mlp()
    model_ref = copy.deepcopy(model)
    inp = torch.rand(5, 4, generator=torch.Generator().manual_seed(0))
    fused = fused_cls(model.parameters(), **cfg.make())
    oracle = torch_cls(model_ref.parameters(), **cfg.forloop())
    for opt, mod in ((fused, model), (oracle, model_ref)):
        for _ in range(3):
            fwd_bwd(opt, mod, inp)
            opt.step()
        old = copy.deepcopy(opt.state_dict())
        for group in old["param_groups"]:
            for flag in INFO[cfg.name].not_og_supported_flags:
                group.pop(flag, None)
        opt.load_state_dict(old)
        fwd_bwd(opt, mod, inp)
        opt.step()
    assert_same(fused, oracle, list(model.parameters()), list(model_ref.parameters()), "after loading")


@pytest.mark.parametrize("named0, named1", [(False, False), (True, False), (False, True), (True, True)])
@by_name
def test_can_load_from_to_named_state_dict(name, named0, named1):
    fused_cls, _ = PAIRS[name]
    for cfg in BASE[name]:  # the flags do not touch names
        model = small_mlp()
        inp = torch.rand(5, 4)
        opt = fused_cls(model.named_parameters() if named0 else model.parameters(), **cfg.make())
        for _ in range(3):
            fwd_bwd(opt, model, inp)
            opt.step()
        opt2 = fused_cls(model.named_parameters() if named1 else model.parameters(), **cfg.make())
        opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
        fwd_bwd(opt2, model, inp)
        opt2.step()
        if named0 or named1:
            assert opt2.state_dict()["param_groups"][0]["param_names"] == ["0.weight", "0.bias", "1.weight", "1.bias"]


@by_name
def test_load_state_dict_errors_are_torchs(name):
    """A state_dict whose groups do not match is refused with torch's error and message."""
    fused_cls, torch_cls = PAIRS[name]

    def saved():
        a, b = leaf(torch.randn(2)), leaf(torch.randn(3))
        return torch_cls([{"params": [a]}, {"params": [b]}]).state_dict()

    cases = {
        "fewer groups": lambda ps: [{"params": ps}],
        "group of another size": lambda ps: [{"params": ps[:1]}, {"params": ps[1:]}],
    }
    for case, groups in cases.items():
        errors = []
        for cls in (torch_cls, fused_cls):
            params = [leaf(torch.randn(2)), leaf(torch.randn(3)), leaf(torch.randn(4))]
            opt = cls(groups(params))
            with pytest.raises(Exception) as info:
                opt.load_state_dict(saved())
            errors.append(info.value)
        theirs, mine = errors
        assert type(mine) is type(theirs) and str(mine) == str(theirs), f"{case}: {mine!r} vs torch's {theirs!r}"


@by_name
def test_load_state_dict_saved_under_float64_default(name):
    """A state_dict saved under torch.set_default_dtype(torch.float64) (``step`` is float64 then)
    loads under the float32 default and continues as torch's does."""
    fused_cls, torch_cls = PAIRS[name]
    for cfg in BASE[name]:
        old = torch.get_default_dtype()
        try:
            torch.set_default_dtype(torch.float64)
            params = [leaf(torch.randn(3, 2, dtype=torch.float32))]
            saver = torch_cls(params, **cfg.forloop())
            set_grads(params, params, 0)
            saver.step()
            saved = copy.deepcopy(saver.state_dict())
        finally:
            torch.set_default_dtype(old)
        start = params[0].detach()
        mine, ref = [leaf(start.clone())], [leaf(start.clone())]
        fused = fused_cls(mine, **cfg.make())
        oracle = torch_cls(ref, **cfg.forloop())
        fused.load_state_dict(copy.deepcopy(saved))
        oracle.load_state_dict(copy.deepcopy(saved))
        step_both(fused, oracle, mine, ref, range(1, 3), where=f"{cfg.id} ")


@by_name
def test_integer_param_without_grad(name):
    """torch accepts a parameter list holding an integer tensor (it never gets a gradient, so it
    is skipped at step; torch's test_mixed_device_dtype passes one); so must the drop-in."""
    fused_cls, torch_cls = PAIRS[name]
    for cfg in BASE[name]:
        counter = torch.arange(6).reshape(2, 3)
        params = [leaf(torch.randn(3, 2)), counter, leaf(torch.randn(4))]
        ref = [clone_leaf(params[0]), counter.clone(), clone_leaf(params[2])]
        fused = fused_cls(params, **cfg.make())
        oracle = torch_cls(ref, **cfg.forloop())
        step_both(fused, oracle, params, ref, range(3), lambda step, i: i != 1, where=f"{cfg.id} ")
        assert torch.equal(counter, torch.arange(6).reshape(2, 3))


# ------------------------------------------------------------------------------------------------
# Hooks


def _run_step_hook_test(name, register, expected_per_step):
    fused_cls, _ = PAIRS[name]
    for cfg in ALL[name]:
        p = leaf(torch.tensor([1.0, 1.0]))
        p.grad = torch.ones(2)
        opt = fused_cls([p], **cfg.make())
        seen = []

        def hook(optimizer, args, kwargs):
            assert optimizer is opt
            seen.append(p.detach().clone())

        handle = register(opt, hook)
        values = [p.detach().clone()]
        for _ in range(2):
            opt.step()
            values.append(p.detach().clone())
        assert len(seen) == 2, cfg.id
        for got, want in zip(seen, expected_per_step(values)):
            assert torch.equal(got, want), f"{cfg.id}: the hook saw {got}, expected {want}"
        handle.remove()
        opt.step()
        assert len(seen) == 2, f"{cfg.id}: a removed hook still runs"


@by_name
def test_step_pre_hook(name):
    """Runs before each step (it sees the parameters not yet updated) until removed."""
    _run_step_hook_test(name, lambda opt, h: opt.register_step_pre_hook(h), lambda values: values[:2])


@by_name
def test_step_post_hook(name):
    """Runs after each step (it sees the updated parameters) until removed."""
    _run_step_hook_test(name, lambda opt, h: opt.register_step_post_hook(h), lambda values: values[1:])


@by_name
def test_step_all_hooks(name):
    """Global and per-optimizer hooks in torch's order: global pre, local pre, local post, global post."""
    fused_cls, _ = PAIRS[name]
    for cfg in ALL[name]:
        params = [leaf(torch.tensor([1.0, 1.0]))]
        params[0].grad = torch.ones(2)
        opt = fused_cls(params, **cfg.make())
        opt2 = torch.optim.SGD(params)
        data = []
        handles = [
            register_optimizer_step_pre_hook(lambda *a: data.append(0)),
            register_optimizer_step_post_hook(lambda *a: data.append(5)),
        ]
        try:
            for o in (opt, opt2):
                handles.append(o.register_step_pre_hook(lambda *a: data.append(1)))
                handles.append(o.register_step_post_hook(lambda *a: data.append(2)))
            opt.step()
            assert data == [0, 1, 2, 5]
            opt2.step()
            assert data == [0, 1, 2, 5] * 2
            opt.step()
            assert data == [0, 1, 2, 5] * 3
        finally:
            for handle in handles:
                handle.remove()
        opt.step()
        opt2.step()
        assert data == [0, 1, 2, 5] * 3, cfg.id


def _state_dict_pre_hook(optimizer):
    optimizer.state["test"] = 1


def _state_dict_post_hook(optimizer, state_dict):
    state_dict["ran_state_dict_pre_hook"] = "test" in state_dict["state"]
    state_dict["state"].pop("test", None)
    return state_dict


def _fresh_optimizers(name):
    fused_cls, _ = PAIRS[name]
    for cfg in ALL[name]:
        yield cfg, fused_cls([leaf(torch.rand(2, 3))], **cfg.make())


@by_name
def test_state_dict_pre_hook(name):
    for cfg, opt in _fresh_optimizers(name):
        opt.register_state_dict_pre_hook(_state_dict_pre_hook)
        assert opt.state_dict()["state"]["test"] == 1, cfg.id


@by_name
def test_state_dict_post_hook(name):
    for cfg, opt in _fresh_optimizers(name):
        opt.register_state_dict_post_hook(_state_dict_post_hook)
        assert opt.state_dict()["ran_state_dict_pre_hook"] is False, cfg.id


@by_name
def test_state_dict_pre_post_hook(name):
    for cfg, opt in _fresh_optimizers(name):
        opt.register_state_dict_pre_hook(_state_dict_pre_hook)
        opt.register_state_dict_post_hook(_state_dict_post_hook)
        state_dict = opt.state_dict()
        assert "test" not in state_dict["state"] and state_dict["ran_state_dict_pre_hook"] is True, cfg.id


def _load_pre_hook_sets_lr_002(optimizer, state_dict):
    state_dict["param_groups"][0]["lr"] = 0.002


def _load_pre_hook_returns_lr_003(optimizer, state_dict):
    mine = copy.deepcopy(state_dict)
    mine["param_groups"][0]["lr"] = 0.003
    return mine


def _load_post_hook(optimizer):
    optimizer.state["ran_load_state_dict_pre_hook2"] = optimizer.param_groups[0]["lr"] == 0.003
    optimizer.state["ran_load_state_dict_post_hook"] = True


@by_name
def test_load_state_dict_pre_hook_and_prepend(name):
    for cfg, opt in _fresh_optimizers(name):
        state_dict = opt.state_dict()
        opt.register_load_state_dict_pre_hook(_load_pre_hook_sets_lr_002)
        opt.load_state_dict(state_dict)
        assert opt.param_groups[0]["lr"] == 0.002, cfg.id
        opt.register_load_state_dict_pre_hook(_load_pre_hook_returns_lr_003, prepend=True)
        opt.load_state_dict(state_dict)
        assert opt.param_groups[0]["lr"] == 0.002, cfg.id  # the prepended hook ran first


@by_name
def test_load_state_dict_post_hook(name):
    for cfg, opt in _fresh_optimizers(name):
        opt.register_load_state_dict_post_hook(_load_post_hook)
        opt.load_state_dict(opt.state_dict())
        assert not opt.state["ran_load_state_dict_pre_hook2"], cfg.id
        assert opt.state["ran_load_state_dict_post_hook"] is True, cfg.id


@by_name
def test_load_state_dict_pre_post_hook(name):
    for cfg, opt in _fresh_optimizers(name):
        opt.register_load_state_dict_pre_hook(_load_pre_hook_returns_lr_003)
        opt.register_load_state_dict_post_hook(_load_post_hook)
        opt.load_state_dict(opt.state_dict())
        assert opt.state["ran_load_state_dict_pre_hook2"], cfg.id
        assert opt.state["ran_load_state_dict_post_hook"] is True, cfg.id


# ------------------------------------------------------------------------------------------------
# Parameter groups, tensor lr, LR schedulers


@over(ALL_CONFIGS)
def test_param_groups_lr(cfg):
    """A group's own lr applies; the other group, at an outer lr of 1e-28, does not move. Beside
    torch's for-loop with the same groups."""
    fused_cls, torch_cls = PAIRS[cfg.name]
    kwargs = cfg.make()
    if "lr" not in kwargs or kwargs["lr"] == 0:
        kwargs["lr"] = 1e-3
    ref_kwargs = {**{k: v for k, v in copy.deepcopy(kwargs).items() if k not in CLIQUEY}, "foreach": False}
    weight, bias, inp = linear_problem(shape=(10, 5))
    irrelevant = Parameter(torch.randn(2))
    irrelevant_before = irrelevant.detach().clone()
    params = [weight, bias, irrelevant]
    ref = [clone_param(p) for p in params]
    opt = fused_cls([dict(params=params[:2], **kwargs), dict(params=params[2:])], lr=1e-28)
    oracle = torch_cls([dict(params=ref[:2], **ref_kwargs), dict(params=ref[2:])], lr=1e-28, foreach=False)
    initial = None
    for step in range(20):
        for o, (w, b, irr) in ((opt, params), (oracle, ref)):
            loss = loss_closure(o, w, b, inp)()
            irr.grad = torch.rand(2, generator=torch.Generator().manual_seed(step))
            if initial is None:
                initial = loss.item()
            o.step()
        assert_same(opt, oracle, params, ref, f"step {step}")
        if step >= STEPS:
            resync(oracle, opt, ref, params)
    final = (weight.mv(inp) + bias).pow(2).sum().item()
    assert (final > initial) if cfg.maximize else (final < initial)
    torch.testing.assert_close(irrelevant.detach(), irrelevant_before)


@over(ALL_CONFIGS)
def test_param_groups_weight_decay(cfg):
    fused_cls, torch_cls = PAIRS[cfg.name]
    weight, bias, inp = linear_problem(shape=(10, 5))
    params = [weight, bias]
    ref = [clone_param(p) for p in params]
    opt = fused_cls([dict(params=[weight], **cfg.make()), dict(params=[bias], **cfg.make(weight_decay=0.0))])
    oracle = torch_cls([dict(params=[ref[0]], **cfg.forloop()), dict(params=[ref[1]], **cfg.forloop(weight_decay=0.0))])
    initial = None
    for step in range(20):
        for o, (w, b) in ((opt, params), (oracle, ref)):
            loss = loss_closure(o, w, b, inp)()
            initial = loss.item() if initial is None else initial
            o.step()
        assert_same(opt, oracle, params, ref, f"step {step}")
        if step >= STEPS:
            resync(oracle, opt, ref, params)
    final = (weight.mv(inp) + bias).pow(2).sum().item()
    assert (final > initial) if cfg.maximize else (final < initial)


@over(ALL_CONFIGS)
def test_tensor_lr(cfg):
    """lr as a 0-dim tensor gives what the float lr gives (torch's test_tensor_lr), also after the
    tensor is changed in place, and both follow torch's for-loop."""
    fused_cls, torch_cls = PAIRS[cfg.name]
    kwargs = cfg.make()
    kwargs.pop("lr", None)
    weight, bias, inp = linear_problem(shape=(10, 5))
    float_params = [weight, bias]
    tensor_params = [clone_param(p) for p in float_params]
    ref = [clone_param(p) for p in float_params]
    with_float = fused_cls(float_params, lr=1e-3, **copy.deepcopy(kwargs))
    try:
        with_tensor = fused_cls(tensor_params, lr=torch.tensor(1e-3), **copy.deepcopy(kwargs))
    except ValueError as e:  # foreach=True: torch refuses a tensor lr, and so must we
        assert "lr as a Tensor is not supported" in str(e)
        return
    oracle = torch_cls(ref, **cfg.forloop(lr=1e-3))
    for step in range(8):
        if step == 5:  # a scheduler or a compiled step changes the tensor in place
            with_tensor.param_groups[0]["lr"].fill_(1e-2)
            with_float.param_groups[0]["lr"] = oracle.param_groups[0]["lr"] = 1e-2
        for o, (w, b) in ((with_float, float_params), (with_tensor, tensor_params), (oracle, ref)):
            loss_closure(o, w, b, inp)()
            o.step()
        assert_same(with_tensor, with_float, tensor_params, float_params, f"tensor vs float lr, step {step}")
        assert_same(with_tensor, oracle, tensor_params, ref, f"tensor lr vs torch, step {step}")


SCHEDULERS = [pytest.param(name, sched, id=f"{name}-" + ("no_scheduler" if sched is None else f"schedulers{sched}"))
              for name in PAIRS for sched in [None, *range(len(INFO[name].scheduler_inputs))]]


@pytest.mark.parametrize("name, sched", SCHEDULERS)
def test_lr_scheduler(name, sched):
    """test_forloop_goes_right_direction (with_lrsched) and
    test_param_group_with_lrscheduler_goes_right_direction: torch's scheduler combinations for
    this optimizer drive the fused class exactly as they drive torch's, over two groups (strided
    parameters too, without a scheduler); the loss goes the right way."""
    fused_cls, torch_cls = PAIRS[name]
    makers = [] if sched is None else INFO[name].scheduler_inputs[sched]
    for cfg in BASE[name]:
        for contiguous in (True, False) if sched is None else (True,):
            weight, bias, inp = linear_problem(shape=(10, 5), contiguous=contiguous)
            params = [weight, bias]
            ref = [clone_leaf(p) for p in params]
            groups = lambda ps: [{"params": [ps[0]]}, {"params": [ps[1]], "lr": 0.01}]  # noqa: E731
            opt = fused_cls(groups(params), **cfg.make())
            oracle = torch_cls(groups(ref), **cfg.forloop())
            scheds = {opt: [m(opt) for m in makers], oracle: [m(oracle) for m in makers]}
            initial = (weight.mv(inp) + bias).pow(2).sum().item()
            for step in range(20):
                for o, (w, b) in ((opt, params), (oracle, ref)):
                    loss = loss_closure(o, w, b, inp)()
                    o.step()
                    for s in scheds[o]:
                        s.step(loss.detach()) if isinstance(s, ReduceLROnPlateau) else s.step()
                where = f"{cfg.id} contiguous={contiguous} step {step}"
                assert_same(opt, oracle, params, ref, where)
                assert [float(g["lr"]) for g in opt.param_groups] == [float(g["lr"]) for g in oracle.param_groups], where
                if step >= STEPS:
                    resync(oracle, opt, ref, params)
            final = (weight.mv(inp) + bias).pow(2).sum().item()
            assert (final > initial) if cfg.maximize else (final < initial), cfg.id


# ------------------------------------------------------------------------------------------------
# Complex parameters (test_complex, test_complex_2d)


@over(ALL_CONFIGS)
def test_complex(cfg):
    """Complex parameters (mixed with a real one) step exactly as their view_as_real twins, at every
    step."""
    fused_cls, _ = PAIRS[cfg.name]
    gen = torch.Generator().manual_seed(0)
    complex_params = [leaf(torch.randn(4, 3, dtype=torch.complex64, generator=gen)),
                      leaf(torch.randn(4, dtype=torch.complex64, generator=gen)),
                      leaf(torch.randn(4, 3, generator=gen))]
    real_params = [leaf(torch.view_as_real(p.detach()).clone() if p.is_complex() else p.detach().clone())
                   for p in complex_params]
    complex_opt = fused_cls(complex_params, **cfg.make())
    real_opt = fused_cls(real_params, **cfg.make())
    for step in range(3):
        for c, r in zip(complex_params, real_params):
            r.grad = torch.randn(r.shape, generator=gen)
            c.grad = torch.view_as_complex(r.grad.clone()) if c.is_complex() else r.grad.clone()
        complex_opt.step()
        real_opt.step()
        for c, r in zip(complex_params, real_params):
            as_real = torch.view_as_real(c.detach()) if c.is_complex() else c.detach()
            torch.testing.assert_close(as_real, r.detach(), msg=lambda m: f"step {step}: {m}")


@over(ALL_CONFIGS)
def test_complex_2d(cfg):
    """A complex pair of numbers steps as its real and imaginary parts optimized separately, on
    torch's Rosenbrock loss."""
    fused_cls, _ = PAIRS[cfg.name]

    def rosenbrock(t):
        x, y = t
        return (1 - x) ** 2 + 100 * (y - x**2) ** 2

    a1 = leaf(torch.randn(2, dtype=torch.complex64, generator=torch.Generator().manual_seed(0)))
    a1_real, a1_imag = leaf(a1.real.detach().clone()), leaf(a1.imag.detach().clone())
    opt1 = fused_cls([a1], **cfg.make())
    opt2 = fused_cls([a1_real, a1_imag], **cfg.make())
    for step in range(3):
        opt1.zero_grad()
        rosenbrock(a1).abs().backward()
        opt2.zero_grad()
        rosenbrock(torch.complex(a1_real, a1_imag)).abs().backward()
        torch.testing.assert_close(a1.grad.real, a1_real.grad)
        torch.testing.assert_close(a1.grad.imag, a1_imag.grad)
        opt1.step()
        opt2.step()
        torch.testing.assert_close(a1.real.detach(), a1_real.detach(), msg=lambda m: f"step {step}: {m}")
        torch.testing.assert_close(a1.imag.detach(), a1_imag.detach(), msg=lambda m: f"step {step}: {m}")


# ------------------------------------------------------------------------------------------------
# Gradients that are missing or zero, zero_grad


@by_name
def test_step_is_noop_when_params_have_no_grad(name):
    fused_cls, _ = PAIRS[name]
    for cfg in ALL[name]:
        params = [torch.randn(2, 3) for _ in range(2)]
        before = [p.clone() for p in params]
        opt = fused_cls(params, **cfg.make())
        # Adagrad's state, made at construction as torch's is
        created = {p: {k: v.clone() for k, v in state.items()} for p, state in opt.state.items()}
        loss = torch.tensor([1.0])
        assert opt.step(lambda: loss) is loss, cfg.id
        for p, b in zip(params, before):
            assert torch.equal(p, b), cfg.id
        assert len(opt.state) == len(created), cfg.id
        for p, state in created.items():
            assert opt.state[p].keys() == state.keys(), cfg.id
            assert all(torch.equal(opt.state[p][k], v) for k, v in state.items()), cfg.id


ZERO_GRAD_CONFIGS = [c for c in ALL_CONFIGS if not c.kwargs.get("weight_decay")]  # decay moves params


@over(ZERO_GRAD_CONFIGS)
def test_step_is_noop_for_zero_grads(cfg):
    """A zero gradient moves no parameter, bit for bit (every update is 0 / (0 + eps) = 0).
    A class whose default weight decay is not 0 is the exception: AdamW's decoupled 1e-2 shrinks
    the weights by lr * 1e-2 (1e-5 of them at lr 1e-3, ten times torch's float32 rtol), exactly as
    torch's for-loop does, which is what is checked for it."""
    param = leaf(torch.randn(5, 1))
    before = param.detach().clone()
    ref, opt, oracle = pair_over(cfg, [param])
    param.grad, ref[0].grad = torch.zeros_like(param), torch.zeros_like(param)
    opt.step(lambda: torch.tensor([1.0]))
    oracle.step()
    if opt.param_groups[0]["weight_decay"]:  # the class's default
        assert not torch.equal(param.detach(), before), cfg.id
        check_close(param.detach(), ref[0].detach(), cfg.id, atol=0.0)
    else:
        assert torch.equal(param.detach(), before), cfg.id


@by_name
def test_param_without_grad_is_skipped(name):
    """A parameter whose grad is None is not updated, even with weight decay, and gets no state,
    while the others step as torch's do."""
    for cfg in ALL[name]:
        params = [leaf(torch.randn(3, 2)), leaf(torch.randn(4)), leaf(torch.randn(2, 2))]
        untouched = params[1].detach().clone()
        ref, fused, oracle = pair_over(cfg, params)
        step_both(fused, oracle, params, ref, range(3), lambda step, i: i != 1, where=f"{cfg.id} ")
        assert (params[1] in fused.state) == (ref[1] in oracle.state), cfg.id  # Adagrad: made at construction
        assert torch.equal(params[1].detach(), untouched), cfg.id


@by_name
def test_zero_grad(name):
    """zero_grad() drops the gradients (set_to_none) or zeroes them in place, as torch's does,
    and stepping afterwards still follows torch."""
    for cfg in ALL[name]:
        params = make_params(torch.float32)[:3]
        ref, fused, oracle = pair_over(cfg, params)
        step_both(fused, oracle, params, ref, range(1))
        fused.zero_grad()
        oracle.zero_grad()
        assert all(p.grad is None for p in params), cfg.id
        fused.step()  # nothing to do
        oracle.step()
        assert_same(fused, oracle, params, ref, f"{cfg.id} after zero_grad()")
        set_grads(params, ref, 1)
        grads = [p.grad for p in params]
        fused.zero_grad(set_to_none=False)
        oracle.zero_grad(set_to_none=False)
        for p, g in zip(params, grads):
            assert p.grad is g and not p.grad.any(), cfg.id
        fused.step()  # zero gradients: a real step (weight decay, momentum, step count)
        oracle.step()
        assert_same(fused, oracle, params, ref, f"{cfg.id} zero grads")
        set_grads(params, ref, 2)
        fused.step()
        oracle.step()
        assert_same(fused, oracle, params, ref, f"{cfg.id} after zero grads")


@by_name
def test_non_empty_state(name):
    fused_cls, torch_cls = PAIRS[name]
    for cfg in BASE[name]:
        states = []
        for cls in (fused_cls, torch_cls):
            torch.manual_seed(0)
            model = torch.nn.Linear(5, 5)
            opt = cls(model.parameters(), **cfg.make())
            model(torch.rand(2, 5)).sum().backward()
            opt.step()
            states.append([sorted(opt.state[p]) for p in model.parameters() if p in opt.state])
        assert all(states[0]), cfg.id  # a parameter with state has some (SGD without momentum has none)
        assert states[0] == states[1], cfg.id


# ------------------------------------------------------------------------------------------------
# deepcopy, printing, default dtype


@over(ALL_CONFIGS)
def test_deepcopy(cfg):
    """A deep copy keeps every public attribute and works on its own: it steps as the original
    does, and stepping it leaves the original alone."""
    fused_cls, _ = PAIRS[cfg.name]
    params = [Parameter(torch.randn(2, 3)) for _ in range(2)]
    opt = fused_cls(params, **cfg.make())
    for step in range(3):
        set_grads(params, params, step)
        opt.step()
    twin = copy.deepcopy(opt)
    public = lambda o: {k for k in o.__dict__ if not k.startswith("_")}  # noqa: E731
    assert public(twin) == public(opt)
    twin_params = [p for g in twin.param_groups for p in g["params"]]
    assert all(p is not q for p, q in zip(params, twin_params))
    for step in range(3, 5):
        set_grads(params, twin_params, step)
        opt.step()
        twin.step()
        assert_same(twin, opt, twin_params, params, f"step {step}", **EXACT)
    before = [p.detach().clone() for p in params]
    set_grads(twin_params, twin_params, 5)
    twin.step()
    for p, b in zip(params, before):
        assert torch.equal(p.detach(), b), "stepping the copy changed the original"


@by_name
def test_optimizer_can_be_printed(name):
    """repr works, and reads as torch's under the fused class's name."""
    fused_cls, torch_cls = PAIRS[name]
    for cfg in ALL[name]:
        params = [Parameter(torch.randn(2, 3)) for _ in range(2)]
        mine = repr(fused_cls(params, **cfg.make()))
        theirs = repr(torch_cls(params, **cfg.make()))
        assert mine.startswith(fused_cls.__name__ + " ("), mine
        assert mine.removeprefix(fused_cls.__name__) == theirs.removeprefix(torch_cls.__name__), cfg.id


@pytest.mark.parametrize("default_dtype", [torch.float64, torch.float16], ids=str)
@by_name
def test_set_default_dtype(name, default_dtype):
    """test_set_default_dtype_works_with_foreach: under torch.set_default_dtype, ``step`` has
    torch's dtype (float64 under a float64 default, else float32) and the update is torch's."""
    old = torch.get_default_dtype()
    try:
        torch.set_default_dtype(default_dtype)
        expected_step_dtype = torch.float64 if default_dtype == torch.float64 else torch.float32
        for cfg in BASE[name]:
            gen = torch.Generator().manual_seed(0)
            params = [leaf(torch.randn(3, 2, generator=gen, dtype=torch.float64)),
                      leaf(torch.randn(4, generator=gen, dtype=torch.float32))]
            ref, fused, oracle = pair_over(cfg, params)
            for step in range(3):
                step_both(fused, oracle, params, ref, [step], where=f"{cfg.id} ")
                for q in ref:
                    if "step" in oracle.state.get(q, {}):  # SGD keeps none
                        assert oracle.state[q]["step"].dtype == expected_step_dtype  # torch's behaviour
    finally:
        torch.set_default_dtype(old)


def test_configurations_were_found():
    """Guards the parametrisation: torch's database still lists these optimizers with several
    configurations and error inputs."""
    for name in PAIRS:
        assert len(BASE[name]) >= 5 and len(ALL[name]) >= 2 * len(BASE[name]) - 5, name
    assert any(isinstance(c.kwargs.get("betas", (0,))[0], Tensor) and c.kwargs["betas"][0].dim() == 3
               for c in BASE["adam"]), "torch's [1, 1, 1] tensor betas configuration is gone"
    assert len(ERROR_CASES) >= 15
