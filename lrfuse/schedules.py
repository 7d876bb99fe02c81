"""Pure learning-rate schedule math: a schedule maps a step count to a factor of the base LR.

Every schedule here is a small callable ``schedule(t) -> float`` where ``t`` is the number of
completed steps (or epochs; the caller decides the unit) and the result multiplies each parameter
group's *base* learning rate. Working in factors, never in absolute LRs, is what keeps
discriminative / layer-wise ratios intact: group ``g`` gets ``base_lr[g] * schedule(t)``.

The schedules hold no hidden counter (the caller passes ``t`` explicitly), so resuming a run is a
matter of passing the restored step. The one exception is :class:`Plateau`, a state machine fed
with metric values; its state round-trips through ``state_dict`` / ``load_state_dict``.

Nothing in this module imports Lightning.

Examples:
    >>> s = Warmup(Cosine(total_steps=900), warmup_steps=100)
    >>> [round(s(t), 3) for t in (0, 50, 100, 550, 1000)]
    [0.0, 0.5, 1.0, 0.5, 0.0]
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from typing import Literal

__all__ = [
    "Constant", "Cosine", "Exponential", "MultiStep", "OneCycle", "Plateau", "Schedule",
    "StepDecay", "Warmup", "compress", "make_schedule", "mean_factor",
]


def _length(name: str, value, minimum: int) -> int:
    """A length in steps: a whole number >= ``minimum`` (an integral float is accepted), else ValueError.

    The one check of every length here: ``nan < 1`` is False, so plain comparisons let NaN through.
    """
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value != int(value) or value < minimum:
        raise ValueError(f"{name} must be a whole number of steps >= {minimum}, got {value!r}; pass an int")
    return int(value)


def _positive(name: str, value) -> float:
    """A finite number > 0, else ValueError naming ``name``."""
    if not (isinstance(value, (int, float)) and 0 < value < math.inf):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _check_step(t: int | float) -> float:
    if t < 0:
        raise ValueError(f"step must be >= 0, got {t}")
    return float(t)


class Schedule:
    """Base class: subclasses implement :meth:`factor`; ``schedule(t)`` validates ``t`` first."""

    def factor(self, t: float) -> float:
        raise NotImplementedError

    def __call__(self, t: int | float) -> float:
        return self.factor(_check_step(t))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


class Constant(Schedule):
    """The base LR unchanged: factor 1 at every step."""

    def factor(self, t: float) -> float:
        return 1.0


class StepDecay(Schedule):
    """Multiply by ``gamma`` every ``step_size`` steps: ``gamma ** (t // step_size)``.

    Args:
        step_size: steps between decays, >= 1.
        gamma: multiplier applied at each decay, > 0.

    Raises:
        ValueError: if ``step_size < 1`` or ``gamma <= 0``.
    """

    def __init__(self, step_size: int, gamma: float = 0.1) -> None:
        self.step_size = _length("step_size", step_size, 1)
        self.gamma = _positive("gamma", gamma)

    def factor(self, t: float) -> float:
        return self.gamma ** (int(t) // self.step_size)


class MultiStep(Schedule):
    """Piecewise-constant factor, changing at ``milestones``.

    By default the factor is multiplied by ``gamma`` at each milestone (torch's ``MultiStepLR``).
    With ``factors`` (one more than milestones) the pieces are given explicitly, e.g. "0.1 until
    step 400, 0.01 until 700, then 0.001" with base LR 1 is
    ``MultiStep([400, 700], factors=[0.1, 0.01, 0.001])``.

    Args:
        milestones: strictly increasing steps at which the factor changes.
        gamma: multiplier per milestone (ignored when ``factors`` is given).
        factors: explicit factor of each piece, ``len(milestones) + 1`` values.

    Raises:
        ValueError: if milestones are not strictly increasing or ``factors`` has the wrong length.
    """

    def __init__(self, milestones: Sequence[int], gamma: float = 0.1, factors: Sequence[float] | None = None) -> None:
        milestones = [int(m) for m in milestones]
        if any(b <= a for a, b in zip(milestones, milestones[1:])) or any(m < 0 for m in milestones):
            raise ValueError(f"milestones must be non-negative and strictly increasing, got {milestones}")
        if factors is not None and len(factors) != len(milestones) + 1:
            raise ValueError(
                f"factors needs len(milestones) + 1 = {len(milestones) + 1} values (one per piece), "
                f"got {len(factors)}")
        if factors is None:
            _positive("gamma", gamma)
        self.milestones = milestones
        self.gamma = float(gamma)
        self.factors = None if factors is None else [float(f) for f in factors]

    def factor(self, t: float) -> float:
        piece = bisect.bisect_right(self.milestones, t)
        return self.factors[piece] if self.factors is not None else self.gamma ** piece


class Exponential(Schedule):
    """Multiply by ``gamma`` every step: ``gamma ** t``.

    Raises:
        ValueError: if ``gamma <= 0``.
    """

    def __init__(self, gamma: float) -> None:
        self.gamma = _positive("gamma", gamma)

    def factor(self, t: float) -> float:
        return self.gamma ** t


class Cosine(Schedule):
    """Cosine annealing from 1 to ``min_factor`` over ``total_steps``, optionally with restarts.

    Without restarts the factor stays at ``min_factor`` after ``total_steps``. With
    ``restart_period`` (SGDR) the cosine restarts every period, each period ``restart_mult`` times
    longer than the last; ``total_steps`` is then ignored.

    Args:
        total_steps: length of the single annealing, >= 1 (unless ``restart_period`` is set).
        min_factor: factor at the end of each annealing, in [0, 1].
        restart_period: length of the first cycle; ``None`` for no restarts.
        restart_mult: growth of each next cycle's length, >= 1.

    Raises:
        ValueError: if a length is < 1 or ``min_factor`` is outside [0, 1].
    """

    def __init__(self, total_steps: int | None = None, min_factor: float = 0.0,
                 restart_period: int | None = None, restart_mult: float = 1.0) -> None:
        if restart_period is None:
            if total_steps is None:
                raise ValueError("total_steps must be given (or pass restart_period for restarts)")
            total_steps = _length("total_steps", total_steps, 1)
        else:
            restart_period = _length("restart_period", restart_period, 1)
        if not 1 <= restart_mult < math.inf:
            raise ValueError(f"restart_mult must be >= 1, got {restart_mult}")
        if not 0.0 <= min_factor <= 1.0:
            raise ValueError(f"min_factor must be in [0, 1], got {min_factor}")
        self.total_steps = total_steps
        self.min_factor = float(min_factor)
        self.restart_period = restart_period
        self.restart_mult = float(restart_mult)

    def _position(self, t: float) -> tuple[float, float]:
        """(steps into the current cycle, cycle length)."""
        if self.restart_period is None:
            return min(t, self.total_steps), float(self.total_steps)
        period = float(self.restart_period)
        if self.restart_mult == 1.0:
            return t % period, period
        # Closed form for the cycle index of a geometric series of periods (as in SGDR).
        n = int(math.log(t / period * (self.restart_mult - 1) + 1, self.restart_mult))
        start = period * (self.restart_mult ** n - 1) / (self.restart_mult - 1)
        length = period * self.restart_mult ** n
        if t - start >= length:  # floating-point edge at an exact restart
            start, length = start + length, length * self.restart_mult
        return t - start, length

    def factor(self, t: float) -> float:
        pos, length = self._position(t)
        return self.min_factor + (1.0 - self.min_factor) * 0.5 * (1.0 + math.cos(math.pi * pos / length))


class Warmup(Schedule):
    """Linear warm-up from ``start_factor`` to 1 over ``warmup_steps``, then ``inner`` (shifted).

    ``Warmup(inner, w)(t)`` is ``start + (1 - start) * t / w`` for ``t < w`` and ``inner(t - w)``
    afterwards, so the inner schedule starts its own count when the warm-up ends.

    Args:
        inner: the schedule after warm-up (any :class:`Schedule` or callable).
        warmup_steps: length of the warm-up, >= 0 (0 means no warm-up).
        start_factor: factor at step 0, in [0, 1].

    Raises:
        ValueError: if ``warmup_steps < 0`` or ``start_factor`` is outside [0, 1].
    """

    def __init__(self, inner: Schedule, warmup_steps: int, start_factor: float = 0.0) -> None:
        warmup_steps = _length("warmup_steps", warmup_steps, 0)
        if not 0.0 <= start_factor <= 1.0:
            raise ValueError(f"start_factor must be in [0, 1], got {start_factor}")
        self.inner = inner
        self.warmup_steps = warmup_steps
        self.start_factor = float(start_factor)

    def factor(self, t: float) -> float:
        if t < self.warmup_steps:
            return self.start_factor + (1.0 - self.start_factor) * t / self.warmup_steps
        return self.inner(t - self.warmup_steps)


class OneCycle(Schedule):
    """One-cycle policy with the base LR as the peak (torch's ``OneCycleLR``, cosine annealing).

    The factor rises from ``1 / div_factor`` to 1 over the first ``pct_start`` of
    ``total_steps``, then falls to ``1 / (div_factor * final_div_factor)`` at ``total_steps - 1``.

    Args:
        total_steps: length of the cycle, >= 2.
        pct_start: fraction of the cycle spent rising, in (0, 1).
        div_factor: peak / initial LR, >= 1.
        final_div_factor: initial / final LR, >= 1.

    Raises:
        ValueError: on out-of-range arguments.
    """

    def __init__(self, total_steps: int, pct_start: float = 0.3, div_factor: float = 25.0,
                 final_div_factor: float = 1e4) -> None:
        total_steps = _length("total_steps", total_steps, 2)
        if not 0.0 < pct_start < 1.0:
            raise ValueError(f"pct_start must be in (0, 1), got {pct_start}")
        if not (1 <= div_factor < math.inf and 1 <= final_div_factor < math.inf):
            raise ValueError(f"div_factor and final_div_factor must be >= 1, got {div_factor}, {final_div_factor}")
        self.total_steps = int(total_steps)
        self.pct_start = float(pct_start)
        self.div_factor = float(div_factor)
        self.final_div_factor = float(final_div_factor)

    @staticmethod
    def _cos(start: float, end: float, pct: float) -> float:
        return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)

    def factor(self, t: float) -> float:
        initial = 1.0 / self.div_factor
        final = initial / self.final_div_factor
        # Same phase boundaries as torch: peak at pct_start * total - 1, end at total - 1.
        peak = self.pct_start * self.total_steps - 1
        end = self.total_steps - 1
        t = min(t, end)
        if t <= peak:
            return self._cos(initial, 1.0, t / peak) if peak > 0 else 1.0
        return self._cos(1.0, final, (t - peak) / (end - peak))


class Plateau:
    """Reduce-on-plateau as a state machine over a monitored metric (torch's semantics).

    Feed it one metric value per evaluation with :meth:`update`; :attr:`scale` is the current
    factor (starts at 1, multiplied by ``factor`` after more than ``patience`` evaluations without
    improvement, then ``cooldown`` evaluations of grace). "Improvement" follows torch's
    ``ReduceLROnPlateau``: ``rel`` mode needs ``value < best * (1 - min_delta)`` (``min``) or
    ``value > best * (1 + min_delta)`` (``max``); ``abs`` mode needs ``value < best - min_delta`` /
    ``value > best + min_delta``. The per-group ``min_lr`` floor is applied by the caller.

    Args:
        mode: ``"min"`` (lower is better, e.g. a loss) or ``"max"`` (e.g. accuracy).
        factor: multiplier at each reduction, in (0, 1).
        patience: evaluations without improvement tolerated before reducing.
        min_delta: threshold of a significant improvement (see above), >= 0.
        threshold_mode: ``"rel"`` or ``"abs"``.
        cooldown: evaluations after a reduction during which bad ones are not counted.
        min_scale: floor of :attr:`scale`.

    Raises:
        ValueError: on an unknown mode or out-of-range arguments.

    Examples:
        >>> p = Plateau(patience=1)
        >>> [p.update(v) for v in (1.0, 1.0, 1.0)]
        [1.0, 1.0, 0.1]
    """

    def __init__(self, mode: Literal["min", "max"] = "min", factor: float = 0.1, patience: int = 10,
                 min_delta: float = 0.0, threshold_mode: Literal["rel", "abs"] = "rel", cooldown: int = 0,
                 min_scale: float = 0.0) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        if threshold_mode not in ("rel", "abs"):
            raise ValueError(f"threshold_mode must be 'rel' or 'abs', got {threshold_mode!r}")
        if not 0.0 < factor < 1.0:
            raise ValueError(f"factor must be in (0, 1) (it multiplies the LR on a plateau), got {factor}")
        if patience < 0 or cooldown < 0 or min_delta < 0 or min_scale < 0:
            raise ValueError("patience, cooldown, min_delta and min_scale must be >= 0, got "
                             f"{patience}, {cooldown}, {min_delta}, {min_scale}")
        self.mode = mode
        self.factor = float(factor)
        self.patience = int(patience)
        self.min_delta = float(min_delta)
        self.threshold_mode = threshold_mode
        self.cooldown = int(cooldown)
        self.min_scale = float(min_scale)
        self.scale = 1.0
        self.best = math.inf if mode == "min" else -math.inf
        self.num_bad = 0
        self.cooldown_left = 0
        self.num_reductions = 0

    def is_better(self, value: float) -> bool:
        best, d = self.best, self.min_delta
        if self.mode == "min":
            return value < (best * (1.0 - d) if self.threshold_mode == "rel" else best - d)
        return value > (best * (1.0 + d) if self.threshold_mode == "rel" else best + d)

    def update(self, value: float) -> float:
        """Record one evaluation of the metric; return the (possibly reduced) :attr:`scale`."""
        value = float(value)
        if math.isnan(value):  # a NaN metric is never an improvement
            self.num_bad += 1
        elif self.is_better(value):
            self.best = value
            self.num_bad = 0
        else:
            self.num_bad += 1
        if self.cooldown_left > 0:
            self.cooldown_left -= 1
            self.num_bad = 0
        if self.num_bad > self.patience:
            self.scale = max(self.scale * self.factor, self.min_scale)
            self.num_reductions += 1
            self.cooldown_left = self.cooldown
            self.num_bad = 0
        return self.scale

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("scale", "best", "num_bad", "cooldown_left", "num_reductions")}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)


def mean_factor(schedule, total_steps: int, max_points: int = 10_000) -> float:
    """The mean LR factor of ``schedule`` over a run of ``total_steps``, as a fraction of its peak.

    What the LR finder needs to turn a constant-LR suggestion into a schedule's peak (see
    :func:`lrfuse.lr_range.suggest`): 1.0 for a constant LR, about 0.5 for cosine to 0 (with or
    without a short warm-up) and for one-cycle. Runs longer than ``max_points`` are sampled evenly.

    Args:
        schedule: any ``schedule(t) -> factor`` (a :class:`Schedule`, or a callable).
        total_steps: the run's length in the schedule's unit (steps, or epochs).

    Raises:
        ValueError: if ``total_steps`` is not a whole number >= 1 or the schedule's factors are all 0
            or not finite over the run.

    Examples:
        >>> round(mean_factor(make_schedule("cosine", total_steps=1000, warmup_steps=100), 1000), 2)
        0.5
    """
    total_steps = _length("total_steps", total_steps, 1)
    values = _sampled(schedule, total_steps, max_points)
    return sum(values) / len(values) / max(values)


def _sampled(schedule, total_steps: int, max_points: int) -> list[float]:
    """The factors over the run (sampled evenly past ``max_points``), checked finite, >= 0, not all 0."""
    n = min(total_steps, max_points)
    values = [float(schedule(i * total_steps / n if n < total_steps else i)) for i in range(n)]
    peak = max(values)
    if not (0 < peak < math.inf) or not all(math.isfinite(v) and v >= 0 for v in values):
        raise ValueError(f"the schedule's factors must be finite, >= 0 and not all 0 over {total_steps} steps; "
                         f"got a peak of {peak!r}")
    return values


def compress(schedule, total_steps: int, steps: int, max_points: int = 10_000):
    """``schedule``'s shape over a run of ``total_steps``, squeezed into ``steps`` and scaled to peak at 1:
    ``t -> schedule(t * total_steps / steps) / peak``. The LR finder's race trains each candidate
    under the run's own schedule this way (see :func:`lrfuse.lr_range.race_pick`).

    Raises:
        ValueError: as :func:`mean_factor`, or if ``steps`` is not a whole number >= 1.

    Examples:
        >>> f = compress(make_schedule("cosine", total_steps=1000, warmup_steps=100), 1000, 10)
        >>> [round(f(t), 2) for t in (0, 1, 5, 9)]
        [0.0, 1.0, 0.59, 0.03]
    """
    total_steps = _length("total_steps", total_steps, 1)
    steps = _length("steps", steps, 1)
    peak = max(_sampled(schedule, total_steps, max_points))
    return lambda t: float(schedule(t * total_steps / steps)) / peak


SCHEDULES = ("constant", "step", "multistep", "exponential", "cosine", "onecycle")


def make_schedule(name: str, *, total_steps: int | None = None, warmup_steps: int = 0,
                  warmup_start_factor: float = 0.0, step_size: int | None = None, gamma: float = 0.1,
                  milestones: Sequence[int] | None = None, factors: Sequence[float] | None = None,
                  min_factor: float = 0.0, restart_period: int | None = None, restart_mult: float = 1.0,
                  pct_start: float = 0.3, div_factor: float = 25.0, final_div_factor: float = 1e4) -> Schedule:
    """Build a schedule by name, wrapped in :class:`Warmup` when ``warmup_steps > 0``.

    ``total_steps`` counts the warm-up too: the inner schedule of ``cosine`` anneals over
    ``total_steps - warmup_steps``. ``onecycle`` has its own warm-up phase (``pct_start``) and
    refuses an extra one.

    Args:
        name: one of ``constant``, ``step``, ``multistep``, ``exponential``, ``cosine``, ``onecycle``.
        total_steps: length of the run, needed by ``cosine`` (without restarts) and ``onecycle``.
        warmup_steps, warmup_start_factor: see :class:`Warmup`.
        step_size, gamma: see :class:`StepDecay` / :class:`Exponential` / :class:`MultiStep`.
        milestones, factors: see :class:`MultiStep`.
        min_factor, restart_period, restart_mult: see :class:`Cosine`.
        pct_start, div_factor, final_div_factor: see :class:`OneCycle`.

    Raises:
        ValueError: on an unknown name, or a missing argument the schedule needs.
    """
    name = name.lower().replace("_", "").replace("-", "")
    aliases = {"steplr": "step", "cosineannealing": "cosine", "multisteplr": "multistep", "exp": "exponential"}
    name = aliases.get(name, name)
    if total_steps is not None:
        total_steps = _length("total_steps", total_steps, 1)
    warmup_steps = _length("warmup_steps", warmup_steps, 0)
    inner_steps = None if total_steps is None else total_steps - warmup_steps
    if name == "constant":
        inner: Schedule = Constant()
    elif name == "step":
        if step_size is None:
            raise ValueError("schedule 'step' needs step_size (steps between decays by gamma)")
        inner = StepDecay(step_size, gamma)
    elif name == "multistep":
        if not milestones:
            raise ValueError("schedule 'multistep' needs milestones, e.g. milestones=[400, 700]")
        inner = MultiStep([m - warmup_steps for m in milestones] if warmup_steps else milestones, gamma, factors)
    elif name == "exponential":
        inner = Exponential(gamma)
    elif name == "cosine":
        if restart_period is None and (inner_steps is None or inner_steps < 1):
            raise ValueError(
                f"schedule 'cosine' needs total_steps > warmup_steps (got total_steps={total_steps}, "
                f"warmup_steps={warmup_steps}), or restart_period for restarts")
        inner = Cosine(inner_steps, min_factor, restart_period, restart_mult)
    elif name == "onecycle":
        if warmup_steps:
            raise ValueError("schedule 'onecycle' warms up by itself (pct_start); set warmup_steps=0")
        if total_steps is None:
            raise ValueError("schedule 'onecycle' needs total_steps")
        return OneCycle(total_steps, pct_start, div_factor, final_div_factor)
    else:
        raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)} (or 'plateau' in LRSchedule)")
    return Warmup(inner, warmup_steps, warmup_start_factor) if warmup_steps else inner
