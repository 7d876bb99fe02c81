"""``LRSchedule``: set every group's LR from a schedule, each step or each epoch.

The math lives in :mod:`lrfuse.schedules`; this callback only reads the step count, multiplies
each group's base LR by the schedule's factor, and saves what a resumed run needs.
"""

from __future__ import annotations

import math
from typing import Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lrfuse import schedules
from lrfuse.groups import set_group_lr

__all__ = ["LRSchedule"]

_NAMES = (*schedules.SCHEDULES, "plateau")


class LRSchedule(Callback):
    """Drive the learning rate of every optimizer group from a schedule.

    Group ``g`` gets ``base_lr[g] * factor(t)``, where ``base_lr`` are the groups' LRs when
    training starts (after :class:`lrfuse.LRFinder`, if any, has applied its suggestion) and ``t``
    is the number of optimizer steps done (``interval="step"``) or epochs done
    (``interval="epoch"``). Ratios between groups (layer-wise decay) are kept. ``plateau`` reduces
    the factor when ``trainer.callback_metrics[monitor]`` stops improving, evaluated at each epoch
    end (or each step with ``interval="step"``). The base LRs, and the plateau state, are saved in
    checkpoints, so a resumed run continues with the same LRs.

    Args:
        schedule: ``constant``, ``step``, ``multistep``, ``exponential``, ``cosine``, ``onecycle``
            or ``plateau``.
        interval: ``"step"`` or ``"epoch"``: the unit of ``t`` and of every length below; default
            ``"epoch"`` for ``plateau`` (judged after each epoch's validation), else ``"step"``.
            A ``plateau`` with ``"step"`` is judged after every step: monitor a training metric then.
        warmup_steps: linear warm-up length (composable with every schedule but ``onecycle``).
        warmup_start_factor: factor at ``t = 0`` of the warm-up.
        total_steps: run length for ``cosine`` / ``onecycle``; default
            ``trainer.estimated_stepping_batches`` (step) or ``trainer.max_epochs`` (epoch).
        step_size: decay period of ``step``.
        gamma: decay multiplier of ``step``, ``multistep`` and ``exponential``.
        milestones: steps where ``multistep`` changes, counted from the start of the run.
        factors: explicit factors of the ``multistep`` pieces (``len(milestones) + 1``).
        min_factor: floor of ``cosine``.
        restart_period, restart_mult: ``cosine`` with warm restarts.
        pct_start, div_factor, final_div_factor: ``onecycle``.
        monitor, mode, factor, patience, min_delta, threshold_mode, cooldown: ``plateau``
            (torch's ``ReduceLROnPlateau`` semantics; see :class:`lrfuse.schedules.Plateau`).
        min_lr: floor of every group's LR (all schedules).
        strict: ``plateau`` raises when ``monitor`` is missing (else warns once and waits).

    Raises:
        ValueError: on an unknown schedule or interval, or arguments the schedule rejects.

    Examples:
        >>> Trainer(callbacks=[LRSchedule("cosine", warmup_steps=100)])  # doctest: +SKIP

        From the command line: ``--trainer.callbacks+=lrfuse.LRSchedule --trainer.callbacks.schedule=cosine``.
    """

    def __init__(self, schedule: Literal["constant", "step", "multistep", "exponential", "cosine", "onecycle",
                                         "plateau"] = "cosine",
                 interval: Literal["step", "epoch"] | None = None, warmup_steps: int = 0, warmup_start_factor: float = 0.0,
                 total_steps: int | None = None, step_size: int | None = None, gamma: float = 0.1,
                 milestones: list[int] | None = None, factors: list[float] | None = None, min_factor: float = 0.0,
                 restart_period: int | None = None, restart_mult: float = 1.0, pct_start: float = 0.3,
                 div_factor: float = 25.0, final_div_factor: float = 1e4, monitor: str = "val_loss",
                 mode: Literal["min", "max"] = "min", factor: float = 0.1, patience: int = 10,
                 min_delta: float = 0.0, threshold_mode: Literal["rel", "abs"] = "rel", cooldown: int = 0,
                 min_lr: float = 0.0, strict: bool = True) -> None:
        if schedule not in _NAMES:
            raise ValueError(f"LRSchedule: unknown schedule {schedule!r}; choose one of {', '.join(_NAMES)}")
        if interval is None:  # a plateau is judged once per epoch, after validation
            interval = "epoch" if schedule == "plateau" else "step"
        if interval not in ("step", "epoch"):
            raise ValueError(f"LRSchedule: interval must be 'step' or 'epoch', got {interval!r}")
        if min_lr < 0:
            raise ValueError(f"LRSchedule: min_lr must be >= 0, got {min_lr}")
        self.schedule, self.interval, self.min_lr, self.strict = schedule, interval, min_lr, strict
        self.monitor = monitor
        self._kwargs = dict(warmup_steps=warmup_steps, warmup_start_factor=warmup_start_factor, total_steps=total_steps,
                            step_size=step_size, gamma=gamma, milestones=milestones, factors=factors,
                            min_factor=min_factor, restart_period=restart_period, restart_mult=restart_mult,
                            pct_start=pct_start, div_factor=div_factor, final_div_factor=final_div_factor)
        self._fn: schedules.Schedule | None = None
        self.plateau: schedules.Plateau | None = None
        if schedule == "plateau":
            self.plateau = schedules.Plateau(mode, factor, patience, min_delta, threshold_mode, cooldown)
        else:
            self._check_now()
        self.base_lrs: list[list[float]] | None = None  # per optimizer, per group
        self._warned_missing = False

    def _check_now(self) -> None:
        """Build the schedule once with a placeholder length so that bad arguments fail at construction."""
        kwargs = dict(self._kwargs)
        if kwargs["total_steps"] is None:
            kwargs["total_steps"] = kwargs["warmup_steps"] + 2
        schedules.make_schedule(self.schedule, **kwargs)

    def _build(self, trainer: pl.Trainer) -> schedules.Schedule:
        kwargs = dict(self._kwargs)
        if self.schedule == "plateau":
            return schedules.Warmup(schedules.Constant(), kwargs["warmup_steps"], kwargs["warmup_start_factor"])
        if kwargs["total_steps"] is None and self.schedule in ("cosine", "onecycle"):
            total = trainer.estimated_stepping_batches if self.interval == "step" else trainer.max_epochs
            if total is None or total < 0 or not math.isfinite(total):
                raise ValueError(f"LRSchedule({self.schedule!r}) cannot infer total_steps from the trainer "
                                 "(max_steps / max_epochs unset); pass total_steps")
            kwargs["total_steps"] = int(total)
        return schedules.make_schedule(self.schedule, **kwargs)

    def factor_at(self, t: int) -> float:
        """The current factor at count ``t`` (the plateau scale included)."""
        assert self._fn is not None, "LRSchedule is not set up yet (it is set up when training starts)"
        value = self._fn(t)
        if self.plateau is not None:
            value *= self.plateau.scale
        return value

    def scale_base_lrs(self, ratio: float) -> None:
        """Multiply every group's base LR by ``ratio`` (the ratios between groups stay): a new peak
        for the schedule, e.g. when population-based training perturbs a resumed trial's LR. Applies
        from the next LR update; before training starts there is nothing to scale (the base LRs are
        read from the groups then).

        Raises:
            ValueError: if ``ratio`` is not a finite number > 0.
        """
        if not (math.isfinite(ratio) and ratio > 0):
            raise ValueError(f"LRSchedule.scale_base_lrs: ratio must be a finite number > 0, got {ratio}")
        if self.base_lrs is not None:
            self.base_lrs = [[base * ratio for base in bases] for bases in self.base_lrs]

    def _apply(self, trainer: pl.Trainer, t: int) -> None:
        value = self.factor_at(t)
        for optimizer, bases in zip(trainer.optimizers, self.base_lrs):
            for group, base in zip(optimizer.param_groups, bases):
                set_group_lr(group, max(base * value, self.min_lr))

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.lr_scheduler_configs:
            rank_zero_warn("LRSchedule: configure_optimizers also returned an LR scheduler; both will set the LR. "
                           "Remove one of them.")
        if self.base_lrs is None:  # a resumed run keeps the loaded ones
            self.base_lrs = [[float(g["lr"]) for g in opt.param_groups] for opt in trainer.optimizers]
        elif [len(b) for b in self.base_lrs] != [len(o.param_groups) for o in trainer.optimizers]:
            raise ValueError("LRSchedule: the checkpoint's base LRs do not match the optimizers' parameter groups; "
                             "resume with the same optimizers, or drop the callback state")
        self._fn = self._build(trainer)
        self._apply(trainer, trainer.global_step if self.interval == "step" else trainer.current_epoch)

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        if self.interval == "step":
            self._apply(trainer, trainer.global_step)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.interval == "epoch":
            self._apply(trainer, trainer.current_epoch)

    def _plateau_update(self, trainer: pl.Trainer, when_missing: str = "complain") -> None:
        # One collective, entered by every rank whatever it logged: (present, value) summed over
        # ranks. Deciding on presence rank by rank before a reduce hangs DDP when ranks disagree.
        value = trainer.callback_metrics.get(self.monitor)
        device = trainer.strategy.root_device
        local = torch.zeros(2, dtype=torch.float32 if device.type == "mps" else torch.float64, device=device)
        if value is not None:
            local[0], local[1] = 1.0, float(value)
        present, total = trainer.strategy.reduce(local, reduce_op="sum").tolist()
        if present == 0:
            if when_missing == "wait":
                return
            available = ", ".join(sorted(trainer.callback_metrics)) or "none yet"
            message = (f"LRSchedule(schedule='plateau') monitors {self.monitor!r}, which is not available. "
                       f"Pass monitor= one of the logged metrics ({available}), or log it with self.log.")
            if self.strict:
                raise ValueError(message)
            if not self._warned_missing:
                rank_zero_warn(message + " Waiting for it (strict=False).")
                self._warned_missing = True
            return
        self.plateau.update(total / present)  # the mean over the ranks that have it: the same everywhere

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self.plateau is not None and self.interval == "step":
            self._plateau_update(trainer, when_missing="wait")  # training metrics may start late

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.plateau is not None and self.interval == "epoch":
            self._plateau_update(trainer)
            self._apply(trainer, trainer.current_epoch + 1)

    @override
    def state_dict(self) -> dict:
        return {"base_lrs": self.base_lrs, "plateau": None if self.plateau is None else self.plateau.state_dict()}

    @override
    def load_state_dict(self, state_dict: dict) -> None:
        self.base_lrs = state_dict.get("base_lrs")
        if self.plateau is not None and state_dict.get("plateau") is not None:
            self.plateau.load_state_dict(state_dict["plateau"])
