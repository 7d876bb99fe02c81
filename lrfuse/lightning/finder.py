"""``LRFinder``: an LR range test at the start of fit, and :func:`find_lr` to run one on demand.

The callback is thin: the sweep and restore live in :mod:`lrfuse.lightning._sweep`, the curve
math in :mod:`lrfuse.lr_range`.
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import _TunerExitException
from typing_extensions import override

from lrfuse.groups import peak_lr, set_group_lr
from lrfuse.lightning._sweep import race, sweep
from lrfuse.lightning.runtime import LR_ATTRS, rng_state, set_rng_state
from lrfuse.lightning.schedule import LRSchedule
from lrfuse.lr_range import RACE_SHARE, LRRangeResult, check_args, race_candidates
from lrfuse.schedules import compress, mean_factor

ScheduleArg = Union[Literal["auto"], None, LRSchedule, Callable[[int], float]]

__all__ = ["LRFinder", "apply_lr", "find_lr"]

# Where torch's schedulers keep LRs that a schedule is computed from: per group (initial_lr; and
# OneCycleLR's max_lr / min_lr) and per scheduler (base_lrs, the last LRs; CyclicLR's max_lrs).
_GROUP_LR_KEYS = ("initial_lr", "max_lr", "min_lr")
_SCHEDULER_LR_LISTS = ("base_lrs", "_last_lr", "max_lrs")
_peak_lr = peak_lr  # the name this module used before the helpers moved to lrfuse.groups


@dataclass(frozen=True)
class RunSchedule:
    """The LR schedule of the run a suggestion is for: ``fn(t) -> factor`` over ``length`` of its
    units (steps or epochs), or a constant LR (``fn is None``)."""

    name: str
    fn: Callable[[float], float] | None = None
    length: int = 1

    def mean(self) -> float:
        """Its mean factor over its peak (:func:`lrfuse.schedules.mean_factor`); 1.0 for a constant LR."""
        return 1.0 if self.fn is None else mean_factor(self.fn, self.length)

    def compressed(self, steps: int) -> Callable[[int], float]:
        """Its shape squeezed into ``steps`` steps, peaking at 1 (:func:`lrfuse.schedules.compress`)."""
        return (lambda t: 1.0) if self.fn is None else compress(self.fn, self.length, steps)


CONSTANT = RunSchedule("constant LR")


def run_schedule(trainer: pl.Trainer, schedule: ScheduleArg, optimizer_idx: int = 0) -> RunSchedule:
    """The schedule the suggestion will be used with.

    ``schedule`` is ``"auto"`` (the first :class:`LRSchedule` callback of ``trainer``, else the torch
    LR scheduler that ``configure_optimizers`` attached to optimizer ``optimizer_idx``, else a
    constant LR), ``None`` (a constant LR), an :class:`LRSchedule` (over its ``total_steps``, else
    the trainer's run), or any ``t -> factor`` (e.g. :func:`lrfuse.schedules.make_schedule`) over
    ``trainer.estimated_stepping_batches`` steps.
    An unknown run length (no ``max_steps`` / ``max_epochs``) gives a constant LR with a warning.
    """
    if schedule == "auto":
        schedule = next((cb for cb in trainer.callbacks if isinstance(cb, LRSchedule)), None)
        if schedule is None:
            return _torch_scheduler(trainer, optimizer_idx)
    if schedule is None:
        return CONSTANT
    if isinstance(schedule, LRSchedule):
        fn = schedule._build(trainer)
        length = schedule._kwargs["total_steps"] or (
            trainer.estimated_stepping_batches if schedule.interval == "step" else trainer.max_epochs)
        name = f"LRSchedule({schedule.schedule!r})"
    else:
        fn, length, name = schedule, trainer.estimated_stepping_batches, repr(schedule)
    if not _known_length(length):
        rank_zero_warn(f"LRFinder: the run's length is unknown (set max_steps or max_epochs), so {name} cannot be "
                       "followed; suggesting for a constant LR")
        return CONSTANT
    return RunSchedule(name, fn, int(length))


def _known_length(length) -> bool:
    return length is not None and math.isfinite(length) and length >= 1


# Longest torch scheduler run the finder simulates (a step of a scheduler costs ~10-50 us).
_MAX_SIMULATED_STEPS = 200_000


def _torch_scheduler(trainer: pl.Trainer, optimizer_idx: int) -> RunSchedule:
    """The first torch LR scheduler of optimizer ``optimizer_idx`` over the run (a constant LR
    without one), its factors from a copy of it stepped on a stand-in optimizer: one
    tensor per group and copies of the groups' other keys, so the real optimizer, its LRs and the
    scheduler are untouched. A scheduler that follows a metric (ReduceLROnPlateau) cannot be
    foreseen and counts as a constant LR."""
    optimizers = trainer.optimizers
    optimizer = optimizers[optimizer_idx] if optimizer_idx < len(optimizers) else None
    config = next((c for c in trainer.lr_scheduler_configs
                   if optimizer is not None and getattr(c.scheduler, "optimizer", None) is optimizer), None)
    if config is None:
        return CONSTANT
    scheduler = config.scheduler
    name = type(scheduler).__name__
    if config.reduce_on_plateau:
        rank_zero_info(f"LRFinder: {name} follows a metric and cannot be foreseen; suggesting for a constant LR "
                       "(pass schedule= to say what the LR will do)")
        return CONSTANT
    length = trainer.estimated_stepping_batches if config.interval == "step" else trainer.max_epochs
    if not _known_length(length) or length / config.frequency > _MAX_SIMULATED_STEPS:
        rank_zero_warn(f"LRFinder: the run's length in {config.interval}s is {length}, so {name} cannot be averaged; "
                       "suggesting for a constant LR (set max_steps or max_epochs, or pass schedule=)")
        return CONSTANT
    steps = math.ceil(length / config.frequency)
    try:
        stand_in = torch.optim.SGD([{**copy.deepcopy({k: v for k, v in g.items() if k != "params"}),
                                     "params": [torch.zeros(())]} for g in optimizer.param_groups])
        simulated = copy.deepcopy(scheduler, memo={id(optimizer): stand_in})
        lrs = [[float(g["lr"]) for g in stand_in.param_groups]]
        with warnings.catch_warnings():  # it is stepped without optimizer steps, on purpose
            warnings.simplefilter("ignore")
            for _ in range(steps - 1):
                simulated.step()
                lrs.append([float(g["lr"]) for g in stand_in.param_groups])
    except Exception as error:  # a scheduler that cannot be copied or stepped alone
        rank_zero_warn(f"LRFinder: could not simulate {name} ({type(error).__name__}: {error}); suggesting for a "
                       "constant LR (pass schedule= to say what the LR will do)")
        return CONSTANT
    # The group with the largest peak, as apply_lr's reference.
    group = max(range(len(lrs[0])), key=lambda i: max(row[i] for row in lrs))
    values = [row[group] for row in lrs]
    return RunSchedule(f"{name} (torch, per {config.interval})", lambda t: values[int(t)], steps)


def apply_lr(trainer: pl.Trainer | None, model: pl.LightningModule, lr: float, reference: float | None = None,
             attr_name: str | None = None, optimizer_idx: int = 0) -> list[str]:
    """Apply ``lr`` to the optimizer, its schedulers and the model.

    ``lr`` becomes the peak LR of the reference group (the group with the largest peak): its LR, or
    with a torch LR scheduler the LR the schedule is built from (``initial_lr``; OneCycleLR's
    ``max_lr``), so a warm-up or one-cycle schedule peaks at the suggestion rather than starting
    from it. The optimizer's whole LR system is scaled by ``lr / reference``: every group's LR (so
    the ratios between groups stay), the per-group values schedulers compute from (``initial_lr``,
    ``max_lr``, ``min_lr``) and the ``base_lrs`` / last LRs / ``max_lrs`` of torch LR schedulers
    attached to it, so a schedule continues from the new LR. The model gets ``lr`` in
    ``attr_name`` when given, else in ``model.lr`` / ``model.learning_rate`` and
    ``model.hparams.lr`` / ``learning_rate`` where present, so that ``configure_optimizers`` of a
    later fit uses it too.

    Args:
        reference: the reference LR that ``lr`` replaces; default: the largest peak of the groups.

    Returns:
        Where the value went (for messages), e.g. ``["optimizer 0 (3 groups)", "model.lr"]``.

    Raises:
        AttributeError: if ``attr_name`` names an attribute the model does not have.
    """
    places = []
    if attr_name and not (hasattr(model, attr_name) or attr_name in getattr(model, "hparams", {})):
        raise AttributeError(f"LRFinder(attr_name={attr_name!r}): the model has no attribute or hparam "
                             f"{attr_name!r}; use one of its attributes, or leave attr_name=None")
    optimizer = trainer.optimizers[optimizer_idx] if trainer is not None and trainer.optimizers else None
    if optimizer is not None:
        reference = reference or max(_peak_lr(g) for g in optimizer.param_groups)
    if optimizer is not None and reference:  # groups whose LRs are all 0 have nothing to scale
        ratio = lr / reference
        for group in optimizer.param_groups:
            set_group_lr(group, float(group["lr"]) * ratio)
            for key in _GROUP_LR_KEYS:
                if key in group:
                    group[key] = float(group[key]) * ratio
        for cfg in trainer.lr_scheduler_configs:
            scheduler = cfg.scheduler
            if getattr(scheduler, "optimizer", None) is optimizer:
                for name in _SCHEDULER_LR_LISTS:
                    values = getattr(scheduler, name, None)
                    if isinstance(values, list):
                        setattr(scheduler, name, [float(v) * ratio for v in values])
        n = len(optimizer.param_groups)
        places.append(f"optimizer {optimizer_idx} ({n} group{'s' if n != 1 else ''})")
    names = [attr_name] if attr_name else list(LR_ATTRS)
    for name in names:
        if name in vars(model) or isinstance(getattr(type(model), name, None), property):
            setattr(model, name, lr)
            places.append(f"model.{name}")
        hparams = getattr(model, "hparams", None)
        if hparams is not None and name in hparams:
            hparams[name] = lr
            places.append(f"model.hparams.{name}")
    return places


class LRFinder(Callback):
    """Find a learning rate at the start of ``fit`` (a range test, then a race), then train with it.

    The range test: the LR rises from ``min_lr`` to ``max_lr`` over ``num_steps`` training steps
    (one batch each); the loss is recorded and smoothed without lag, which locates the *edge*, the
    LR where the loss stops falling (:mod:`lrfuse.lr_range`). The race (``race=True``, the default):
    four LRs from 3x above the edge to 10x below each train for a fifth of the run (``race_steps``)
    from the same weights and batch order, under the run's own LR schedule squeezed into those steps,
    and the held-out loss picks (:func:`lrfuse.lr_range.race_pick`). On tasks the rules were not
    tuned on it cut the worst gap to a grid search's best from 44 to 13 points
    (``benchmarks/README.md``); it costs 0.8x the run on top of the sweep, and needs the run's
    length (``max_steps`` / ``max_epochs``).
    ``race=False``: the curve's suggestion alone (``method``).

    Every parameter group's LR is its base LR times one common factor, so layer-wise ratios
    survive; the suggestion is applied the same way, as the peak of a torch LR schedule
    (:func:`apply_lr`). Afterwards the weights and buffers (bit for bit), ``requires_grad``,
    optimizer state, LR schedulers, the GradScaler, the RNGs, the training loaders (their
    generators, a persistent worker's iterator) and trainer counters are as before, also when the
    sweep raises: training continues exactly as a run started at the applied LRs (tested bit for
    bit). Nothing is written to disk except the optional plot.

    The suggestion knows the schedule it will be used with: an :class:`LRSchedule` callback in the
    same trainer, a torch LR scheduler from ``configure_optimizers`` (simulated on a copy), or
    ``schedule=``. The race trains under that schedule; the curve alone divides its constant-LR
    pick by the schedule's mean factor (:func:`lrfuse.schedules.mean_factor`: about 0.5 for
    warm-up + cosine or one-cycle), never past the edge. Either way the suggestion is the schedule's
    *peak* LR.

    The result is kept in :attr:`result` (an :class:`~lrfuse.lr_range.LRRangeResult`); when no
    suggestion can be made the LR is left alone and a warning says why. Under DDP the loss is
    averaged over ranks and every rank takes the same decisions. The sweep is skipped when fit
    resumes past step 0 (a checkpoint's LR is kept).

    Args:
        min_lr, max_lr: the range swept (for the group with the largest base LR).
        num_steps: steps of the sweep (at most; it stops early on divergence).
        mode: ``"exponential"`` (default) or ``"linear"`` spacing of the LRs.
        method: suggestion method: ``auto``, ``steepest``, ``valley`` or ``min10``.
        diverge_factor: stop when the smoothed loss exceeds this multiple of the best.
        bandwidth: smoothing width, a fraction of the number of points, in (0, 0.5].
        schedule: the LR schedule the suggestion is the peak of: ``"auto"`` (default: the trainer's
            :class:`LRSchedule` callback, else the optimizer's torch LR scheduler, else a constant LR), ``None`` (constant LR), an
            :class:`LRSchedule`, or a ``t -> factor`` callable over the run's steps.
        apply: apply the suggestion to the optimizer and the model's LR attribute.
        attr_name: the model attribute / hparam that holds the LR (default: ``lr`` or ``learning_rate``).
        optimizer_idx: which optimizer to sweep.
        plot_path: write the plot (matplotlib) to this file; loggers that take images get it too.
        verbose: print the suggestion and show the sweep's progress (rank 0).
        race: after the range test, race candidates around the curve's edge for a fifth of the run
            each, under the run's schedule, and suggest from their held-out losses (see
            :mod:`lrfuse.lr_range`); ``False``: the curve's suggestion alone (``method``).
        race_steps: steps of each candidate (default: a fifth of the run; needed when the run's
            length is unknown). Held-out loss: ``training_step``'s loss in eval mode on up to 32
            batches of the validation loaders, or the next training batches without any.

    Raises:
        ValueError: on invalid arguments (at construction) and when the model cannot be swept.

    Examples:
        >>> trainer = Trainer(callbacks=[lrfuse.LRFinder(max_lr=1.0, plot_path="lr.png")])  # doctest: +SKIP
        >>> trainer.fit(model, datamodule)  # trains with the suggested LR  # doctest: +SKIP

        From the command line: ``--trainer.callbacks+=lrfuse.LRFinder --trainer.callbacks.num_steps=80``.
    """

    def __init__(self, min_lr: float = 1e-7, max_lr: float = 1.0, num_steps: int = 100,
                 mode: Literal["exponential", "linear"] = "exponential",
                 method: Literal["auto", "steepest", "valley", "min10"] = "auto", diverge_factor: float = 4.0,
                 bandwidth: float = 0.05, schedule: ScheduleArg = "auto", apply: bool = True, attr_name: str | None = None, optimizer_idx: int = 0,
                 plot_path: str | None = None, verbose: bool = False, race: bool = True,
                 race_steps: int | None = None) -> None:
        check_args("LRFinder", min_lr=min_lr, max_lr=max_lr, num_steps=num_steps, mode=mode, method=method,
                   diverge_factor=diverge_factor, bandwidth=bandwidth)
        if race_steps is not None and (isinstance(race_steps, bool) or not isinstance(race_steps, int) or race_steps < 1):
            raise ValueError(f"LRFinder: race_steps must be an integer >= 1 or None (a fifth of the run), got "
                             f"{race_steps!r}")
        self.race, self.race_steps = bool(race), race_steps
        if not (schedule == "auto" or schedule is None or callable(schedule)):
            raise ValueError(f"LRFinder: schedule must be 'auto', None, an LRSchedule or a t -> factor callable, got "
                             f"{schedule!r}; pass e.g. schedule=lrfuse.schedules.make_schedule('cosine', total_steps=...)")
        self.schedule = schedule
        self.min_lr, self.max_lr, self.num_steps, self.mode = min_lr, max_lr, num_steps, mode
        self.method, self.diverge_factor, self.bandwidth = method, diverge_factor, bandwidth
        self.apply, self.attr_name, self.optimizer_idx = apply, attr_name, optimizer_idx
        self.plot_path, self.verbose = plot_path, verbose
        self.result: LRRangeResult | None = None
        self._exit_after = False  # set by find_lr: stop fit once the sweep is done

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.fast_dev_run:
            rank_zero_info("LRFinder: skipped under fast_dev_run")
            return
        if trainer.global_step > 0 and not self._exit_after:
            rank_zero_info("LRFinder: fit resumes at step > 0; keeping the checkpoint's learning rate")
            return
        self.run(trainer, pl_module)
        if self._exit_after:
            raise _TunerExitException()

    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> LRRangeResult:
        """Run the range test now (the trainer must be set up, e.g. inside ``on_fit_start``)."""
        if self.apply and self.attr_name and not (
                hasattr(pl_module, self.attr_name) or self.attr_name in getattr(pl_module, "hparams", {})):
            raise AttributeError(f"LRFinder(attr_name={self.attr_name!r}): the model has no attribute or hparam "
                                 f"{self.attr_name!r}; use one of its attributes, or leave attr_name=None")
        bar = self._progress_bar(trainer)
        progress = None
        if bar is not None:
            def progress(i: int, lr: float, loss: float) -> None:
                bar.update(1)
                bar.set_postfix(lr=f"{lr:.2e}", loss=f"{loss:.4g}", refresh=False)
        run = run_schedule(trainer, self.schedule, self.optimizer_idx)
        schedule_name = run.name
        try:
            result = sweep(
                trainer, pl_module, optimizer_idx=self.optimizer_idx, min_lr=self.min_lr, max_lr=self.max_lr,
                num_steps=self.num_steps, mode=self.mode, diverge_factor=self.diverge_factor, method=self.method,
                bandwidth=self.bandwidth, schedule_mean=run.mean(), progress=progress)
        finally:
            if bar is not None:
                bar.close()
        if self.race and result.ok:
            result = self._race(trainer, pl_module, result, run)
        self.result = result
        if result.lr is None:
            rank_zero_warn(f"LRFinder: {result.reason}. The learning rate is left unchanged.")
        elif self.apply:
            places = apply_lr(trainer, pl_module, result.lr, None, self.attr_name, self.optimizer_idx)
            if self.verbose:
                rank_zero_info(f"LRFinder: {result.summary()} ({schedule_name}); applied to {', '.join(places)}")
        if self.plot_path is not None and trainer.is_global_zero:
            self._plot(trainer, result)
        return result

    def _race(self, trainer: pl.Trainer, pl_module: pl.LightningModule, result: LRRangeResult,
              run: RunSchedule) -> LRRangeResult:
        """Race the candidates around the curve's edge (:func:`lrfuse.lr_range.race_candidates`)."""
        total = trainer.estimated_stepping_batches
        steps = self.race_steps or (max(1, round(RACE_SHARE * total)) if _known_length(total) else None)
        if steps is None:
            rank_zero_info("LRFinder: the run's length is unknown (set max_steps or max_epochs, or race_steps), so "
                           "no race: the suggestion is the curve's")
            return result
        lrs = race_candidates(result)
        losses = race(trainer, pl_module, lrs, steps=steps, optimizer_idx=self.optimizer_idx,
                      factor=run.compressed(steps))
        raced = result.with_race(lrs, losses, steps)
        if raced.method != "race":
            rank_zero_warn("LRFinder: no raced LR finished with a finite held-out loss; the suggestion is the curve's")
        return raced

    def _progress_bar(self, trainer: pl.Trainer):
        if not (self.verbose and trainer.is_global_zero):
            return None
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return None
        return tqdm(total=self.num_steps, desc="LR range test", leave=False, dynamic_ncols=True)

    def _plot(self, trainer: pl.Trainer, result: LRRangeResult) -> None:
        try:
            fig = result.plot(self.plot_path)
        except ImportError as error:
            rank_zero_warn(f"LRFinder: no plot ({error})")
            return
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_figure"):  # TensorBoard
                experiment.add_figure("lr_finder", fig, global_step=trainer.global_step)
            elif hasattr(logger, "log_image"):  # W&B, Neptune, Comet ...
                logger.log_image(key="lr_finder", images=[os.fspath(self.plot_path)])
        import matplotlib.pyplot as plt
        plt.close(fig)

    @override
    def state_dict(self) -> dict:
        if self.result is None:
            return {}
        return {"lr": self.result.lr, "low": self.result.low, "high": self.result.high, "method": self.result.method,
                "reason": self.result.reason, "schedule_mean": self.result.schedule_mean,
                "constant_lr": self.result.constant_lr, "race": self.result.race}


def find_lr(trainer: pl.Trainer, model: pl.LightningModule, train_dataloaders=None, val_dataloaders=None,
            datamodule: pl.LightningDataModule | None = None, **finder_kwargs) -> LRRangeResult:
    """Run an LR range test on demand (without training) and return its result.

    Sets up ``trainer`` for fit, sweeps, restores everything, applies the suggestion to the model's
    LR attribute (``apply=True``) so that the next ``trainer.fit`` trains with it, and stops.

    Args:
        trainer: a trainer that has not started fitting this model.
        model: the LightningModule.
        train_dataloaders, val_dataloaders, datamodule: as for ``trainer.fit``.
        finder_kwargs: arguments of :class:`LRFinder`.

    Raises:
        ValueError: if ``trainer`` already holds an :class:`LRFinder` callback (it would sweep twice),
            and as :class:`LRFinder`.

    Examples:
        >>> result = find_lr(Trainer(max_epochs=5), model, datamodule=dm)  # doctest: +SKIP
        >>> print(result.summary()); result.plot("lr.png")  # doctest: +SKIP
    """
    if any(isinstance(cb, LRFinder) for cb in trainer.callbacks):
        raise ValueError("find_lr: the trainer already has an LRFinder callback; remove it or just call trainer.fit")
    finder = LRFinder(**finder_kwargs)
    finder._exit_after = True
    trainer.callbacks.append(finder)
    # The fit started here sets up loaders that the next fit sets up again: what their creation
    # drew from the RNG is undone with the rest.
    rng = rng_state()
    try:
        trainer.fit(model, train_dataloaders, val_dataloaders, datamodule)
    finally:
        trainer.callbacks.remove(finder)
        set_rng_state(rng)
    assert finder.result is not None
    return finder.result
