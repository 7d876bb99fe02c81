"""Is a learning rate too high, too low or fine? The verdict rules as pure logic.

Two signals, as :class:`lrfuse.LRHealthMonitor` measures them every few optimizer steps:

* the update-to-weight ratio ``||p_after - p_before|| / ||p_before||`` of each parameter group
  over one step (far above the healthy range means the LR dominates the weights, far below means
  they barely move);
* the training loss: non-finite or rising well above its best means the LR is too high; flat
  while the updates are small means it is too low.

The verdict reads the whole history, not only the last checks: a loss that at any point was
non-finite or exploded far above its start and has not since fallen below that start, or that never
fell while the updates were large, stays "too high" even once the weights have stopped moving (an
LR far too high kills the units, the updates then shrink and the last checks alone would say "too
low").

No Lightning here: :class:`HealthRules` takes losses and ratios from any training loop, and
:func:`loss_verdict` judges a loss curve alone (LR search uses it for each trial).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["OK", "TOO_HIGH", "TOO_LOW", "HealthRules", "loss_state", "loss_verdict"]

OK, TOO_HIGH, TOO_LOW = "ok", "too_high", "too_low"


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
