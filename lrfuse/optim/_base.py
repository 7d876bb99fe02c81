"""The fused step shared by every fused optimizer.

Each fused class is ``FusedX(_FusedStep, torch.optim.X)``: the torch class gives the constructor,
defaults, validation, ``param_groups`` and ``state_dict`` layout, so they are torch's by
construction; this mixin replaces ``step`` with one native call per device that covers every
parameter group. Per-group values reach the kernel through a float64 hyper table, one row per
group (the rule's columns, :mod:`lrfuse.ops.rules`), so a changed learning rate costs nothing but
a row. A fused class names its rule and says how a group becomes a row; the rest is here.
"""

from __future__ import annotations

import itertools
import operator
import sys
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from lrfuse import ops
from lrfuse.optim._cache import Call, DTensor, StepCache, StepCalls, unwrap, unwrap_grad


def _step_dtype() -> torch.dtype:
    """torch.optim's dtype for a new `step`: float64 under a float64 default dtype, else float32."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


_grad_of = operator.attrgetter("grad")

# The one reader told that the step unscales and skips inside the kernel: GradScaler.step's own
# code (torch.cuda.amp's and FSDP's scalers inherit it). See `_step_supports_amp_scaling`.
_GRAD_SCALER_STEP = torch.amp.GradScaler.step.__code__


class _FusedStep:
    """Mixed in before a ``torch.optim`` class; subclasses set the class attributes below."""

    _rule: ops.Rule                         # columns, state keys, whether it counts steps
    _op: Callable[..., None]                # ops.op(rule name): the native op or its reference
    _row_keys: tuple[str, ...]              # the group keys a hyper-table row is made from
    # SGD: the hyper table holds a second copy of each group's row with first_step = 1, which
    # tensors whose momentum buffer is new read (see csrc/rules/sgd.h).
    _first_step_rows = False

    @property
    def _step_supports_amp_scaling(self) -> bool:
        """True for GradScaler, which then hands the step its scale and inf flag (unscaling and
        the skip happen in the kernel, with no host sync). False for anyone else who asks: Lightning
        and other trainers read it to decide whether to unscale the gradients before their hooks
        and clipping, and those need unscaled gradients. GradScaler then sees them unscaled and
        passes only the inf flag.

        The reader is told apart by its code object, not by a module name: were torch to move
        the read out of ``GradScaler.step``, the answer becomes False for it too, which is torch's
        default path (GradScaler unscales, then steps): slower, never wrong. tests/test_ops.py's
        ``test_only_grad_scaler_hands_the_scale_to_the_kernel`` fails on such a torch, so the lost
        fast path is seen. Unscaling before the step instead costs up to 14% on CPU
        (benchmarks/results/bench_amp_cpu.json) and a host sync per step on CUDA."""
        return sys._getframe(1).f_code is _GRAD_SCALER_STEP

    @_step_supports_amp_scaling.setter
    def _step_supports_amp_scaling(self, value: bool) -> None:
        pass  # torch's __init__ sets it for fused=True; the answer above does not depend on it

    @property
    def _state_keys(self) -> tuple[str, ...]:
        return self._rule.states

    @property
    def _all_state_keys(self) -> tuple[str, ...]:
        return self._rule.all_states

    @property
    def _torch_name(self) -> str:
        return next(b.__name__ for b in type(self).__mro__ if b.__module__.startswith("torch.optim"))

    def _row(self, values: tuple) -> list:
        """The hyper-table row, in the rule's column order, of a group's ``_row_keys`` values."""
        raise NotImplementedError

    def _uses(self, group: dict) -> tuple[bool, ...]:
        """Which optional state keys the group keeps (none by default)."""
        return ()

    def _initial_state(self, key: str, p: Tensor, group: dict) -> Tensor:
        """A new state tensor ``key`` for ``p`` (zeros, as torch starts most state)."""
        return torch.zeros_like(p, memory_format=torch.preserve_format)

    def __init__(self, params, *args, track_stats: bool = False, **kwargs) -> None:
        if not isinstance(track_stats, bool):
            raise TypeError(f"{type(self).__name__}: track_stats must be True or False, got {track_stats!r}")
        super().__init__(params, *args, **kwargs)
        self._cache = StepCache()  # an attribute: dynamo before torch 2.15 cannot trace __dict__.setdefault
        self.track_stats = track_stats
        self._stats: dict[torch.device, Tensor] = {}  # per device: the kernel's sums of the last step
        # That step's found_inf, if GradScaler gave one: a list changed in place, as dynamo before
        # torch 2.12 refuses an attribute set inside a compiled step.
        self._stats_found_inf: list[Tensor | None] = [None]
        for group in self.param_groups:
            if group.get("differentiable"):
                raise ValueError(f"{type(self).__name__} does not support differentiable=True; "
                                 f"use torch.optim.{self._torch_name} for that")

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        # Unpickled and copied optimizers come without it (torch pickles defaults, state and groups);
        # load_state_dict keeps it (the hyper tables keep their addresses for captured CUDA graphs).
        if "_cache" not in self.__dict__:
            self._cache = StepCache()
        self.__dict__.setdefault("track_stats", False)
        self.__dict__.setdefault("_stats", {})
        self.__dict__.setdefault("_stats_found_inf", [None])

    def add_param_group(self, param_group: dict) -> None:
        params = param_group["params"]
        if not isinstance(params, (Tensor, set)):  # torch itself rejects a set
            param_group["params"] = params = list(params)
        seen: set[int] = set()
        for i, p in enumerate([params] if isinstance(params, Tensor) else params):
            if isinstance(p, Tensor):
                if id(p) in seen:
                    # torch warns and then applies the update twice per step; one native call
                    # cannot, and torch announces this as a future error: refuse it now.
                    raise ValueError(
                        f"{type(self).__name__}: parameter {i} of a group is listed twice; "
                        "pass each parameter once (it would be updated twice per step)")
                seen.add(id(p))
        super().add_param_group(param_group)

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's ``load_state_dict``, then a check that the loaded state fits these groups; a
        state_dict that does not fit raises and leaves the optimizer as it was."""
        before = self.state, self.param_groups
        try:
            super().load_state_dict(state_dict)
            self._check_state()
        except Exception:  # torch's own load can fail half-way too (a state without `step`)
            self.state, self.param_groups = before
            raise

    def _check_state(self) -> None:
        """Every parameter's state, where it has any, holds `step` and each tensor its group's
        settings call for, shaped like the parameter."""
        name = type(self).__name__
        for g, group in enumerate(self.param_groups):
            active = (True,) * len(self._state_keys) + self._uses(group)
            needed = ["step"] * self._rule.counts_steps + [k for k, on in zip(self._all_state_keys, active) if on]
            for j, p in enumerate(group["params"]):
                state = self.state.get(p)
                if not state:
                    continue
                for key in needed:
                    value = state.get(key)
                    if value is None:
                        raise ValueError(
                            f"{name}.load_state_dict: the state of parameter {j} of group {g} has no {key!r} "
                            f"(it has {sorted(state)}); pass a state_dict saved by {name} or torch.optim."
                            f"{self._torch_name} with the same settings (amsgrad, momentum, centered, ...)")
                    if key != "step" and (not isinstance(value, Tensor) or value.shape != p.shape):
                        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                        raise ValueError(
                            f"{name}.load_state_dict: state {key!r} of parameter {j} of group {g} is {shape} but "
                            f"the parameter has shape {tuple(p.shape)}; the state_dict belongs to other parameters")

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
        calls, grads = self._step_calls()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        stats = {}
        if self.track_stats:
            stats = self._zeroed_stats(calls)
            self._stats_found_inf[0] = found_inf
        if calls.first_steps and found_inf is not None and bool(found_inf.item()):
            # GradScaler skips this step. torch's SGD never sees a skipped step, so the momentum
            # buffers made for it must stay absent: the next step starts them from its gradient.
            # (A host sync, on the first steps of SGD with momentum under a GradScaler only.)
            for p, key in calls.first_steps:
                del self.state[p][key]
                if not self.state[p]:
                    del self.state[p]
            return loss
        for (device, uses), call in calls.by_layout.items():
            steps = (call.steps,) if self._rule.counts_steps else ()
            try:
                type(self)._op(
                    call.params, call.grads, *call.states, *steps, call.group_of, self._hyper(device),
                    None if grad_scale is None else grad_scale.to(device),
                    None if found_inf is None else found_inf.to(device),
                    stats.get(device),
                )
            except NotImplementedError:
                # A sparse gradient dispatches the op away from its kernels before anything is
                # written: name the gradient, as the checks of rebuilt calls would.
                self._check_grads(grads)
                raise
            if torch.compiler.is_compiling():
                self._copy_back_complex(call)
        return loss

    def _zeroed_stats(self, calls: StepCalls) -> dict[torch.device, Tensor]:
        """The stats tables this step's calls add to, one per device (a row per hyper-table row),
        zeroed: a step that adds nothing (skipped, no gradients) reports zeros."""
        rows = len(self.param_groups) * (2 if self._first_step_rows else 1)
        for device in {device for device, _ in calls.by_layout}:
            table = self._stats.get(device)
            if table is None or table.shape[0] != rows:
                self._stats[device] = torch.zeros(rows, len(ops.STAT_COLUMNS), dtype=torch.float64, device=device)
        for table in self._stats.values():
            table.zero_()
        return self._stats

    def group_stats_tensor(self) -> Tensor:
        """The last step's statistics per parameter group as one float64 tensor of shape
        ``(len(param_groups), 5)``, without a host sync: columns ``update_norm``, ``param_norm``,
        ``grad_norm``, ``nonfinite``, ``update_ratio`` (see :meth:`group_stats`). On the device of
        the parameters (the first device's, where groups span several)."""
        if not self.track_stats:
            raise RuntimeError(f"{type(self).__name__} measures its steps only when constructed with "
                               "track_stats=True")
        groups = len(self.param_groups)
        tables = list(self._stats.values())
        if not tables:
            device = next((p.device for g in self.param_groups for p in g["params"]), torch.device("cpu"))
            tables = [torch.zeros(groups, len(ops.STAT_COLUMNS), dtype=torch.float64, device=device)]
        sums = tables[0].clone()
        for table in tables[1:]:
            sums += table.to(sums.device)
        if sums.shape[0] != groups:  # SGD's first-step rows (see _first_step_rows) belong to their group
            sums = sums[:groups] + sums[groups:]
        norms = sums[:, :3].sqrt()
        ratio = torch.where(norms[:, 1] > 0, norms[:, 0] / norms[:, 1], torch.zeros_like(norms[:, 0]))
        return torch.cat([norms, sums[:, 3:], ratio[:, None]], dim=1)

    def group_stats(self) -> list[dict]:
        """What the last step measured, one dict per parameter group in ``param_groups`` order,
        from the same pass as the update (``track_stats=True``):

        - ``update_norm``: L2 norm over the group of (parameter after the step - before it), as applied;
        - ``param_norm``: L2 norm of the group's parameters before the step;
        - ``grad_norm``: L2 norm of the gradients the step used (after GradScaler's unscale, before
          weight decay);
        - ``nonfinite``: how many gradient elements were inf or NaN;
        - ``update_ratio``: ``update_norm / param_norm`` (0 where ``param_norm`` is 0);
        - ``skipped``: whether GradScaler skipped the step (every figure is then 0).

        Groups without gradients report zeros. Sums are per process: under FSDP2 / DTensor they
        cover the local shards only (``LRHealthMonitor`` copies DTensor weights instead). One host sync; for logging
        every N steps without one, :meth:`group_stats_tensor`.
        """
        rows = self.group_stats_tensor().tolist()
        found_inf = self._stats_found_inf[0]
        skipped = found_inf is not None and bool(found_inf.item())
        keys = ("update_norm", "param_norm", "grad_norm", "nonfinite", "update_ratio")
        return [{**dict(zip(keys, row)), "nonfinite": int(row[3]), "skipped": skipped} for row in rows]

    def _step_calls(self) -> tuple[StepCalls, list[Tensor | None]]:
        """The native calls of this step, and the gradients of every parameter in group order.

        Building the calls costs microseconds per tensor, so they are kept (:class:`StepCache`)
        while everything they were built from is the same objects; then only the gradients, which
        backward may replace every step, are refreshed.
        """
        if torch.compiler.is_compiling():  # the compiled graph's guards do the caching
            grads = [p.grad for group in self.param_groups for p in group["params"]]
            return self._build(grads), grads
        key = (id(self.state), tuple((len(g["params"]), self._uses(g), bool(g.get("capturable")))
                                     for g in self.param_groups))
        kept = self._cache.kept(key, [g["params"] for g in self.param_groups], self.state)
        if kept is None:
            params = list(itertools.chain.from_iterable(g["params"] for g in self.param_groups))
            grads = list(map(_grad_of, params))
            calls = self._build(grads)
            if not calls.first_steps:  # after this step they are first steps no more
                self._cache.keep(calls, key, params, grads, self.state)
            return calls, grads
        calls, grads = kept
        if not calls.checked_natively:
            self._check_grads(grads)
        for call in calls.by_layout.values():
            call.refresh(grads)
        return calls, grads

    def _check_grads(self, grads: list[Tensor | None]) -> None:
        """Raises before anything is modified if a gradient cannot be applied."""
        name = type(self).__name__
        params = (p for group in self.param_groups for p in group["params"])
        for p, grad in zip(params, grads):
            if grad is None:
                continue
            if grad.is_sparse:
                # torch's own message where torch refuses them too; SGD and Adagrad take them in torch.
                fix = (f"use torch.optim.{self._torch_name}, which does" if self._torch_name in ("SGD", "Adagrad")
                       else "please consider SparseAdam instead")
                raise RuntimeError(f"{name} does not support sparse gradients, {fix}")
            if grad.shape != p.shape or grad.dtype != p.dtype or grad.device != p.device:
                raise RuntimeError(
                    f"{name}: a gradient of shape {tuple(grad.shape)}, {grad.dtype} on {grad.device} does not "
                    f"match its parameter ({tuple(p.shape)}, {p.dtype} on {p.device}); "
                    "a gradient must have its parameter's shape, dtype and device")

    def _check_capturable(self, grads: list[Tensor | None]) -> None:
        """capturable=True keeps step on the device for CUDA graphs; torch refuses it elsewhere."""
        params = ((g, p) for g, group in enumerate(self.param_groups) for p in group["params"])
        for (g, p), grad in zip(params, grads):
            if grad is not None and self.param_groups[g].get("capturable") and p.device.type not in ("cuda", "meta"):
                raise RuntimeError(
                    f"{type(self).__name__}: capturable=True needs CUDA parameters, but a parameter of group {g} "
                    f"is on {p.device}; leave capturable off there (torch.optim.{self._torch_name} refuses "
                    "it too)")

    def _build(self, grads: list[Tensor | None]) -> StepCalls:
        """Checks every gradient, then creates missing state, then sorts tensors into calls."""
        self._check_grads(grads)
        compiling = torch.compiler.is_compiling()
        if not compiling:  # dynamo may set capturable itself, as torch's own check assumes
            self._check_capturable(grads)
        by_layout: dict[tuple[torch.device, tuple[bool, ...]], Call] = {}
        first_steps: list[tuple[Tensor, str]] = []
        params = ((g, p) for g, group in enumerate(self.param_groups) for p in group["params"])
        for j, ((g, p), grad) in enumerate(zip(params, grads)):
            if grad is None:
                continue
            group = self.param_groups[g]
            uses = self._uses(group)
            active = (True,) * len(self._state_keys) + uses
            state, created = self._state_for(p, [k for k, on in zip(self._all_state_keys, active) if on], group)
            first_step = self._first_step_rows and bool(created)
            if first_step:
                first_steps.extend((p, key) for key in created)
            call = by_layout.get((p.device, uses))
            if call is None:
                # One list per state key in the op's order; an unused optional key stays empty.
                call = by_layout[(p.device, uses)] = Call(states=[[] for _ in self._all_state_keys])
            k = len(call.params)
            keys = tuple(key if on else None for key, on in zip(self._all_state_keys, active))
            call.params.append(unwrap(p))
            call.grads.append(unwrap_grad(grad, p))
            for lst, key in zip(call.states, keys):
                if key is not None:
                    lst.append(unwrap(state[key]))
            if self._rule.counts_steps:
                call.steps.append(state["step"])
            call.group_of.append(g + len(self.param_groups) if first_step else g)
            call.grad_index.append(j)
            if isinstance(p, DTensor) or p.is_complex():
                call.wrapped.append((k, p, state, keys))
                if compiling and p.is_complex():
                    # Dynamo cannot functionalize the op writing through view_as_real of a graph
                    # input: it writes real copies, which _copy_back_complex puts back.
                    call.params[k] = call.params[k].clone()
                    for lst, key in zip(call.states, keys):
                        if key is not None:
                            lst[k] = lst[k].clone()
        for call in by_layout.values():
            call.takes_all = len(by_layout) == 1 and len(call.grad_index) == len(grads) and not call.wrapped
        native = len(by_layout) <= 1 and all(ops.backend(device) == "native" for device, _ in by_layout)
        return StepCalls(by_layout=by_layout, checked_natively=native, first_steps=first_steps)

    @staticmethod
    def _copy_back_complex(call: Call) -> None:
        """Under torch.compile: the real copies of complex tensors back into them (see _build)."""
        for k, p, state, keys in call.wrapped:
            if p.is_complex():
                p.copy_(torch.view_as_complex(call.params[k]))
                for lst, key in zip(call.states, keys):
                    if key is not None:
                        state[key].copy_(torch.view_as_complex(lst[k]))

    def _state_for(self, p: Tensor, keys: Sequence[str], group: dict) -> tuple[dict, list[str]]:
        """The parameter's state with `step` (when the rule counts steps) and ``keys``, created as
        torch would (a DTensor parameter gets DTensor state, its `step` a plain tensor), and which
        of ``keys`` were created."""
        if not keys and not self._rule.counts_steps:
            return self.state.get(p, {}), []  # torch's SGD without momentum keeps no state
        state = self.state[p]
        if self._rule.counts_steps:
            step = state.get("step")
            if step is None:
                state["step"] = torch.zeros((), dtype=_step_dtype(), device=p.device)
            elif not (isinstance(step, Tensor) and step.device == p.device
                      and step.dtype in (torch.float32, torch.float64) and not isinstance(step, DTensor)):
                # torch keeps `step` on the CPU for its for-loop path; the kernel reads it on the device.
                dtype = step.dtype if isinstance(step, Tensor) and step.dtype == torch.float64 else _step_dtype()
                state["step"] = torch.as_tensor(step.item() if isinstance(step, Tensor) else step,
                                                dtype=dtype).to(p.device)
        created = [key for key in keys if key not in state]
        for key in created:
            state[key] = self._initial_state(key, p, group)
        return state, created

    def _hyper(self, device: torch.device) -> Tensor:
        """The hyper table on ``device`` (:meth:`StepCache.hyper`) for the groups as they are now."""
        compiling = torch.compiler.is_compiling()
        if compiling:  # dynamo does not trace itemgetter
            sources = [tuple(g[k] for k in self._row_keys) for g in self.param_groups]
        else:
            sources = list(map(operator.itemgetter(*self._row_keys), self.param_groups))
        if self._first_step_rows:
            sources += [(*values, True) for values in sources]
        return self._cache.hyper(device, sources, self._row, compiling)
