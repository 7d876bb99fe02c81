"""``LRHealthMonitor``: is the learning rate of each parameter group too high or too low?

Two signals, checked every ``every_n_steps`` optimizer steps:

* the update-to-weight ratio ``||p_after - p_before|| / ||p_before||`` of each group over one step
  (around 1e-3 is the classic healthy value; far above means the LR dominates the weights, far
  below means they barely move);
* the training loss (averaged over ranks): non-finite or rising well above its best means the LR
  is too high; flat while the updates are small means it is too low.

The verdict reads the whole history, not only the last checks: a loss that at any point was
non-finite or exploded far above its start and has not since fallen below that start, or that never
fell while the updates were large, stays "too high" even once the weights have stopped moving (an
LR far too high kills the units, the updates then shrink and the last checks alone would say "too
low").

The decision rules are the pure :class:`HealthRules` and :func:`loss_verdict` (a loss curve alone:
too high / too low / ok, also used by LR search); the callback only measures, logs and keeps state.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lrfuse.groups import group_labels

__all__ = ["HealthRules", "LRHealthMonitor", "group_keys", "group_metric_names", "loss_state", "loss_verdict"]

OK, TOO_HIGH, TOO_LOW = "ok", "too_high", "too_low"
_CODE = {OK: 0.0, TOO_HIGH: 1.0, TOO_LOW: -1.0}
PREFIX = "lr_health"  # not Lightning's LearningRateMonitor's "lr-": both can log side by side
HISTORY = 100  # update ratios kept per group (the rules read the last `patience`)


def loss_state(losses: Sequence[float], best: float | None = None, diverge_factor: float = 2.0,
               flat_tol: float = 1e-3, window: int = 8) -> str | None:
    """``"diverging"``, ``"rising"``, ``"flat"`` or ``None`` (falling, or too little history).

    Args:
        losses: mean training losses, oldest first (the last ``window`` are read for flatness).
        best: the best finite loss seen so far (default: the best of ``losses``).
        diverge_factor: a last loss above ``best + (k - 1) * |best|`` is rising.
        flat_tol: a relative fall across the last ``window`` losses below this is flat.
    """
    if not len(losses):
        return None
    if best is None:
        best = min((v for v in losses if math.isfinite(v)), default=math.inf)
    last = losses[-1]
    if not math.isfinite(last):
        return "diverging"
    if last > best + (diverge_factor - 1) * abs(best):
        return "rising"
    if len(losses) >= window:
        first = losses[-window]
        if math.isfinite(first) and first - last <= flat_tol * max(abs(first), 1e-12):
            return "flat"
    return None


def _exploded(loss: float, first: float, explode_factor: float) -> bool:
    """Non-finite, or above ``first + (explode_factor - 1) * |first|`` (the start of the curve)."""
    return not math.isfinite(loss) or loss > first + (explode_factor - 1) * abs(first)


def _fallen(recent: Sequence[float], first: float, fall_tol: float) -> bool:
    """The mean of ``recent`` (finite) below ``first - fall_tol * |first|``: the loss has come down."""
    if not recent or not all(math.isfinite(v) for v in recent):
        return False
    return sum(recent) / len(recent) < first - fall_tol * abs(first)


def loss_verdict(losses: Sequence[float], diverge_factor: float = 2.0, flat_tol: float = 1e-3,
                 window: int = 8, explode_factor: float = 10.0, fall_tol: float = 0.25) -> tuple[str, str]:
    """``(verdict, why)`` of an LR from its loss curve alone: ``too_high`` (non-finite or risen well
    above its best now, or at any point non-finite or above ``explode_factor`` times its first value
    and not fallen below that first value since), ``too_low`` (flat over the last ``window`` points)
    or ``ok``.

    Example:
        >>> loss_verdict([2.3, 1.9, 1.5, float("nan")])
        ('too_high', 'training loss diverging')
        >>> loss_verdict([2.3, 5e4, 40.0] + [2.3] * 8)[0]  # exploded, then flat at its start
        'too_high'
    """
    state = loss_state(losses, None, diverge_factor, flat_tol, window)
    if state in ("diverging", "rising"):
        return TOO_HIGH, f"training loss {state}"
    if len(losses) and math.isfinite(losses[0]):
        first = losses[0]
        peak = next((v for v in losses if _exploded(v, first, explode_factor)), None)
        if peak is not None and not _fallen(losses[-3:], first, fall_tol):
            return TOO_HIGH, f"training loss exploded (to {peak:.3g}) and has not fallen below its start ({first:.3g}) since"
    if state == "flat":
        return TOO_LOW, "training loss flat"
    return OK, ""


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
        explode_factor: a loss (at any check) non-finite or above ``first + (k - 1) * |first|``,
            ``first`` the loss of the first check, has exploded: too high until the loss has fallen
            (``fall_tol``), however small the updates have become since; and once a loss has
            exploded, small updates never make the verdict too low (the units an explosion kills
            stop moving: raising the LR would be the wrong advice).
        fall_tol: the loss has fallen when the mean of the last ``patience`` losses is below
            ``first - fall_tol * |first|``. After ``patience + 1`` checks, a loss that has not
            fallen while the group's update ratio was above ``high_ratio`` at ``patience`` checks or
            more (of those the caller passes: the monitor keeps the last 100) means too high too.
    """

    high_ratio: float = 0.1
    low_ratio: float = 1e-5
    flat_ratio: float = 1e-4
    diverge_factor: float = 2.0
    flat_tol: float = 1e-3
    patience: int = 3
    explode_factor: float = 10.0
    fall_tol: float = 0.25
    _losses: deque = field(default_factory=lambda: deque(maxlen=8))
    _best: float = math.inf
    _first: float | None = None  # the loss of the first check (finite), the reference of the history rules
    _peak: float | None = None  # the first loss that exploded (inf for a non-finite one), None if none did
    _count: int = 0  # losses recorded

    def add_loss(self, mean_loss: float) -> None:
        """Record the mean training loss of the last window."""
        self._losses.append(mean_loss)
        self._count += 1
        if self._first is None and math.isfinite(mean_loss):
            self._first = mean_loss
        if self._peak is None and (not math.isfinite(mean_loss)
                                   or (self._first is not None and _exploded(mean_loss, self._first, self.explode_factor))):
            self._peak = mean_loss if math.isfinite(mean_loss) else math.inf
        if math.isfinite(mean_loss):
            self._best = min(self._best, mean_loss)

    def loss_state(self) -> str | None:
        """``"diverging"``, ``"rising"``, ``"flat"`` or ``None`` (falling, or too little history)."""
        return loss_state(list(self._losses), self._best, self.diverge_factor, self.flat_tol, self._losses.maxlen)

    def state_dict(self) -> dict:
        return {"losses": list(self._losses), "best": self._best, "first": self._first, "peak": self._peak,
                "count": self._count}

    def load_state_dict(self, state: dict) -> None:
        self._losses = deque(state["losses"], maxlen=self._losses.maxlen)
        self._best = float(state["best"])
        if "first" in state:
            self._first, self._peak, self._count = state["first"], state["peak"], int(state["count"])
            return
        # A state dict from before the history rules: rebuild what the kept losses tell.
        finite = [v for v in self._losses if math.isfinite(v)]
        self._first, self._count = (finite[0] if finite else None), len(self._losses)
        self._peak = next((v if math.isfinite(v) else math.inf for v in self._losses
                           if self._first is not None and _exploded(v, self._first, self.explode_factor)), None)

    def _history(self, ratios: list[float]) -> str | None:
        """Why the whole history says too high (exploded, or never fell with large updates), or None."""
        if self._first is None or _fallen(list(self._losses)[-self.patience:], self._first, self.fall_tol):
            return None
        if self._peak is not None:
            peak = "non-finite" if math.isinf(self._peak) else f"{self._peak:.3g}"
            return f"training loss exploded ({peak}) and has not fallen below its start ({self._first:.3g}) since"
        large = [r for r in ratios if math.isfinite(r) and r > self.high_ratio]
        if self._count > self.patience and len(large) >= self.patience:
            return (f"training loss never fell below its start ({self._first:.3g}) with update/weight ratios "
                    f"up to {max(large):.2g} > {self.high_ratio:g}")
        return None

    def verdict(self, ratios: list[float]) -> tuple[str, str]:
        """``(status, why)`` of a group from its update ratios (most recent last; the last ``patience``
        for the ratio rules, all of them for the "never fell with large updates" one) and the whole
        loss history."""
        loss = self.loss_state()
        recent = ratios[-self.patience:]
        if loss in ("diverging", "rising"):
            return TOO_HIGH, f"training loss {loss}"
        why = self._history(ratios)
        if why:
            return TOO_HIGH, why
        if len(recent) >= self.patience and all(r > self.high_ratio for r in recent):
            return TOO_HIGH, f"update/weight ratio {recent[-1]:.2g} > {self.high_ratio:g} for {len(recent)} checks"
        if self._peak is not None:
            return OK, ""  # exploded, then fell: small updates now are the explosion's dead units, not a low LR
        if len(recent) >= self.patience and all(r < self.low_ratio for r in recent):
            return TOO_LOW, f"update/weight ratio {recent[-1]:.2g} < {self.low_ratio:g} for {len(recent)} checks"
        if loss == "flat" and recent and recent[-1] < self.flat_ratio:
            return TOO_LOW, f"training loss flat and update/weight ratio {recent[-1]:.2g} < {self.flat_ratio:g}"
        return OK, ""


