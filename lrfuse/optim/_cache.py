"""What a fused optimizer keeps between steps, and the rule that keeps it from ever going stale.

:class:`StepCache` holds the step's calls (:class:`StepCalls`: the tensor lists of its native
calls) and one hyper table per device. Each is reused only while everything it was built from is,
object for object, what the optimizer holds now; the checks are C-level identity scans, cheap
enough to run every step (hashing tensors into ``optimizer.state`` would cost more than the rest
of the step's Python):

- the calls (built from :class:`BuiltFrom`): the parameters of every group in order, which of
  them have a gradient, each group's size, state layout and ``capturable``, and
  ``optimizer.state``: its keys, its dicts, and each key and value in them. Whatever users do to
  ``opt.state`` between steps replaces one of those objects, so the next step is built from what
  ``opt.state`` holds. In-place changes of a tensor need nothing: the calls hold the tensors. The
  scan is one C pass (:func:`_kept_grads`) that also reads the step's gradients; without the
  extension nothing is kept.
- a hyper table: each group's row values (``lr``, betas, ...). Numbers and tuples cannot change
  in place, so the same objects mean the same numbers; a value that can (a list, a numpy array)
  turns the fast path off for that table, and tensor cells are copied at every call anyway.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lrfuse import ops

try:  # torch builds without torch.distributed have no DTensor
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    DTensor = ()


def unwrap(t: Tensor) -> Tensor:
    """What the kernels update for ``t``: a DTensor's local shard, a complex tensor as real pairs."""
    if isinstance(t, DTensor):
        t = t._local_tensor  # what to_local() returns under no_grad
    return torch.view_as_real(t) if t.is_complex() else t


def unwrap_grad(grad: Tensor, param: Tensor) -> Tensor:
    """The gradient's local values laid out as the parameter's shard (a replicated parameter's
    gradient may arrive partial: reduced here, as a DTensor op on the two would)."""
    if isinstance(grad, DTensor) and isinstance(param, DTensor) and grad.placements != param.placements:
        grad = grad.redistribute(param.device_mesh, param.placements)
    return unwrap(grad)


def _immutable(value) -> bool:
    """Whether a group value can only change by being replaced (what the hyper table's identity
    scan relies on); a list or a numpy array can change in place."""
    if type(value) is tuple:
        return all(map(_immutable, value))
    return isinstance(value, (int, float, Tensor))


@dataclass
class Call:
    """The lists of one native call: the tensors of one device sharing one state layout."""

    params: list[Tensor] = field(default_factory=list)
    grads: list[Tensor] = field(default_factory=list)
    states: list[list[Tensor]] = field(default_factory=list)
    steps: list[Tensor] = field(default_factory=list)
    group_of: list[int] = field(default_factory=list)
    grad_index: list[int] = field(default_factory=list)  # where each gradient sits in the step's flat list
    # Entries passed unwrapped (DTensor, complex): (position, parameter, its state, the state key of
    # each state list or None). Unwrapped again every step: `p.data = ...` or FSDP2 re-pointing a
    # shard replaces what an unwrapped view would still show.
    wrapped: list[tuple[int, Tensor, dict, tuple]] = field(default_factory=list)
    takes_all: bool = False  # the step's flat gradient list is this call's list as it is
    refs: object = None      # C++ references to params, state and steps (_hold_refs)

    def refresh(self, grads: list[Tensor | None]) -> None:
        """Takes this step's gradients (backward may have replaced them)."""
        self.grads = grads if self.takes_all else list(map(grads.__getitem__, self.grad_index))
        for k, p, state, keys in self.wrapped:
            self.params[k] = unwrap(p)
            self.grads[k] = unwrap_grad(self.grads[k], p)
            for lst, key in zip(self.states, keys):
                if key is not None:
                    lst[k] = unwrap(state[key])


@dataclass
class StepCalls:
    """The native calls of a step: one per (device, state layout)."""

    by_layout: dict[tuple[torch.device, tuple[bool, ...]], Call]
    checked_natively: bool  # one native call, whose own checks run before any write
    first_steps: list[tuple[Tensor, str]] = field(default_factory=list)  # SGD: (param, key) of new momentum buffers


@dataclass
class BuiltFrom:
    """What kept :class:`StepCalls` were built from: they are reused while the optimizer holds
    exactly these objects."""

    key: tuple              # (id of the state dict, (size, state layout, capturable) of each group)
    params: list[Tensor]    # every parameter of every group, in order
    has_grad: bytes         # which of them had a gradient
    state_keys: list        # optimizer.state's keys, in order
    states: list[dict]      # its values, in order
    items: list             # every key and value of those: k, v, k, v, ...


@dataclass
class HyperTable:
    """A device's hyper table and what it was written from."""

    sources: list[tuple] | None  # each group's `_row_keys` values as the objects they were; None:
                                 # a value that can change in place, so the identity fast path is off
    floats: tuple         # the rows' numbers (None where a cell is a tensor)
    table: Tensor         # on the device; the kernels read it
    host: Tensor          # the host copy it was last written from
    tensor_cells: list[tuple[int, int, Tensor]]  # (row, column, 0-d view of the tensor): copied at every call


def _state_items(states: list[dict]) -> list:
    """Every key and value of every state dict, in order: key, value, key, value, ..."""
    return list(itertools.chain.from_iterable(itertools.chain.from_iterable(map(dict.items, states))))


