"""Is a learning rate too high, too low or fine? The verdict rules as pure logic.

:class:`lrfuse.LRHealthMonitor` feeds :class:`HealthRules` two signals every few optimizer steps:
the mean training loss since the last check, and each parameter group's update-to-weight ratio
``||p_after - p_before|| / ||p_before||`` over one step. The rules read the whole history, and
judge the loss against its own start and its own progress, so one set of thresholds holds for
tasks whose losses live on any scale and for optimizers whose ratios differ (Adam, SGD, RMSprop):

too high
    * the loss is non-finite, or **exploded**: at some check it rose above ``explode_factor``
      times its start, or stayed above ``sustain_factor`` times its start for ``patience`` checks
      (a one-check spike that size is the first steps of RMSprop at a good LR). A loss that spiked and came back down still says the LR is at the edge of
      stability; the verdict stays until the LR has been lowered to half of what it was then.
    * the loss is **rising**: the median of the last ``patience`` checks is above the best loss by
      more than ``rise`` of the progress made (start - best), and by more than ``diverge_factor - 1``
      times the best. Judged against the progress, the noise of a loss that converged near zero
      is not a rise.
    * the loss has not fallen (by ``fall_tol`` of its start) and either the updates were large
      (ratio above ``high_ratio`` at ``patience`` checks) or they **collapsed** (the last
      ``patience`` ratios ``collapse`` times below the largest): an LR far too high kills the
      units, the weights then stop moving, and the last checks alone would say "too low".
    * the ratio was above ``high_ratio`` at each of the last ``patience`` checks.

too low
    the loss has fallen by less than ``slow_fall`` of its start and the ratio was below
    ``low_ratio`` at each of the last ``patience`` checks, after more than ``patience`` checks; never
    after an explosion (its dead units are what stopped moving). A loss that came down and then
    flattened with tiny updates has converged: that is not a low LR.

The thresholds were chosen on the tuning tasks of ``benchmarks/tasks.py`` and are judged on its
evaluation tasks (``benchmarks/health_quality.py``).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["OK", "TOO_HIGH", "TOO_LOW", "HealthRules"]

OK, TOO_HIGH, TOO_LOW = "ok", "too_high", "too_low"


@dataclass
class HealthRules:
    """The verdict of a parameter group from the loss history and the group's update ratios.

    Args:
        high_ratio: update-to-weight ratio above which the updates are large.
        low_ratio: ratio below which the updates are small.
        patience: consecutive checks a ratio rule needs, and the checks the recent loss averages.
        explode_factor: a loss above ``explode_factor`` times its start (or non-finite) exploded.
        sustain_factor: so did a loss whose median over ``patience`` checks is above this times its start.
        rise: the share of its progress a loss must give back to be rising.
        diverge_factor: and the factor above its best (for a loss that has made little progress).
        fall_tol: the loss has fallen when the recent median is below ``(1 - fall_tol)`` times its start.
        slow_fall: too low needs the loss to have fallen by less than this share of its start.
        collapse: updates collapsed when the recent ratios are this many times below the largest.

    Examples:
        >>> rules = HealthRules()
        >>> for loss in (2.3, 5e4, 1.0, 0.5, 0.4):  # a spike, then back down
        ...     rules.add_loss(loss, lr=3.0)
        >>> rules.verdict([1e-2] * 5)[0]
        'too_high'
        >>> rules.add_loss(0.4, lr=1.0)  # the LR was lowered below half of what exploded
        >>> rules.verdict([1e-2] * 6)
        ('ok', '')
    """

    high_ratio: float = 0.1
    low_ratio: float = 2.5e-4
    patience: int = 3
    explode_factor: float = 100.0
    sustain_factor: float = 10.0
    rise: float = 0.5
    diverge_factor: float = 2.0
    fall_tol: float = 0.25
    slow_fall: float = 0.45
    collapse: float = 100.0
    # The history, not arguments.
    _recent: deque = field(init=False, repr=False)  # the last `patience` losses
    _first: float | None = field(default=None, init=False, repr=False)  # the loss of the first check (finite)
    _best: float = field(default=math.inf, init=False, repr=False)
    _count: int = field(default=0, init=False, repr=False)  # losses recorded
    _peak: float | None = field(default=None, init=False, repr=False)  # the first exploded loss (inf: non-finite)
    _peak_lr: float | None = field(default=None, init=False, repr=False)  # the LR then, if the caller gave LRs
    _cleared: bool = field(default=False, init=False, repr=False)  # the LR since lowered below half of _peak_lr

    def __post_init__(self) -> None:
        self._recent = deque(maxlen=max(self.patience, 1))

    def add_loss(self, mean_loss: float, lr: float | None = None) -> None:
        """Record the mean training loss since the last check, and the LR it was trained at (the
        largest over the groups; optional: without it an explosion is never forgiven)."""
        self._recent.append(mean_loss)
        self._count += 1
        finite = math.isfinite(mean_loss)
        if self._first is None and finite:
            self._first = mean_loss
        if finite:
            self._best = min(self._best, mean_loss)
        first = self._first
        above = (lambda value, k: first is not None and value > first + (k - 1) * abs(first))
        sustained = len(self._recent) == self._recent.maxlen and above(self._recent_loss(), self.sustain_factor)
        if not finite or above(mean_loss, self.explode_factor) or sustained:
            if self._peak is None or self._cleared:
                self._peak, self._peak_lr, self._cleared = (mean_loss if finite else math.inf), lr, False
        elif self._peak is not None and not self._cleared and lr is not None and self._peak_lr is not None:
            self._cleared = lr < 0.5 * self._peak_lr

    def _recent_loss(self) -> float:
        """The median of the last ``patience`` losses: one spike is not a trend."""
        recent = sorted(self._recent)
        if not recent:
            return math.nan
        mid = len(recent) // 2
        return recent[mid] if len(recent) % 2 else 0.5 * (recent[mid - 1] + recent[mid])

    def _fallen(self, share: float) -> bool:
        """The recent loss is below ``(1 - share)`` times the first (in its sign's sense)."""
        recent = self._recent_loss()
        return self._first is not None and math.isfinite(recent) and recent < self._first - share * abs(self._first)

    def verdict(self, ratios: Sequence[float]) -> tuple[str, str]:
        """``(status, why)`` of a group from its update ratios (oldest first, as many as kept) and
        the loss history."""
        recent = list(ratios[-self.patience:])
        full = len(recent) >= self.patience
        settled = self._count > self.patience
        last = self._recent[-1] if self._recent else math.nan
        if self._recent and not math.isfinite(last):
            return TOO_HIGH, "training loss non-finite"
        first, best = self._first, self._best
        if self._peak is not None and not self._cleared:
            peak = "non-finite" if math.isinf(self._peak) else f"{self._peak:.3g}"
            return TOO_HIGH, (f"training loss exploded (to {peak}, from {first:.3g} at the start); lower the LR "
                              "below half of what it was then" if first is not None else
                              f"training loss exploded (to {peak})")
        recent_loss = self._recent_loss()
        if first is not None and settled and math.isfinite(recent_loss):
            margin = max(self.rise * (first - best), (self.diverge_factor - 1) * abs(best))
            if recent_loss - best > margin:
                return TOO_HIGH, (f"training loss rising: {recent_loss:.3g} (median of the last {self.patience} "
                                  f"checks), best {best:.3g}, start {first:.3g}")
        if settled and not self._fallen(self.fall_tol):
            finite = [r for r in ratios if math.isfinite(r)]
            large = [r for r in finite if r > self.high_ratio]
            if len(large) >= self.patience:
                return TOO_HIGH, (f"training loss never fell below its start ({first:.3g}) with update/weight "
                                  f"ratios up to {max(large):.2g} > {self.high_ratio:g}")
            peak = max(finite, default=0.0)
            if full and peak >= self.low_ratio and all(r * self.collapse < peak for r in recent):
                return TOO_HIGH, (f"updates collapsed (update/weight ratio {recent[-1]:.2g}, from {peak:.2g}) "
                                  f"while the training loss did not fall: the LR killed the units")
        if full and all(r > self.high_ratio for r in recent):
            return TOO_HIGH, f"update/weight ratio {recent[-1]:.2g} > {self.high_ratio:g} for {len(recent)} checks"
        if (settled and full and self._peak is None and all(r < self.low_ratio for r in recent)
                and not self._fallen(self.slow_fall)):
            return TOO_LOW, (f"update/weight ratio {recent[-1]:.2g} < {self.low_ratio:g} for {len(recent)} checks "
                             f"and the training loss barely fell ({recent_loss:.3g} from {first:.3g})")
        return OK, ""

    def state_dict(self) -> dict:
        return {"recent": list(self._recent), "first": self._first, "best": self._best, "count": self._count,
                "peak": self._peak, "peak_lr": self._peak_lr, "cleared": self._cleared}

    def load_state_dict(self, state: dict) -> None:
        # A state dict of the rules before these (keys "losses", "best"; "first", "peak", "count"
        # from 0.1's history rules) loads too: what it kept is the recent losses.
        recent = state.get("recent", state.get("losses", []))
        self._recent = deque(recent, maxlen=self._recent.maxlen)
        self._first = state.get("first", next((v for v in recent if math.isfinite(v)), None))
        self._best, self._count = float(state["best"]), int(state.get("count", len(recent)))
        self._peak, self._peak_lr, self._cleared = state.get("peak"), state.get("peak_lr"), bool(state.get("cleared", False))
