"""``LRHealthMonitor``: is the learning rate of each parameter group too high or too low?

Two signals, checked every ``every_n_steps`` optimizer steps:

* the update-to-weight ratio ``||p_after - p_before|| / ||p_before||`` of each group over one step
  (around 1e-3 is the classic healthy value; far above means the LR dominates the weights, far
  below means they barely move);
* the training loss (averaged over ranks): non-finite or rising well above its best means the LR
  is too high; flat while the updates are small means it is too low.

The decision rules are the pure :class:`HealthRules`; the callback only measures and logs.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

__all__ = ["HealthRules", "LRHealthMonitor", "group_metric_names"]

OK, TOO_HIGH, TOO_LOW = "ok", "too_high", "too_low"
_CODE = {OK: 0.0, TOO_HIGH: 1.0, TOO_LOW: -1.0}


@dataclass
class HealthRules:
    """The verdict of one group from its recent update ratios and the recent losses.

    Args:
        high_ratio: update-to-weight ratio above which the LR is too high.
        low_ratio: ratio below which the LR is too low.
        flat_ratio: with a flat loss, ratios below this also mean too low.
        diverge_factor: a window-mean loss above ``best + (k - 1) * |best|`` means too high.
        flat_tol: relative fall of the loss across the history below which it is flat.
        patience: consecutive checks a ratio must stay out of range before it is flagged.
    """

    high_ratio: float = 0.1
    low_ratio: float = 1e-5
    flat_ratio: float = 1e-4
    diverge_factor: float = 2.0
    flat_tol: float = 1e-3
    patience: int = 3
    _losses: deque = field(default_factory=lambda: deque(maxlen=8))
    _best: float = math.inf

    def add_loss(self, mean_loss: float) -> None:
        """Record the mean training loss of the last window."""
        self._losses.append(mean_loss)
        if math.isfinite(mean_loss):
            self._best = min(self._best, mean_loss)

    def loss_state(self) -> str | None:
        """``"diverging"``, ``"rising"``, ``"flat"`` or ``None`` (falling, or too little history)."""
        if not self._losses:
            return None
        last = self._losses[-1]
        if not math.isfinite(last):
            return "diverging"
        if last > self._best + (self.diverge_factor - 1) * abs(self._best):
            return "rising"
        if len(self._losses) == self._losses.maxlen:
            first = self._losses[0]
            if math.isfinite(first) and first - last <= self.flat_tol * max(abs(first), 1e-12):
                return "flat"
        return None

    def verdict(self, ratios: list[float]) -> tuple[str, str]:
        """``(status, why)`` of a group from its last ``patience`` ratios (most recent last)."""
        loss = self.loss_state()
        recent = ratios[-self.patience:]
        if loss in ("diverging", "rising"):
            return TOO_HIGH, f"training loss {loss}"
        if len(recent) >= self.patience and all(r > self.high_ratio for r in recent):
            return TOO_HIGH, f"update/weight ratio {recent[-1]:.2g} > {self.high_ratio:g} for {len(recent)} checks"
        if len(recent) >= self.patience and all(r < self.low_ratio for r in recent):
            return TOO_LOW, f"update/weight ratio {recent[-1]:.2g} < {self.low_ratio:g} for {len(recent)} checks"
        if loss == "flat" and recent and recent[-1] < self.flat_ratio:
            return TOO_LOW, f"training loss flat and update/weight ratio {recent[-1]:.2g} < {self.flat_ratio:g}"
        return OK, ""


def group_metric_names(optimizer: torch.optim.Optimizer, prefix: str = "lr", name: str | None = None) -> list[str]:
    """Lightning's ``LearningRateMonitor`` names: ``lr-Adam`` for one group, ``lr-Adam/pg1``,
    ``lr-Adam/pg2`` ... for several, or ``lr-Adam/<name>`` when a group has a ``name``."""
    base = f"{prefix}-{name or type(optimizer).__name__}"
    groups = optimizer.param_groups
    if len(groups) == 1:
        return [f"{base}/{groups[0]['name']}" if groups[0].get("name") else base]
    return [f"{base}/{g['name']}" if g.get("name") else f"{base}/pg{i + 1}" for i, g in enumerate(groups)]


class LRHealthMonitor(Callback):
    """Watch each parameter group's learning rate while training and flag it when too high or low.

    Every ``every_n_steps`` optimizer steps it measures each group's update-to-weight ratio and the
    training loss (mean over ranks), applies :class:`HealthRules`, logs to every logger
    ``lr-FusedAdam/pg1`` (the LR), ``update_ratio-FusedAdam/pg1`` and ``lr_health-FusedAdam/pg1``
    (+1 too high, 0 ok, -1 too low), and warns once each time a group's verdict turns bad.
    The verdicts are in :attr:`status` (metric name of the group -> ``ok`` / ``too_high`` /
    ``too_low``) and :attr:`reasons`.

    Args:
        every_n_steps: check period in optimizer steps (the check copies each group's weights once).
        high_ratio, low_ratio, flat_ratio, diverge_factor, flat_tol, patience: see :class:`HealthRules`.
        warn: warn when a verdict turns bad.

    Raises:
        ValueError: if ``every_n_steps < 1``.

    Example:
        >>> Trainer(callbacks=[lrfuse.LRHealthMonitor(every_n_steps=50)])  # doctest: +SKIP
    """

    def __init__(self, every_n_steps: int = 10, high_ratio: float = 0.1, low_ratio: float = 1e-5,
                 flat_ratio: float = 1e-4, diverge_factor: float = 2.0, flat_tol: float = 1e-3, patience: int = 3,
                 warn: bool = True) -> None:
        if every_n_steps < 1:
            raise ValueError(f"LRHealthMonitor: every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps, self.warn = every_n_steps, warn
        self.rules = HealthRules(high_ratio, low_ratio, flat_ratio, diverge_factor, flat_tol, patience)
        self.status: dict[str, str] = {}
        self.reasons: dict[str, str] = {}
        self.ratios: dict[str, list[float]] = {}
        self._before: list[list[list[torch.Tensor]]] | None = None
        self._loss_sum, self._loss_count = 0.0, 0
        self._snap_step = -1

    def _names(self, trainer: pl.Trainer) -> list[list[str]]:
        return [group_metric_names(opt) for opt in trainer.optimizers]

    @override
    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step % self.every_n_steps != 0 or self._before is not None:
            return
        self._snap_step = trainer.global_step
        with torch.no_grad():
            self._before = [[[p.detach().clone() for p in g["params"] if p.grad is not None]
                             for g in opt.param_groups] for opt in trainer.optimizers]

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            # Summed on the device: no host sync except at a check.
            self._loss_sum = self._loss_sum + loss.detach().double()
            self._loss_count += 1
        if self._before is None or trainer.global_step <= self._snap_step:
            return  # the step has not happened yet (gradient accumulation) or no check is due
        before, self._before = self._before, None
        stats: dict[str, float] = {}
        mean = torch.as_tensor(self._loss_sum / max(self._loss_count, 1), dtype=torch.float64,
                               device=trainer.strategy.root_device)
        # One collective per check: every rank sees the same loss and takes the same decisions.
        mean = float(trainer.strategy.reduce(mean, reduce_op="mean"))
        self._loss_sum, self._loss_count = 0.0, 0
        self.rules.add_loss(mean)
        for opt, names, saved in zip(trainer.optimizers, self._names(trainer), before):
            for group, name, old in zip(opt.param_groups, names, saved):
                new = [p for p in group["params"] if p.grad is not None]
                ratio = _update_ratio(old, new)
                key = name.removeprefix("lr-")
                self.ratios.setdefault(name, []).append(ratio)
                status, why = self.rules.verdict(self.ratios[name])
                if status != OK and self.status.get(name) != status and self.warn:
                    advice = "lower it (LRFinder suggests one)" if status == TOO_HIGH else "raise it (LRFinder suggests one)"
                    rank_zero_warn(f"LRHealthMonitor: the learning rate of {name} ({float(group['lr']):.3g}) looks "
                                   f"{status.replace('_', ' ')}: {why}; {advice}")
                self.status[name], self.reasons[name] = status, why
                stats[name] = float(group["lr"])
                stats[f"update_ratio-{key}"] = ratio
                stats[f"lr_health-{key}"] = _CODE[status]
        for logger in trainer.loggers:
            logger.log_metrics(stats, step=trainer.global_step)


def _update_ratio(old: list[torch.Tensor], new: list[torch.Tensor]) -> float:
    """``||new - old|| / ||old||`` over a group's tensors (inf when the weights were all zero)."""
    if not old or len(old) != len(new):
        return float("nan")
    with torch.no_grad():
        delta = math.sqrt(sum(float((n.detach().float() - o.float()).pow(2).sum()) for o, n in zip(old, new)))
        norm = math.sqrt(sum(float(o.float().pow(2).sum()) for o in old))
    return delta / norm if norm > 0 else (0.0 if delta == 0 else math.inf)