def _kept_grads(param_lists: list[list[Tensor]], built: BuiltFrom, state: dict) -> list | None:
    """This step's gradients (``p.grad`` of every parameter of ``param_lists``, in order) if the
    optimizer holds exactly the objects of ``built`` (and ``state`` is its ``optimizer.state``),
    each the same object in the same order; else None. One C pass (csrc/kept_plan.cpp); without
    the extension always None, so every step builds its calls."""
    if ops._C is None:
        return None
    return ops._C.kept_grads(param_lists, built.params, built.has_grad, state, built.state_keys, built.states,
                             built.items)


def _hold_refs(tensors: list[Tensor]) -> object | None:
    """C++ references to ``tensors``, kept while the returned object lives (None without the
    extension). Boxing a tensor that only Python references costs a Python refcount round trip
    per call; these make it an atomic increment (``TensorRefs`` in csrc/lrfuse.cpp)."""
    return torch.classes.lrfuse.TensorRefs(tensors) if ops._C is not None else None


class StepCache:
    """The step's calls and the hyper tables of one optimizer (see the module docstring)."""

    def __init__(self) -> None:
        self.calls: StepCalls | None = None
        self.built_from: BuiltFrom | None = None
        self.tables: dict[torch.device, HyperTable] = {}
        self.captured: list[Tensor] = []  # host rows a captured CUDA graph re-reads at every replay

    def kept(self, key: tuple, param_lists: list[list[Tensor]], state: dict) -> tuple[StepCalls, list] | None:
        """The kept calls and this step's gradients if they were built from exactly these
        objects (``param_lists``: each group's parameter list), else None."""
        built = self.built_from
        if built is None or built.key != key:
            return None
        grads = _kept_grads(param_lists, built, state)
        return None if grads is None else (self.calls, grads)

    def keep(self, calls: StepCalls, key: tuple, params: list[Tensor], grads: list[Tensor | None],
             state: dict) -> None:
        """Keeps ``calls`` with what they were built from; their tensors box cheaply from now on."""
        states = list(state.values())
        self.built_from = BuiltFrom(key, params, bytes(g is not None for g in grads), list(state), states,
                                    _state_items(states))
        for call in calls.by_layout.values():
            unwrapped = {k for k, *_ in call.wrapped}  # their views are made anew each step
            kept = [t for lst in (call.params, *call.states) for k, t in enumerate(lst) if k not in unwrapped]
            call.refs = _hold_refs([*kept, *call.steps])
        self.calls = calls

    def hyper(self, device: torch.device, sources: list[tuple], row: Callable[[tuple], list],
              compiling: bool) -> Tensor:
        """The hyper table on ``device`` for the groups' row values ``sources`` (``row`` turns one
        group's values into its row): one tensor per device, kept and updated in place.

        Number values are compared on the host and written only when one changed (on CUDA from
        pinned memory, non_blocking: no sync). Tensor values (an lr tensor that a scheduler
        updates with ``fill_``) are copied into their cells on the device at every call, so a
        compiled step reads the new value without recompiling and a captured CUDA graph, which
        keeps this table's address, replays the copy. A number changed between graph replays is
        not seen (no Python runs on replay): use a tensor lr on the parameters' device for that.
        """
        cached = self.tables.get(device)
        # Eager fast path: every value the same object as when the table was written means the
        # same numbers. One C-level pass instead of converting every row: 200 groups in ~50 us,
        # not ~400. Under torch.compile the rows are converted, as dynamo guards on them.
        if (compiling or cached is None or cached.sources is None
                or len(sources) != len(cached.sources)
                or not all(map(operator.is_, itertools.chain.from_iterable(sources),
                               itertools.chain.from_iterable(cached.sources)))):
            cached = self.tables[device] = self._write(device, sources, row, cached, compiling)
        table = cached.table
        for r, c, v in cached.tensor_cells:
            table[r, c].copy_(v)
        return table

    def _write(self, device: torch.device, sources: list[tuple], row: Callable[[tuple], list],
               cached: HyperTable | None, compiling: bool) -> HyperTable:
        """The table entry for ``sources``: ``cached``'s table, rewritten if a number changed."""
        floats = []
        tensor_cells = []
        for r, values in enumerate(sources):
            cells = row(values)
            for c, v in enumerate(cells):
                if isinstance(v, Tensor):  # torch accepts any one-element shape ([1], [1, 1, 1])
                    tensor_cells.append((r, c, v.reshape(())))
            floats.append(tuple(None if isinstance(v, Tensor) else float(v) for v in cells))
        floats = tuple(floats)
        if not all(map(_immutable, itertools.chain.from_iterable(sources))):
            sources = None  # a value that can change in place: no identity fast path
        if cached is not None and cached.floats == floats:
            return HyperTable(sources, floats, cached.table, cached.host, tensor_cells)
        pin = device.type == "cuda" and not compiling
        host = torch.tensor([[0.0 if v is None else v for v in r] for r in floats],
                            dtype=torch.float64, pin_memory=pin)
        table = cached.table if cached is not None and cached.table.shape == host.shape else None
        if table is None:
            table = torch.empty(host.shape, dtype=torch.float64, device=device)
        table.copy_(host, non_blocking=pin)
        if pin and torch.cuda.is_current_stream_capturing():
            # A copy captured in a CUDA graph re-reads `host` at every replay: keep it for good.
            self.captured.append(host)
        # `host` is kept while these values stand, for the same reason.
        return HyperTable(sources, floats, table, host, tensor_cells)
