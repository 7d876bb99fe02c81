"""The fused step shared by FusedAdam, FusedAdamW and FusedRMSprop.

Each fused class is ``FusedX(_FusedStep, torch.optim.X)``: the torch class gives the constructor,
defaults, validation, ``param_groups`` and ``state_dict`` layout, so they are torch's by
construction; this mixin replaces ``step`` with one native call per device that covers every
parameter group. Per-group values reach the kernel through a float64 hyper table, one row per
group (columns in :mod:`lrfuse.ops`), so a changed learning rate costs nothing but a row.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lrfuse import ops


@dataclass
class _Call:
    """The lists of one native call: the tensors of one device sharing one state layout."""

    params: list[Tensor] = field(default_factory=list)
    grads: list[Tensor] = field(default_factory=list)
    states: list[list[Tensor]] = field(default_factory=list)
    steps: list[Tensor] = field(default_factory=list)
    group_of: list[int] = field(default_factory=list)
    grad_index: list[int] = field(default_factory=list)  # where each gradient sits in the step's flat list
    complex_at: list[int] = field(default_factory=list)  # entries passed through view_as_real
    takes_all: bool = False  # the step's flat gradient list is this call's list as it is
    refs: object = None      # C++ references to params, state and steps (ops.hold_refs)

    def refresh(self, grads: list[Tensor | None]) -> None:
        """Takes this step's gradients (backward may have replaced them)."""
        self.grads = grads if self.takes_all else list(map(grads.__getitem__, self.grad_index))
        for k in self.complex_at:
            self.grads[k] = torch.view_as_real(self.grads[k])


@dataclass
class _Plan:
    """The calls of a step, reusable while the parameters, which of them have a gradient, the
    group structure and the state objects stay as they were when it was built."""

    calls: dict[tuple[torch.device, tuple[bool, ...]], _Call]
    checked_natively: bool  # one native call, whose own checks run before any write
    key: tuple = ()         # (id of the state dict, (size, state layout) of each group)
    params: list[Tensor] = field(default_factory=list)  # every parameter of every group, in order
    has_grad: bytes = b""   # which of them had a gradient
    states: list[dict] = field(default_factory=list)    # optimizer.state's values, in order


@dataclass
class _Hyper:
    """A device's hyper table and what it was written from."""

    sources: list[tuple] | None  # each group's `_row_keys` values as the objects they were; None:
                                 # a list among them, so the identity fast path is off
    floats: tuple         # the rows' numbers (None where a cell is a tensor)
    table: Tensor         # on the device; the kernels read it
    host: Tensor          # the host copy it was last written from
    tensor_cells: list[tuple[int, int, Tensor]]  # (row, column, tensor): copied at every call


_grad_of = operator.attrgetter("grad")


def _same_objects(new, old: list) -> bool:
    """Whether ``new`` holds exactly the objects of ``old``, in order: a C-level identity scan."""
    return len(new) == len(old) and all(map(operator.is_, new, old))


