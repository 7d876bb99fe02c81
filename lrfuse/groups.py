"""Discriminative / layer-wise parameter groups built from a model.

Early layers learn general features and want a small learning rate; the layers near the output
want a larger one. :func:`layerwise_groups` splits a model into ordered "layers" and gives layer
``i`` of ``n`` the LR ``lr * decay ** (n - 1 - i)``. Each group records its multiplier as
``lr_scale`` (timm's convention) and a ``name``, so schedulers, :class:`lrfuse.LRSchedule`,
:class:`lrfuse.LRFinder` and Lightning's ``LearningRateMonitor`` all see and keep the ratios.

A "layer" is, by default, one top-level child module in registration order (parameters directly
on the root module form a layer of their own, first). Pass ``layers`` to say it yourself: a list
of name prefixes (``["embed", "blocks.0", "blocks.1", "head"]``), each prefix one layer, in order.

Examples:
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> groups = layerwise_groups(model, lr=1e-3, decay=0.5)
    >>> [(g["name"], g["lr"]) for g in groups]
    [('0', 0.0005), ('2', 0.001)]
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

__all__ = ["discriminative_groups", "group_labels", "group_lrs", "layer_names", "layerwise_groups", "no_decay_param",
           "peak_lr", "set_group_lr"]

# Parameters of these modules get no weight decay when ``no_decay_norm_bias`` is set.
_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)
if hasattr(nn, "RMSNorm"):
    _NORMS = _NORMS + (nn.RMSNorm,)


def layer_names(model: nn.Module) -> list[str]:
    """The default layers of ``model``: ``""`` (the root's own parameters, when it has some),
    then every top-level child that holds trainable parameters, in registration order."""
    names = [""] if any(p.requires_grad for p in model.parameters(recurse=False)) else []
    names += [n for n, child in model.named_children() if any(p.requires_grad for p in child.parameters())]
    return names


def _norm_param_names(model: nn.Module) -> set[str]:
    out = set()
    for mod_name, mod in model.named_modules():
        if isinstance(mod, _NORMS):
            out.update(f"{mod_name}.{n}" if mod_name else n for n, _ in mod.named_parameters(recurse=False))
    return out


def no_decay_param(name: str, param: torch.Tensor, norm_names: set[str] = frozenset()) -> bool:
    """Whether a parameter conventionally gets no weight decay: biases, 1-D tensors, norm weights."""
    return param.ndim <= 1 or name.endswith(".bias") or name == "bias" or name in norm_names


def _layer_of(name: str, prefixes: Sequence[str]) -> int | None:
    """The index of the longest prefix that owns ``name`` (a prefix owns itself and ``prefix.*``)."""
    best, best_len = None, -1
    for i, prefix in enumerate(prefixes):
        if prefix == "":
            # The root layer owns only the root's own parameters (names without a dot).
            if "." not in name and best_len < 0:
                best, best_len = i, 0
        elif (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best_len:
            best, best_len = i, len(prefix)
    return best


def discriminative_groups(model: nn.Module, lrs: Sequence[float], layers: Sequence[str] | None = None,
                          weight_decay: float | None = None, no_decay_norm_bias: bool = False,
                          base_lr: float | None = None) -> list[dict]:
    """Parameter groups with one explicit LR per layer.

    Args:
        model: the model; only parameters with ``requires_grad`` are included.
        lrs: one LR per layer, in layer order.
        layers: name prefixes, one per layer, in order; default :func:`layer_names`.
        weight_decay: set on every group when given (else the optimizer's default applies).
        no_decay_norm_bias: put biases, 1-D parameters and normalization weights of each layer in a
            companion group with ``weight_decay=0``.
        base_lr: the LR that ``lr_scale`` is relative to; default ``max(lrs)``.

    Returns:
        A list of dicts for any ``torch.optim`` optimizer, each with ``params``, ``lr``,
        ``lr_scale`` and ``name`` (plus ``weight_decay`` as asked). Empty groups are left out.

    Raises:
        ValueError: if ``lrs`` and ``layers`` differ in length, a prefix matches nothing, or a
            trainable parameter belongs to no layer (add its prefix to ``layers``).
    """
    prefixes = list(layers) if layers is not None else layer_names(model)
    if len(lrs) != len(prefixes):
        raise ValueError(f"lrs has {len(lrs)} values but there are {len(prefixes)} layers ({prefixes}); "
                         "pass one LR per layer")
    if any(lr < 0 for lr in lrs):
        raise ValueError(f"every LR must be >= 0, got {list(lrs)}")
    ref = float(base_lr) if base_lr is not None else max(lrs)
    norm_names = _norm_param_names(model) if no_decay_norm_bias else set()
    buckets: list[tuple[list, list]] = [([], []) for _ in prefixes]
    orphans = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        i = _layer_of(name, prefixes)
        if i is None:
            orphans.append(name)
            continue
        buckets[i][1 if no_decay_norm_bias and no_decay_param(name, p, norm_names) else 0].append(p)
    if orphans:
        raise ValueError(f"parameters {orphans[:5]}{' ...' if len(orphans) > 5 else ''} belong to none of the "
                         f"layers {prefixes}; add their prefix to `layers`")
    for prefix, (decay, plain) in zip(prefixes, buckets):
        if not decay and not plain:
            raise ValueError(f"layer prefix {prefix!r} matches no trainable parameter; "
                             f"valid top-level names: {layer_names(model)}")
    groups = []
    for prefix, lr, (decay, plain) in zip(prefixes, lrs, buckets):
        label = prefix or "<root>"
        for params, suffix, wd in ((decay, "", weight_decay), (plain, "/no_decay", 0.0)):
            if not params:
                continue
            group = {"params": params, "lr": float(lr), "lr_scale": float(lr) / ref if ref else 1.0,
                     "name": label + suffix}
            if wd is not None:
                group["weight_decay"] = wd
            groups.append(group)
    return groups


def layerwise_groups(model: nn.Module, lr: float, decay: float = 0.8, layers: Sequence[str] | None = None,
                     weight_decay: float | None = None, no_decay_norm_bias: bool = False) -> list[dict]:
    """Layer-wise LR decay: the last layer gets ``lr``, each earlier one ``decay`` times less.

    Layer ``i`` of ``n`` gets ``lr * decay ** (n - 1 - i)``, recorded as ``lr_scale``.

    Args:
        model: the model.
        lr: the LR of the last layer (the head).
        decay: ratio between consecutive layers, in (0, 1] (1 means one LR everywhere).
        layers: name prefixes, one per layer, earliest first; default: the top-level children.
        weight_decay, no_decay_norm_bias: see :func:`discriminative_groups`.

    Raises:
        ValueError: if ``lr < 0`` or ``decay`` is outside (0, 1], and as
            :func:`discriminative_groups`.

    Examples:
        >>> opt = lrfuse.FusedAdamW(layerwise_groups(model, lr=3e-4, decay=0.75,
        ...                         layers=["embed", *[f"blocks.{i}" for i in range(12)], "head"],
        ...                         weight_decay=0.05, no_decay_norm_bias=True))  # doctest: +SKIP
    """
    if lr < 0:
        raise ValueError(f"lr must be >= 0, got {lr}")
    if not 0.0 < decay <= 1.0:
        raise ValueError(f"decay must be in (0, 1] (the LR ratio of a layer to the next), got {decay}")
    prefixes = list(layers) if layers is not None else layer_names(model)
    n = len(prefixes)
    lrs = [lr * decay ** (n - 1 - i) for i in range(n)]
    return discriminative_groups(model, lrs, prefixes, weight_decay, no_decay_norm_bias, base_lr=lr)


def group_lrs(groups: Iterable[dict]) -> list[float]:
    """The ``lr`` of each group, as floats (a tensor LR is read once)."""
    return [float(g["lr"]) for g in groups]


# Per-group LR helpers shared by the finder, the schedule and the health monitor.

def set_group_lr(group: dict, lr: float) -> None:
    """Set a group's LR, in place when it is a tensor (compiled steps and lrfuse read it there)."""
    if isinstance(group["lr"], torch.Tensor):
        group["lr"].fill_(lr)
    else:
        group["lr"] = lr


def peak_lr(group: dict) -> float:
    """The LR a group's schedule is built from: OneCycleLR's ``max_lr``, a scheduler's ``initial_lr``, or ``lr``."""
    return float(group.get("max_lr", group.get("initial_lr", group["lr"])))


def group_labels(optimizer: torch.optim.Optimizer) -> list[str | None]:
    """Each group's label as Lightning's ``LearningRateMonitor`` writes it: the group's ``name``,
    else ``pg1``, ``pg2`` ... with several groups, else ``None`` (one unnamed group)."""
    groups = optimizer.param_groups
    if len(groups) == 1:
        return [groups[0].get("name") or None]
    return [g.get("name") or f"pg{i + 1}" for i, g in enumerate(groups)]
