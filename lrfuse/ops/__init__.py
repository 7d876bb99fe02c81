"""The native ops: loading ``lrfuse._C``, the op of each rule, fake kernels, and which backend runs.

``torch.ops.lrfuse.fused_<rule>_`` updates every tensor of every parameter group on one device in
one call, for each rule of :mod:`lrfuse.ops.rules` (adam, rmsprop, sgd, adagrad, adadelta):

    fused_<rule>_(params, grads, *state_lists, [steps,] group_of, hyper, grad_scale=None, found_inf=None,
                  stats=None)

``hyper`` is a float64 table with one row per group (the rule's columns); ``group_of[i]`` names
the row tensor ``i`` reads. Optional state lists are empty (feature off) or hold one tensor per
parameter; ``steps`` is there for rules that count steps. ``stats``, when given, is a float64
table (a row per row of ``hyper``) to which the step adds each row's squared update, squared
parameter, squared gradient and count of non-finite gradient elements. Without a built extension :func:`op`
runs the pure-PyTorch reference (:mod:`lrfuse.ops.reference`), with one warning.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

import torch

from lrfuse.ops import reference
from lrfuse.ops.rules import RULES, STAT_COLUMNS, Rule

__all__ = ["RULES", "STAT_COLUMNS", "Rule", "backend", "cpu_isa", "op"]

try:
    from lrfuse import _C  # registers torch.ops.lrfuse.*
except ImportError as error:  # not built: the reference path serves
    _C = None
    _load_error: ImportError | None = error
else:
    _load_error = None

# LRFUSE_BACKEND=reference forces the pure-PyTorch path (debugging, and tests of that path).
_forced = os.environ.get("LRFUSE_BACKEND", "").strip().lower() or None
_warned = False


def backend(device: torch.device | str) -> str:
    """``"native"`` when lrfuse's compiled kernels serve ``device``, else ``"reference"``."""
    if _forced == "reference" or _C is None:
        return "reference"
    kind = torch.device(device).type
    # Meta tensors (shape-only) go to the fake kernels below: the step computes nothing, as torch's.
    if kind in ("cpu", "meta") or (kind == "cuda" and _C.with_cuda):
        return "native"
    return "reference"


def cpu_isa() -> str:
    """The vectorized variant of the CPU kernels this processor runs (``x86-64-v4`` = AVX-512)."""
    return torch.ops.lrfuse.cpu_isa() if _C is not None else "none (extension not built)"


def _warn_reference(device: torch.device) -> None:
    global _warned
    if _warned or _forced == "reference":
        return
    _warned = True
    if _C is None:
        why, fix = f"lrfuse._C did not load ({_load_error})", "pip install --no-build-isolation -e ."
    else:  # built, but without this device's kernels: for CUDA, nvcc was not found at build time
        why = f"lrfuse._C was built without {device.type} kernels"
        fix = "LRFUSE_CUDA=1 pip install --no-build-isolation -e . (with nvcc on PATH)"
    warnings.warn(
        f"{why}: lrfuse optimizers run the pure-PyTorch reference path on {device.type}, which is correct "
        f"but slow. Rebuild: {fix}; lrfuse --version tells which kernels serve each device.",
        RuntimeWarning,
        stacklevel=4,
    )


def op(name: str) -> Callable[..., None]:
    """The fused op of rule ``name``, with the native op's arguments: the native kernels where
    they serve the device (:func:`backend`), else the reference."""
    rule = RULES[name]
    native_name = f"fused_{name}_"
    n = len(rule.all_states)

    def fused(params, grads, *rest) -> None:
        device = rest[n + rule.counts_steps + 1].device  # hyper
        if backend(device) == "native":
            getattr(torch.ops.lrfuse, native_name)(params, grads, *rest)
            return
        _warn_reference(device)
        steps = rest[n] if rule.counts_steps else None
        group_of, hyper, *scaling = rest[n + rule.counts_steps:]
        reference.fused(rule, params, grads, list(rest[:n]), steps, group_of, hyper, *scaling)

    fused.__name__ = fused.__qualname__ = native_name
    return fused


if _C is not None:
    # The ops mutate their inputs and return nothing, so tracing needs no shapes from them.
    def _fake(*args, **kwargs) -> None:
        return None

    for _name in RULES:
        torch.library.register_fake(f"lrfuse::fused_{_name}_", _fake)