def group_metric_names(optimizer: torch.optim.Optimizer, prefix: str = "lr", name: str | None = None) -> list[str]:
    """Lightning's ``LearningRateMonitor`` names: ``lr-Adam`` for one group, ``lr-Adam/pg1``,
    ``lr-Adam/pg2`` ... for several, or ``lr-Adam/<name>`` when a group has a ``name``."""
    base = f"{prefix}-{name or type(optimizer).__name__}"
    return [f"{base}/{label}" if label else base for label in group_labels(optimizer)]


def group_keys(optimizers: Sequence[torch.optim.Optimizer]) -> list[list[str]]:
    """The monitor's key of every group: ``FusedAdam`` (one group), ``FusedAdam/pg1`` or
    ``FusedAdam/<name>``; with several optimizers the index follows the class, ``FusedAdam-0/pg1``,
    ``FusedAdam-1/pg1``, so two optimizers of one class never share a key."""
    keys = []
    for i, opt in enumerate(optimizers):
        base = type(opt).__name__ + (f"-{i}" if len(optimizers) > 1 else "")
        keys.append([f"{base}/{label}" if label else base for label in group_labels(opt)])
    return keys


class LRHealthMonitor(Callback):
    """Watch each parameter group's learning rate while training and flag it when too high or low.

    Every ``every_n_steps`` optimizer steps it measures each group's update-to-weight ratio and the
    training loss (mean over ranks), applies :class:`HealthRules`, logs to every logger
    ``lr_health/<key>/lr``, ``lr_health/<key>/update_ratio`` and ``lr_health/<key>/verdict``
    (+1 too high, 0 ok, -1 too low), and warns once each time a group's verdict turns bad. ``key``
    is the group's (:func:`group_keys`): ``FusedAdam/pg1``, or ``FusedAdam-1/pg1`` with several
    optimizers; the ``lr_health/`` prefix keeps these apart from Lightning's ``LearningRateMonitor``
    (``lr-FusedAdam/pg1``). The verdicts are in :attr:`status` (key -> ``ok`` / ``too_high`` /
    ``too_low``) and :attr:`reasons`; :attr:`ratios` keeps each group's last 100 update ratios.
    Verdicts, ratios and the loss history are saved in checkpoints (``state_dict``), so a resumed
    run judges as the uninterrupted one would.

    Args:
        every_n_steps: check period in optimizer steps (the check copies each group's weights once).
        high_ratio, low_ratio, flat_ratio, diverge_factor, flat_tol, patience, explode_factor, fall_tol:
            see :class:`HealthRules`.
        warn: warn when a verdict turns bad.

    Raises:
        ValueError: if ``every_n_steps < 1``.

    Example:
        >>> Trainer(callbacks=[lrfuse.LRHealthMonitor(every_n_steps=50)])  # doctest: +SKIP
    """

    def __init__(self, every_n_steps: int = 10, high_ratio: float = 0.1, low_ratio: float = 1e-5,
                 flat_ratio: float = 1e-4, diverge_factor: float = 2.0, flat_tol: float = 1e-3, patience: int = 3,
                 warn: bool = True, explode_factor: float = 10.0, fall_tol: float = 0.25) -> None:
        if every_n_steps < 1:
            raise ValueError(f"LRHealthMonitor: every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps, self.warn = every_n_steps, warn
        self.rules = HealthRules(high_ratio, low_ratio, flat_ratio, diverge_factor, flat_tol, patience,
                                 explode_factor, fall_tol)
        self._history = max(HISTORY, patience)
        self.status: dict[str, str] = {}
        self.reasons: dict[str, str] = {}
        self.ratios: dict[str, deque[float]] = {}
        self._before: list[list[list[torch.Tensor]]] | None = None
        self._loss_sum, self._loss_count = 0.0, 0
        self._snap_step = -1

    @override
    def state_dict(self) -> dict:
        # The loss summed since the last check too: a check after resuming averages what the
        # uninterrupted run's would.
        return {"status": dict(self.status), "reasons": dict(self.reasons),
                "ratios": {k: list(v) for k, v in self.ratios.items()}, "rules": self.rules.state_dict(),
                "loss_sum": float(self._loss_sum), "loss_count": self._loss_count}

    @override
    def load_state_dict(self, state_dict: dict) -> None:
        self.status, self.reasons = dict(state_dict["status"]), dict(state_dict["reasons"])
        self.ratios = {k: deque(v, maxlen=self._history) for k, v in state_dict["ratios"].items()}
        self.rules.load_state_dict(state_dict["rules"])
        self._loss_sum, self._loss_count = state_dict["loss_sum"], state_dict["loss_count"]

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
        for opt, keys, saved in zip(trainer.optimizers, group_keys(trainer.optimizers), before):
            for group, key, old in zip(opt.param_groups, keys, saved):
                new = [p for p in group["params"] if p.grad is not None]
                ratio = _update_ratio(old, new)
                ratios = self.ratios.setdefault(key, deque(maxlen=self._history))
                ratios.append(ratio)
                status, why = self.rules.verdict(list(ratios))
                if status != OK and self.status.get(key) != status and self.warn:
                    advice = "lower it (LRFinder suggests one)" if status == TOO_HIGH else "raise it (LRFinder suggests one)"
                    rank_zero_warn(f"LRHealthMonitor: the learning rate of {key} ({float(group['lr']):.3g}) looks "
                                   f"{status.replace('_', ' ')}: {why}; {advice}")
                self.status[key], self.reasons[key] = status, why
                stats[f"{PREFIX}/{key}/lr"] = float(group["lr"])
                stats[f"{PREFIX}/{key}/update_ratio"] = ratio
                stats[f"{PREFIX}/{key}/verdict"] = _CODE[status]
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