class _FusedStep:
    """Mixed in before a ``torch.optim`` class; subclasses set the class attributes below."""

    # GradScaler hands `grad_scale` / `found_inf` to step() instead of unscaling itself.
    _step_supports_amp_scaling = True

    _op: Callable[..., None]                # lrfuse.ops.fused_*_
    _columns: tuple[str, ...]               # hyper-table columns, in the op's order
    _row_keys: tuple[str, ...]              # the group keys a hyper-table row is made from
    _state_keys: tuple[str, ...]            # always present, in the op's order
    _optional_state_keys: tuple[str, ...]   # present when _uses() says so, in the op's order

    @property
    def _all_state_keys(self) -> tuple[str, ...]:
        return self._state_keys + self._optional_state_keys

    def _row(self, values: tuple) -> list:
        """The hyper-table row, in ``_columns`` order, of a group's ``_row_keys`` values."""
        raise NotImplementedError

    def _uses(self, group: dict) -> tuple[bool, ...]:
        """Which optional state keys the group keeps."""
        raise NotImplementedError

    def __init__(self, params, *args, **kwargs) -> None:
        super().__init__(params, *args, **kwargs)
        name = type(self).__name__
        for group in self.param_groups:
            if group.get("differentiable"):
                torch_name = next(b.__name__ for b in type(self).__mro__ if b.__module__.startswith("torch.optim"))
                raise ValueError(f"{name} does not support differentiable=True; use torch.optim.{torch_name} for that")

    def add_param_group(self, param_group: dict) -> None:
        params = param_group["params"]
        if not isinstance(params, (Tensor, set)):  # torch itself rejects a set
            param_group["params"] = params = list(params)
        seen: set[int] = set()
        for i, p in enumerate([params] if isinstance(params, Tensor) else params):
            if isinstance(p, Tensor):
                if id(p) in seen:
                    raise ValueError(
                        f"{type(self).__name__}: parameter {i} of a group is listed twice; "
                        "pass each parameter once (it would be updated twice per step)")
                seen.add(id(p))
                if not (p.is_floating_point() or p.is_complex()):
                    raise ValueError(
                        f"{type(self).__name__}: parameter {i} has dtype {p.dtype}; "
                        "only floating-point and complex parameters can be optimized")
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        """Performs a single optimization step, every parameter group in one native call per device.

        Args:
            closure: A closure that reevaluates the model and returns the loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        calls, grads = self._calls()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        for (device, uses), call in calls.items():
            try:
                type(self)._op(
                    call.params, call.grads, *call.states, call.steps, call.group_of, self._hyper(device),
                    None if grad_scale is None else grad_scale.to(device),
                    None if found_inf is None else found_inf.to(device),
                )
            except NotImplementedError:
                # A sparse gradient dispatches the op away from its kernels before anything is
                # written: name the gradient, as the checks of a rebuilt plan would.
                self._check_grads(grads)
                raise
        return loss

    def _calls(self) -> tuple[dict[tuple[torch.device, tuple[bool, ...]], _Call], list[Tensor | None]]:
        """The native calls of this step, and the gradients of every parameter in group order.

        Building the calls costs microseconds per tensor, so the plan is kept while the
        parameters, which of them have a gradient, the group structure and the state objects stay
        the same (torch and Lightning replace a parameter's state dict, never a tensor inside it);
        then only the gradients, which backward may replace every step, are refreshed. The checks
        use C-level iteration: hashing 2,000 tensors into ``self.state`` would cost more than the
        rest of the step's Python.
        """
        if torch.compiler.is_compiling():  # the compiled graph's guards do the caching
            grads = [p.grad for group in self.param_groups for p in group["params"]]
            return self._build(grads).calls, grads
        params = list(itertools.chain.from_iterable(g["params"] for g in self.param_groups))
        grads = list(map(_grad_of, params))
        key = (id(self.state), tuple((len(g["params"]), self._uses(g)) for g in self.param_groups))
        has_grad = bytes(map(operator.is_not, grads, itertools.repeat(None)))
        plan: _Plan | None = self.__dict__.get("_plan_cache")
        if (plan is None or plan.key != key or plan.has_grad != has_grad
                or not _same_objects(params, plan.params) or not _same_objects(self.state.values(), plan.states)):
            plan = self._build(grads)
            plan.key, plan.params, plan.has_grad = key, params, has_grad
            plan.states = list(self.state.values())
            for call in plan.calls.values():  # the kept tensors box cheaply from now on
                call.refs = ops.hold_refs([*call.params, *itertools.chain(*call.states), *call.steps])
            self.__dict__["_plan_cache"] = plan
            return plan.calls, grads
        if not plan.checked_natively:
            self._check_grads(grads)
        for call in plan.calls.values():
            call.refresh(grads)
        return plan.calls, grads

    def _check_grads(self, grads: list[Tensor | None]) -> None:
        """Raises before anything is modified if a gradient cannot be applied."""
        name = type(self).__name__
        params = (p for group in self.param_groups for p in group["params"])
        for p, grad in zip(params, grads):
            if grad is None:
                continue
            if grad.is_sparse:
                raise RuntimeError(f"{name} does not support sparse gradients, please consider SparseAdam instead")
            if grad.shape != p.shape or grad.dtype != p.dtype or grad.device != p.device:
                raise RuntimeError(
                    f"{name}: a gradient of shape {tuple(grad.shape)}, {grad.dtype} on {grad.device} does not "
                    f"match its parameter ({tuple(p.shape)}, {p.dtype} on {p.device}); "
                    "a gradient must have its parameter's shape, dtype and device")

    def _build(self, grads: list[Tensor | None]) -> _Plan:
        """Checks every gradient, then creates missing state, then sorts tensors into calls."""
        self._check_grads(grads)
        calls: dict[tuple[torch.device, tuple[bool, ...]], _Call] = {}
        params = ((g, p) for g, group in enumerate(self.param_groups) for p in group["params"])
        for j, ((g, p), grad) in enumerate(zip(params, grads)):
            if grad is None:
                continue
            uses = self._uses(self.param_groups[g])
            active = (True,) * len(self._state_keys) + uses
            state = self._state_for(p, [k for k, on in zip(self._all_state_keys, active) if on])
            call = calls.get((p.device, uses))
            if call is None:
                # One list per state key in the op's order; an unused optional key stays empty.
                call = calls[(p.device, uses)] = _Call(states=[[] for _ in self._all_state_keys])
            real = torch.view_as_real if p.is_complex() else (lambda t: t)
            if p.is_complex():
                call.complex_at.append(len(call.params))
            call.params.append(real(p))
            call.grads.append(real(grad))
            call.grad_index.append(j)
            for lst, key, on in zip(call.states, self._all_state_keys, active):
                if on:
                    lst.append(real(state[key]))
            call.steps.append(state["step"])
            call.group_of.append(g)
        for call in calls.values():
            call.takes_all = len(calls) == 1 and len(call.grad_index) == len(grads) and not call.complex_at
        native = len(calls) <= 1 and all(ops.backend(device) == "native" for device, _ in calls)
        return _Plan(calls=calls, checked_natively=native)

    def _state_for(self, p: Tensor, keys: Sequence[str]) -> dict:
        """The parameter's state with `step` and ``keys``, created as torch would."""
        state = self.state[p]
        step = state.get("step")
        if step is None:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        elif not isinstance(step, Tensor) or step.device != p.device or step.dtype != torch.float32:
            # torch keeps `step` on the CPU for its for-loop path; the kernel reads it on the device.
            state["step"] = torch.as_tensor(step, dtype=torch.float32).to(p.device)
        for key in keys:
            if key not in state:
                state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def _hyper(self, device: torch.device) -> Tensor:
        """The hyper table on ``device``: one tensor per device, kept and updated in place.

        Number values are compared on the host and written only when one changed (on CUDA from
        pinned memory, non_blocking: no sync). Tensor values (an lr tensor that a scheduler
        updates with ``fill_``) are copied into their cells on the device at every call, so a
        compiled step reads the new value without recompiling and a captured CUDA graph, which
        keeps this table's address, replays the copy. A number changed between graph replays is
        not seen (no Python runs on replay): use a tensor lr on the parameters' device for that.
        """
        compiling = torch.compiler.is_compiling()
        if compiling:  # dynamo does not trace itemgetter
            sources = [tuple(g[k] for k in self._row_keys) for g in self.param_groups]
        else:
            sources = list(map(operator.itemgetter(*self._row_keys), self.param_groups))
        cache = self.__dict__.setdefault("_hyper_cache", {})  # also after unpickling
        cached: _Hyper | None = cache.get(device)
        # Eager fast path: every value the same object as when the table was written means the
        # same numbers (numbers and tuples are immutable; tensor cells are copied below anyway).
        # One C-level pass instead of converting every row: 200 groups in ~50 us, not ~400.
        if (compiling or cached is None or cached.sources is None
                or len(sources) != len(cached.sources)
                or not all(map(operator.is_, itertools.chain.from_iterable(sources),
                               itertools.chain.from_iterable(cached.sources)))):
            cached = self._write_hyper(device, sources, cached)
            cache[device] = cached
        table = cached.table
        for r, c, v in cached.tensor_cells:
            table[r, c].copy_(v)
        return table

    def _write_hyper(self, device: torch.device, sources: list[tuple], cached: _Hyper | None) -> _Hyper:
        """The table entry for ``sources``: ``cached``'s table, rewritten if a number changed."""
        floats = []
        tensor_cells = []
        for r, values in enumerate(sources):
            row = self._row(values)
            for c, v in enumerate(row):
                if isinstance(v, Tensor):
                    tensor_cells.append((r, c, v))
            floats.append(tuple(None if isinstance(v, Tensor) else float(v) for v in row))
        floats = tuple(floats)
        # A list value (betas given as a list) can change in place: no identity fast path then.
        if any(isinstance(v, list) for values in sources for v in values):
            sources = None
        if cached is not None and cached.floats == floats:
            return _Hyper(sources, floats, cached.table, cached.host, tensor_cells)
        pin = device.type == "cuda" and not torch.compiler.is_compiling()
        host = torch.tensor([[0.0 if v is None else v for v in row] for row in floats],
                            dtype=torch.float64, pin_memory=pin)
        table = cached.table if cached is not None and cached.table.shape == host.shape else None
        if table is None:
            table = torch.empty(host.shape, dtype=torch.float64, device=device)
        table.copy_(host, non_blocking=pin)
        if pin and torch.cuda.is_current_stream_capturing():
            # A copy captured in a CUDA graph re-reads `host` at every replay: keep it for good.
            self.__dict__.setdefault("_captured_hyper_sources", []).append(host)
        # `host` is kept while these values stand, for the same reason.
        return _Hyper(sources, floats, table, host, tensor_cells)
