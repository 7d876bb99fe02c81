"""The learning-rate range test as pure logic: the sweep, the smoothing and the suggestion.

No Lightning here: :func:`range_test` drives any ``step(lr) -> loss`` function, and
:func:`suggest` turns a recorded curve into an :class:`LRRangeResult`. The Lightning callback in
:mod:`lrfuse.lightning.finder` is a thin layer that supplies ``step`` (one training step at a
given LR, loss averaged across ranks) and restores everything afterwards.

Smoothing is a local linear regression in ``x = log(lr)`` with Gaussian weights (a zero-lag,
centred filter): it does not shift the curve towards higher LRs the way a trailing exponential
moving average does, and it gives the derivative ``d loss / d log(lr)`` at every point from the
same fit. The online divergence test during the sweep is the one place a causal filter is used,
since the future is unknown there; it only decides when to stop.

Suggestion methods:

``steepest``
    the LR where the smoothed loss falls fastest per unit of ``log(lr)``, before the minimum.
``valley``
    the middle (in ``log(lr)``) of the longest stretch where the smoothed loss keeps falling.
``min10``
    one tenth of the LR at the minimum of the smoothed loss.
``auto`` (default)
    the geometric mean of the steepest-descent LR (or, without one, the valley's) and the LR of the
    smoothed minimum: the middle, in ``log(lr)``, of the stretch from where the loss falls fastest to
    where it stops falling. Both landmarks come from the zero-lag smoothed curve, so noise moves
    them little, and an error in either moves the suggestion by only half as much (in log).

The race (``LRFinder(race=True)``, the default): the curve locates the *edge*, the LR where the
smoothed loss stops falling, but not how far below it a whole run trains best; that depends on the
task and the budget. So a few candidates around the edge (:func:`race_candidates`: from 3x above
it to 10x below, half a decade apart) are each trained for a fifth of the run from the same
weights and batch order, under the run's own LR schedule compressed into those steps, and compared
on held-out loss; :func:`race_pick` takes the best, refined by a parabola through its neighbours
(in ``log(lr)``), and halves it: a run five times longer than the race trains best at about half
the LR that won the race (measured on the tuning tasks of ``benchmarks/tasks.py``).

For a schedule: the curve is measured at a constant LR, so each method's pick is a constant LR.
With ``schedule_mean`` (the schedule's mean factor over its peak, :func:`lrfuse.schedules.mean_factor`)
the suggestion becomes the schedule's *peak*: the pick divided by the mean, so that the LR summed
over the run is the same, and capped at the LR of the smoothed minimum, past which the sweep saw
training turn unstable.

Examples:
    >>> import math
    >>> result = range_test(lambda lr: 1 - math.tanh(math.log10(lr / 1e-3)) + (lr > 0.3) * 100,
    ...                     min_lr=1e-6, max_lr=1.0, num_steps=100)
    >>> round(math.log10(result.suggest("steepest").lr))  # the tanh falls fastest at 1e-3
    -3
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np

__all__ = ["METHODS", "RACE_SHARE", "LRRangeResult", "check_args", "lr_values", "race_candidates", "race_pick",
           "range_test", "smooth", "suggest"]

METHODS = ("auto", "steepest", "valley", "min10")
Method = Literal["auto", "steepest", "valley", "min10"]
_MIN_POINTS = 8  # fewer recorded steps than this cannot show a descent and its end
# The race (chosen on the tuning tasks of benchmarks/tasks.py): candidates at the edge times
# 10 ** RACE_SPAN, each trained for RACE_SHARE of the run; the winner times RACE_HORIZON.
RACE_SPAN = (0.5, 0.0, -0.5, -1.0)
RACE_SHARE = 0.2
RACE_HORIZON = 0.5


def _finite_positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < math.inf


def check_args(owner: str = "range_test", *, min_lr: float | None = None, max_lr: float | None = None,
               num_steps: int | None = None, mode: str | None = None, method: str | None = None,
               diverge_factor: float | None = None, bandwidth: float | None = None,
               schedule_mean: float | None = None) -> None:
    """The one place each range-test argument is checked; ``None`` skips an argument.

    ``LRFinder``, :func:`range_test`, :func:`lr_values` and :func:`suggest` all call this, so an
    argument is refused with the same message wherever it enters. Messages name ``owner``, the
    argument and what to pass instead.

    Raises:
        ValueError: on the first argument out of range.
    """
    def fail(what: str) -> None:
        raise ValueError(f"{owner}: {what}")

    if min_lr is not None and not _finite_positive(min_lr):
        fail(f"min_lr must be a finite number > 0, got {min_lr!r}; pass e.g. min_lr=1e-7")
    if max_lr is not None and not _finite_positive(max_lr):
        fail(f"max_lr must be a finite number > 0, got {max_lr!r}; pass e.g. max_lr=1.0 (the sweep stops "
             "early once the loss diverges, so a generous finite bound costs nothing)")
    if min_lr is not None and max_lr is not None and not min_lr < max_lr:
        fail(f"need 0 < min_lr < max_lr, got min_lr={min_lr}, max_lr={max_lr}; swap them or widen the range")
    if num_steps is not None and (isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 2):
        fail(f"num_steps must be an integer >= 2, got {num_steps!r}; pass e.g. num_steps=100")
    if mode is not None and mode not in ("exponential", "linear"):
        fail(f"mode must be 'exponential' or 'linear', got {mode!r}")
    if method is not None and method not in METHODS:
        fail(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if diverge_factor is not None and not (isinstance(diverge_factor, (int, float)) and 1 < diverge_factor < math.inf):
        fail(f"diverge_factor must be a finite number > 1, got {diverge_factor!r}; pass e.g. diverge_factor=4.0")
    # A Gaussian wider than half the curve turns it into one straight line: no minimum, no suggestion.
    if bandwidth is not None and not (isinstance(bandwidth, (int, float)) and 0 < bandwidth <= 0.5):
        fail(f"bandwidth must be in (0, 0.5] (the smoothing width as a fraction of the points), got {bandwidth!r}; "
             "pass e.g. bandwidth=0.05")
    if schedule_mean is not None and not (isinstance(schedule_mean, (int, float)) and 0 < schedule_mean <= 1):
        fail(f"schedule_mean must be in (0, 1] (the schedule's mean LR factor over its peak), got {schedule_mean!r}; "
             "compute it with lrfuse.schedules.mean_factor, or pass 1.0 for a constant LR")


def lr_values(min_lr: float, max_lr: float, num_steps: int,
              mode: Literal["exponential", "linear"] = "exponential") -> np.ndarray:
    """The ``num_steps`` LRs of the sweep, from ``min_lr`` to ``max_lr`` inclusive.

    Raises:
        ValueError: if ``0 < min_lr < max_lr`` (finite) does not hold, ``num_steps < 2`` or ``mode`` is unknown.
    """
    check_args("lr_values", min_lr=min_lr, max_lr=max_lr, num_steps=num_steps, mode=mode)
    if mode == "exponential":
        return np.geomspace(min_lr, max_lr, num_steps)
    return np.linspace(min_lr, max_lr, num_steps)


def smooth(lrs: Sequence[float], losses: Sequence[float], bandwidth: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Zero-lag smoothing of a loss curve and its slope against ``log(lr)``.

    Each point is the value at ``x_i`` of a weighted least-squares line through the curve, with
    Gaussian weights centred on ``x_i`` (a local linear regression). A linear trend passes through
    unchanged, also at the ends, where a centred average would bend it.

    Args:
        lrs: the LRs (positive), in sweep order.
        losses: the raw losses, finite.
        bandwidth: the Gaussian's standard deviation as a fraction of the number of points
            (at least one point).

    Returns:
        ``(smoothed_loss, slope)`` with ``slope = d smoothed_loss / d log(lr)``.
    """
    x = np.log(np.asarray(lrs, dtype=np.float64))
    y = np.asarray(losses, dtype=np.float64)
    n = len(y)
    if n == 0:
        return np.zeros(0), np.zeros(0)
    if n == 1:
        return y.copy(), np.zeros(1)
    sigma = max(1.0, bandwidth * n)
    idx = np.arange(n)
    w = np.exp(-0.5 * ((idx[:, None] - idx[None, :]) / sigma) ** 2)  # weights in index space
    sw = w.sum(1)
    mx = (w * x).sum(1) / sw
    my = (w * y).sum(1) / sw
    dx = x[None, :] - mx[:, None]
    var = (w * dx * dx).sum(1)
    cov = (w * dx * (y[None, :] - my[:, None])).sum(1)
    slope = np.divide(cov, var, out=np.zeros(n), where=var > 0)
    smoothed = my + slope * (x - mx)
    return smoothed, slope


