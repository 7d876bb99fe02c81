"""The native ops: loading ``lrfuse._C``, typed wrappers, fake kernels, and which backend runs.

``fused_adam_`` and ``fused_rmsprop_`` update every tensor of every parameter group on one
device in one call. ``hyper`` is a float64 table with one row per group (columns below);
``group_of[i]`` names the row tensor ``i`` reads. Optional state lists are empty (feature off)
or hold one tensor per parameter. Without a built extension the wrappers run the pure-PyTorch
reference in :mod:`lrfuse.ops.reference`, with one warning.
"""

from __future__ import annotations

import os
import warnings

import torch

from lrfuse.ops import reference

__all__ = ["ADAM_COLUMNS", "RMSPROP_COLUMNS", "backend", "cpu_isa", "fused_adam_", "fused_rmsprop_", "hold_refs"]

# Hyper-table columns; the native side names the same columns in csrc/update_rules.h.
ADAM_COLUMNS = ("lr", "beta1", "beta2", "eps", "weight_decay", "maximize", "decoupled")
RMSPROP_COLUMNS = ("lr", "alpha", "eps", "weight_decay", "momentum", "maximize")

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


def hold_refs(tensors: list[torch.Tensor]) -> object | None:
    """C++ references to ``tensors``, kept while the returned object lives (None without ``_C``).

    Boxing a tensor that only Python references costs a Python refcount round trip per call;
    an optimizer holds these for the tensors its native call passes every step (see
    ``TensorRefs`` in csrc/lrfuse.cpp).
    """
    return torch.classes.lrfuse.TensorRefs(tensors) if _C is not None else None


def _warn_reference(device: torch.device) -> None:
    global _warned
    if _warned or _forced == "reference":
        return
    _warned = True
    why = f"lrfuse._C did not load ({_load_error})" if _C is None else f"lrfuse._C has no {device.type} kernels"
    warnings.warn(
        f"{why}: lrfuse optimizers run the pure-PyTorch reference path, which is correct but slow. "
        "Build the extension with `pip install --no-build-isolation -e .`.",
        RuntimeWarning,
        stacklevel=4,
    )


def fused_adam_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, group_of, hyper,
                grad_scale=None, found_inf=None) -> None:
    """Adam / AdamW step of every tensor in one call (see the module docstring)."""
    if backend(hyper.device) == "native":
        torch.ops.lrfuse.fused_adam_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,
                                     group_of, hyper, grad_scale, found_inf)
    else:
        _warn_reference(hyper.device)
        reference.fused_adam_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, group_of,
                              hyper, grad_scale, found_inf)


def fused_rmsprop_(params, grads, square_avgs, momentum_buffers, grad_avgs, steps, group_of, hyper,
                   grad_scale=None, found_inf=None) -> None:
    """RMSprop step of every tensor in one call (see the module docstring)."""
    if backend(hyper.device) == "native":
        torch.ops.lrfuse.fused_rmsprop_(params, grads, square_avgs, momentum_buffers, grad_avgs, steps,
                                        group_of, hyper, grad_scale, found_inf)
    else:
        _warn_reference(hyper.device)
        reference.fused_rmsprop_(params, grads, square_avgs, momentum_buffers, grad_avgs, steps, group_of,
                                 hyper, grad_scale, found_inf)


if _C is not None:
    # The ops mutate their inputs and return nothing, so tracing needs no shapes from them.
    @torch.library.register_fake("lrfuse::fused_adam_")
    def _(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, group_of, hyper,
          grad_scale=None, found_inf=None) -> None:
        return None

    @torch.library.register_fake("lrfuse::fused_rmsprop_")
    def _(params, grads, square_avgs, momentum_buffers, grad_avgs, steps, group_of, hyper,
          grad_scale=None, found_inf=None) -> None:
        return None