@dataclass
class LRRangeResult:
    """What an LR range test found.

    Attributes:
        lr: the suggested LR (for the reference group: the one with the largest base LR), or
            ``None`` when :attr:`reason` says why none can be made.
        low, high: a plausible range around the suggestion (the descending stretch of the curve),
            or ``None`` with :attr:`lr`.
        method: the method that produced :attr:`lr`.
        lrs, losses: the recorded curve (raw).
        smoothed, slopes: the zero-lag smoothed loss and ``d loss / d log(lr)``.
        candidates: the LR each method suggests (``None`` where it has none).
        reason: why no suggestion could be made, else ``None``.
        stopped: why the sweep stopped early (``"diverged"``, ``"non-finite loss"``, ...), else ``None``.
        schedule_mean: the mean LR factor of the schedule :attr:`lr` is the peak of (1.0: constant LR).
        constant_lr: the suggestion for a constant LR; equals :attr:`lr` when ``schedule_mean`` is 1.
        race: after a race (:func:`race_pick`), its ``lrs``, held-out ``losses`` and ``steps`` per
            candidate, and ``curve_lr``, what the curve alone suggested; else ``None``.
    """

    lr: float | None
    low: float | None
    high: float | None
    method: str
    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    smoothed: list[float] = field(default_factory=list)
    slopes: list[float] = field(default_factory=list)
    candidates: dict[str, float | None] = field(default_factory=dict)
    reason: str | None = None
    stopped: str | None = None
    schedule_mean: float = 1.0
    constant_lr: float | None = None
    race: dict | None = None

    @property
    def edge(self) -> float | None:
        """The LR where the smoothed loss was lowest (where it stopped falling), or ``None`` without a
        curve that fell."""
        if self.lr is None or not self.smoothed:
            return None
        return float(self.lrs[int(np.argmin(self.smoothed))])

    def with_race(self, lrs: Sequence[float], losses: Sequence[float], steps: int) -> LRRangeResult:
        """This result with the race's pick (:func:`race_pick`) as :attr:`lr` (method ``"race"``), or
        unchanged when no candidate finished with a finite loss."""
        pick = race_pick(lrs, losses)
        race = {"lrs": [float(v) for v in lrs], "losses": [float(v) for v in losses], "steps": int(steps),
                "curve_lr": self.lr}
        if pick is None:
            return replace(self, race=race)
        return replace(self, lr=pick, method="race", low=min(self.low, pick), high=max(self.high, pick),
                       constant_lr=pick if self.schedule_mean == 1 else self.constant_lr, race=race)

    @property
    def ok(self) -> bool:
        """Whether a suggestion was made."""
        return self.lr is not None

    def suggest(self, method: Method = "auto", **kwargs) -> LRRangeResult:
        """The same curve with another suggestion method (see :func:`suggest`); the same
        ``schedule_mean`` unless given."""
        kwargs.setdefault("schedule_mean", self.schedule_mean)
        out = suggest(self.lrs, self.losses, method=method, **kwargs)
        out.stopped = self.stopped
        return out

    def summary(self) -> str:
        """One line for people: the suggestion and its range, or the reason there is none."""
        if self.lr is None:
            return f"no LR suggestion: {self.reason}"
        if self.race is not None:
            peak = "" if self.schedule_mean == 1 else " as the schedule's peak"
            curve = self.race["curve_lr"]
            peak += (f", raced {len(self.race['lrs'])} LRs for {self.race['steps']} steps each"
                     + ("" if self.method == "race" else " (none finished: the curve's pick)")
                     + f"; the curve alone: {curve:.3g}")
        else:
            peak = "" if self.schedule_mean == 1 else (
                f" as the schedule's peak (mean factor {self.schedule_mean:.2g}; constant lr {self.constant_lr:.3g})")
        return (f"suggested lr {self.lr:.3g} ({self.method}){peak}, plausible range {self.low:.3g} .. "
                f"{self.high:.3g}")

    def plot(self, path: str | None = None, ax=None, title: str | None = None):
        """Loss against LR (log axis), raw and smoothed, with the suggestion and range marked.

        Needs matplotlib (an optional dependency). Returns the figure; writes it to ``path`` if given.

        Raises:
            ImportError: if matplotlib is not installed (``pip install matplotlib``).
        """
        try:
            import matplotlib
            if ax is None and path is not None:
                matplotlib.use("Agg", force=False)
            import matplotlib.pyplot as plt
        except ImportError as error:
            raise ImportError("LRRangeResult.plot needs matplotlib: pip install matplotlib") from error
        if ax is None:
            fig, ax = plt.subplots(figsize=(6, 4))
        else:
            fig = ax.figure
        if self.lrs:
            finite = np.isfinite(self.losses)
            ax.plot(np.asarray(self.lrs)[finite], np.asarray(self.losses)[finite], ".", alpha=0.35, label="loss (raw)")
            ax.plot(self.lrs[: len(self.smoothed)], self.smoothed, "-", label="loss (smoothed, zero-lag)")
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("loss")
        if self.lr is not None:
            ax.axvspan(self.low, self.high, color="tab:green", alpha=0.12, label="plausible range")
            ax.axvline(self.lr, color="tab:red", ls="--", label=f"suggested {self.lr:.2g} ({self.method})")
        if self.smoothed:
            lo, hi = min(self.smoothed), max(self.smoothed[: max(1, len(self.smoothed) // 2)])
            pad = 0.1 * max(hi - lo, 1e-12)
            ax.set_ylim(lo - pad, max(hi, self.smoothed[0]) + 3 * pad)
        ax.set_title(title or (self.summary() if self.lr is None else "LR range test"), fontsize=9)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=120)
        return fig


def _longest_descent(slopes: np.ndarray, end: int, threshold: float) -> tuple[int, int] | None:
    """The longest run ``[i, j]`` (inclusive) with ``slope < threshold`` within ``[0, end]``."""
    best, start = None, None
    for i in range(end + 1):
        if slopes[i] < threshold:
            if start is None:
                start = i
            if best is None or i - start > best[1] - best[0]:
                best = (start, i)
        else:
            start = None
    return best


def suggest(lrs: Sequence[float], losses: Sequence[float], method: Method = "auto", bandwidth: float = 0.05,
            min_drop: float = 0.02, schedule_mean: float = 1.0) -> LRRangeResult:
    """Suggest an LR from a recorded range-test curve.

    Points from the first non-finite loss on are dropped. No suggestion (``lr=None`` with a
    ``reason``) when fewer than 8 points remain or the smoothed loss never falls by more than
    ``min_drop`` of its scale, nor by more than the noise.

    Args:
        lrs: the LRs of the sweep, increasing.
        losses: the raw loss at each LR.
        method: ``auto``, ``steepest``, ``valley`` or ``min10`` (see the module docstring).
        bandwidth: smoothing width as a fraction of the number of points (see :func:`smooth`).
        min_drop: the smallest relative fall of the smoothed loss that counts as a descent.
        schedule_mean: the mean LR factor of the schedule the suggestion will peak (1.0: a constant
            LR; see :func:`lrfuse.schedules.mean_factor`). Below 1 the suggestion is the schedule's
            peak: the constant-LR pick divided by ``schedule_mean`` (the same LR summed over the run),
            but never above the LR where the smoothed loss stopped falling, nor below the constant pick.

    Raises:
        ValueError: on an unknown method, an out-of-range bandwidth or schedule_mean, or mismatched lengths.
    """
    check_args("suggest", method=method, bandwidth=bandwidth, schedule_mean=schedule_mean)
    if len(lrs) != len(losses):
        raise ValueError(f"lrs and losses must have the same length, got {len(lrs)} and {len(losses)}")
    lr_arr = np.asarray(lrs, dtype=np.float64)
    loss_arr = np.asarray(losses, dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(loss_arr))
    n = int(bad[0]) if len(bad) else len(loss_arr)

    def empty(reason: str, smoothed=(), slopes=()) -> LRRangeResult:
        return LRRangeResult(None, None, None, method, list(map(float, lrs)), list(map(float, losses)),
                             list(map(float, smoothed)), list(map(float, slopes)), {}, reason,
                             schedule_mean=schedule_mean)

    if n < _MIN_POINTS:
        return empty(f"only {n} usable points before the loss diverged or the sweep ended (need {_MIN_POINTS}); "
                     "lower min_lr, or raise num_steps")
    x, y = lr_arr[:n], loss_arr[:n]
    ys, dy = smooth(x, y, bandwidth)
    i_min = int(np.argmin(ys))
    scale = max(float(np.max(np.abs(ys[: i_min + 1]))), 1e-12)  # the part after the minimum may explode
    # Noise of a smoothed value: the residuals' robust spread over the ~3.5 sigma points that a
    # Gaussian window of width sigma effectively averages.
    sigma = max(1.0, bandwidth * n)
    noise = float(np.median(np.abs(y - ys))) * 1.4826 / math.sqrt(3.5 * sigma)
    drop = float(np.max(ys[: i_min + 1]) - ys[i_min])
    if drop <= max(min_drop * scale, 3 * noise) or i_min == 0:
        return empty("the smoothed loss did not fall over the swept range (flat curve); widen the range "
                     "(max_lr), sweep more steps, or check that the model trains at all", ys, dy)

    candidates: dict[str, float | None] = {}
    # Steepest: skip the edge points, whose local fits see only one side.
    lo_i = min(max(1, int(bandwidth * n)), i_min)
    seg = dy[lo_i: i_min + 1]
    i_steep = lo_i + int(np.argmin(seg)) if len(seg) and np.min(seg) < 0 else None
    candidates["steepest"] = float(x[i_steep]) if i_steep is not None else None
    # "Descending" means falling at a tenth of the steepest rate or more: a long, nearly flat
    # start (LR too small to matter) must not count as the valley.
    steepest_slope = float(np.min(dy[: i_min + 1]))
    run = _longest_descent(dy, i_min, 0.1 * steepest_slope)
    if run is not None and run[1] > run[0]:
        mid = math.exp(0.5 * (math.log(x[run[0]]) + math.log(x[run[1]])))
        candidates["valley"] = float(mid)
    else:
        candidates["valley"] = None
    candidates["min10"] = float(x[i_min] / 10.0) if x[i_min] / 10.0 >= x[0] else None

    if method == "auto":
        # Midway (in log lr) between where the loss falls fastest and where it stops falling: both
        # landmarks come from the smoothed curve, and an error in either moves the result by half.
        anchor = candidates["steepest"] or candidates["valley"]
        chosen = math.sqrt(anchor * float(x[i_min])) if anchor is not None else None
    else:
        chosen = candidates[method]
    if chosen is None:
        return LRRangeResult(None, None, None, method, list(map(float, lrs)), list(map(float, losses)),
                             ys.tolist(), dy.tolist(), candidates,
                             f"method {method!r} found no descending part of the curve; try method='auto'",
                             schedule_mean=schedule_mean)
    constant = chosen
    if schedule_mean < 1:
        # A schedule runs below its peak most of the time: match the constant pick's summed LR
        # (peak = constant / mean), capped where the loss stopped falling, past which the range
        # test saw training become unstable.
        chosen = max(constant, min(constant / schedule_mean, float(x[i_min])))
    low = float(x[run[0]]) if run is not None else float(x[0])
    high = float(x[run[1]]) if run is not None else float(x[i_min])
    low, high = min(low, chosen), max(high, chosen)
    return LRRangeResult(chosen, low, high, method, list(map(float, lrs)), list(map(float, losses)),
                         ys.tolist(), dy.tolist(), candidates, None, schedule_mean=schedule_mean,
                         constant_lr=constant)


def race_candidates(result: LRRangeResult) -> list[float]:
    """The LRs to race: the curve's edge (:attr:`LRRangeResult.edge`) times ``10 ** RACE_SPAN``,
    from 3x above it to 10x below, highest first.

    Raises:
        ValueError: if ``result`` made no suggestion (there is no edge to race around).
    """
    edge = result.edge
    if edge is None:
        raise ValueError(f"race_candidates: the range test made no suggestion ({result.reason})")
    return [edge * 10.0 ** d for d in RACE_SPAN]


def race_pick(lrs: Sequence[float], losses: Sequence[float]) -> float | None:
    """The LR to train with after a race of ``lrs`` that ended at held-out ``losses``.

    The candidate with the lowest loss, moved to the minimum of the parabola (in ``log(lr)``)
    through it and its two neighbours when that is convex (never past the neighbours), times
    ``RACE_HORIZON``. ``None`` when no loss is finite.

    Examples:
        >>> round(race_pick([1e-1, 1e-2, 1e-3], [0.9, 0.5, 0.9]), 6)  # symmetric: the middle, halved
        0.005
    """
    if len(lrs) != len(losses) or not lrs:
        raise ValueError(f"race_pick: need as many losses as LRs (and at least one), got {len(lrs)} and {len(losses)}")
    x = np.log10(np.asarray(lrs, dtype=np.float64))
    y = np.asarray(losses, dtype=np.float64)
    order = np.argsort(x)
    x, y = x[order], y[order]
    finite = np.isfinite(y)
    if not finite.any():
        return None
    j = int(np.argmin(np.where(finite, y, np.inf)))
    best = float(x[j])
    if 0 < j < len(x) - 1 and finite[j - 1] and finite[j + 1]:
        a, b, _ = np.polyfit(x[j - 1: j + 2], y[j - 1: j + 2], 2)
        if a > 0:
            best = float(np.clip(-b / (2 * a), x[j - 1], x[j + 1]))
    return float(10.0 ** best * RACE_HORIZON)


def range_test(step: Callable[[float], float], min_lr: float = 1e-7, max_lr: float = 1.0, num_steps: int = 100,
               mode: Literal["exponential", "linear"] = "exponential", diverge_factor: float = 4.0,
               method: Method = "auto", bandwidth: float = 0.05, schedule_mean: float = 1.0,
               should_stop: Callable[[bool], bool] | None = None,
               progress: Callable[[int, float, float], None] | None = None) -> LRRangeResult:
    """Run an LR range test: call ``step(lr)`` with rising LRs, record the losses, suggest an LR.

    Stops early when the loss is NaN / inf or when the running (causal) smoothed loss exceeds
    ``diverge_factor`` times the best one seen (for a negative best: ``best + (k - 1) * |best|``).

    Args:
        step: does one training step at ``lr`` and returns its loss (a float).
        min_lr, max_lr, num_steps, mode: the sweep (see :func:`lr_values`).
        diverge_factor: the stop threshold above, > 1.
        method, bandwidth, schedule_mean: passed to :func:`suggest`.
        should_stop: turns this process's stop decision into the one every process takes
            (under DDP: a reduction across ranks); identity when ``None``.
        progress: called as ``progress(i, lr, loss)`` after each step.

    Raises:
        ValueError: on invalid sweep arguments.
    """
    check_args("range_test", min_lr=min_lr, max_lr=max_lr, num_steps=num_steps, mode=mode, method=method,
               diverge_factor=diverge_factor, bandwidth=bandwidth, schedule_mean=schedule_mean)
    schedule = lr_values(min_lr, max_lr, num_steps, mode)
    lrs: list[float] = []
    losses: list[float] = []
    ema, best, stopped = 0.0, math.inf, None
    beta = 0.7  # short memory: the stop test should react within a few steps
    for i, lr in enumerate(schedule):
        loss = float(step(float(lr)))
        lrs.append(float(lr))
        losses.append(loss)
        if progress is not None:
            progress(i, float(lr), loss)
        reason = None
        if not math.isfinite(loss):
            reason = "non-finite loss"
        else:
            ema = beta * ema + (1 - beta) * loss
            running = ema / (1 - beta ** (len(losses)))
            best = min(best, running)
            if running > best + (diverge_factor - 1) * abs(best) and i > 0:
                reason = "diverged"
        stop = reason is not None
        if should_stop is not None:
            stop = bool(should_stop(stop))
            if stop and reason is None:
                reason = "diverged on another process"
        if stop:
            stopped = reason
            break
    result = suggest(lrs, losses, method=method, bandwidth=bandwidth, schedule_mean=schedule_mean)
    result.stopped = stopped
    return result
