"""``LRHealthMonitor``: is the learning rate of each parameter group too high or too low?

The callback measures (each group's update-to-weight ratio over one step, the training loss averaged
over ranks), logs and keeps state; the verdicts are :class:`lrfuse.lr_health.HealthRules`'.
"""

from __future__ import annotations

import copy
import math
from collections import deque
from collections.abc import Sequence

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lrfuse.groups import group_labels
from lrfuse.lr_health import OK, TOO_HIGH, TOO_LOW, HealthRules
from lrfuse.optim._base import _FusedStep
from lrfuse.optim._cache import DTensor

__all__ = ["LRHealthMonitor", "group_keys", "group_metric_names"]

_CODE = {OK: 0.0, TOO_HIGH: 1.0, TOO_LOW: -1.0}
PREFIX = "lr_health"  # not Lightning's LearningRateMonitor's "lr-": both can log side by side
HISTORY = 100  # update ratios kept per group (the rules read the last `patience`)


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
    training loss (mean over ranks), applies :class:`~lrfuse.lr_health.HealthRules`, logs to every logger
    ``lr_health/<key>/lr``, ``lr_health/<key>/update_ratio``, ``lr_health/<key>/grad_norm`` (of the
    gradients the step used) and ``lr_health/<key>/verdict`` (+1 too high, 0 ok, -1 too low), and ``lr_health/train_loss`` (the mean training loss since the
    last check, which the rules read), and warns once each time a group's verdict turns bad. ``key``
    is the group's (:func:`group_keys`): ``FusedAdam/pg1``, or ``FusedAdam-1/pg1`` with several
    optimizers; the ``lr_health/`` prefix keeps these apart from Lightning's ``LearningRateMonitor``
    (``lr-FusedAdam/pg1``). The verdicts are in :attr:`status` (key -> ``ok`` / ``too_high`` /
    ``too_low``) and :attr:`reasons`; :attr:`ratios` keeps each group's last 100 update ratios.
    Verdicts, ratios and the loss history are saved in checkpoints (``state_dict``), so a resumed
    run judges as the uninterrupted one would.

    Args:
        every_n_steps: check period in optimizer steps. lrfuse's optimizers measure a check's
            step in the kernel's own pass (under FSDP2 too: the shards' sums are all-reduced); any
            other optimizer's weights are copied once per check.
        rules: the thresholds (:class:`~lrfuse.lr_health.HealthRules`; default: its defaults). From
            the command line: ``--trainer.callbacks.rules.high_ratio 0.2``.
        warn: warn when a verdict turns bad.

    Raises:
        ValueError: if ``every_n_steps < 1``.

    Examples:
        >>> Trainer(callbacks=[lrfuse.LRHealthMonitor(every_n_steps=50)])  # doctest: +SKIP
    """

    def __init__(self, every_n_steps: int = 10, rules: HealthRules | None = None, warn: bool = True) -> None:
        if every_n_steps < 1:
            raise ValueError(f"LRHealthMonitor: every_n_steps must be >= 1, got {every_n_steps}")
        if rules is not None and not isinstance(rules, HealthRules):
            raise ValueError(f"LRHealthMonitor: rules must be a lrfuse.lr_health.HealthRules, got {type(rules).__name__}; "
                             "pass e.g. rules=HealthRules(high_ratio=0.2)")
        self.every_n_steps, self.warn = every_n_steps, warn
        self.rules = copy.deepcopy(rules) if rules is not None else HealthRules()  # it keeps this run's history
        self._history = max(HISTORY, self.rules.patience)
        self.status: dict[str, str] = {}
        self.reasons: dict[str, str] = {}
        self.ratios: dict[str, deque[float]] = {}
        self._before: list[_Copies | _KernelStats] | None = None  # per optimizer, at a due check
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
        self._before = [(_KernelStats if _KernelStats.serves(opt) else _Copies)(opt) for opt in trainer.optimizers]

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
        # The largest LR over the groups: an explosion is forgiven once it is halved.
        self.rules.add_loss(mean, max((float(g["lr"]) for opt in trainer.optimizers for g in opt.param_groups), default=None))
        stats[f"{PREFIX}/train_loss"] = mean  # what the rules judged: the mean since the last check
        for opt, keys, measure in zip(trainer.optimizers, group_keys(trainer.optimizers), before):
            for group, key, (ratio, grad_norm) in zip(opt.param_groups, keys, measure.figures(opt)):
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
                stats[f"{PREFIX}/{key}/grad_norm"] = grad_norm
                stats[f"{PREFIX}/{key}/verdict"] = _CODE[status]
        for logger in trainer.loggers:
            logger.log_metrics(stats, step=trainer.global_step)


def _ratio(delta: float, norm: float) -> float:
    """``delta / norm``; inf when the weights were all zero and moved."""
    return delta / norm if norm > 0 else (0.0 if delta == 0 else math.inf)


class _Copies:
    """A check's measurement for any optimizer: each group's weights copied before the step, then
    ``||new - old|| / ||old||`` over the group's tensors that have gradients (nan for none), and the
    norm of those gradients as the step left them (unscaled and clipped, as it used them)."""

    def __init__(self, opt: torch.optim.Optimizer) -> None:
        with torch.no_grad():
            self.old = [[p.detach().clone() for p in g["params"] if p.grad is not None] for g in opt.param_groups]

    def figures(self, opt: torch.optim.Optimizer) -> list[tuple[float, float]]:
        out = []
        for group, old in zip(opt.param_groups, self.old):
            new = [p for p in group["params"] if p.grad is not None]
            if not old or len(old) != len(new):
                out.append((float("nan"), float("nan")))
                continue
            with torch.no_grad():
                delta = math.sqrt(sum(float((n.detach().float() - o.float()).pow(2).sum()) for o, n in zip(old, new)))
                norm = math.sqrt(sum(float(o.float().pow(2).sum()) for o in old))
                grad = math.sqrt(sum(float(p.grad.detach().float().pow(2).sum()) for p in new))
            out.append((_ratio(delta, norm), grad))
        return out


class _KernelStats:
    """A check's measurement for lrfuse's optimizers: the step measures itself in the kernel's pass
    (``track_stats``, on for that step only), with no copy of the weights and no second pass.

    Under FSDP2 the kernel's sums cover each rank's shards; they are all-reduced over the mesh
    dims the parameters are sharded on, so the figures are the whole model's. Parameters whose
    sums cannot be added up that way (plain tensors beside DTensors, or DTensors sharded on
    different mesh dims, as tensor parallelism's replicated biases) take the copies."""

    @staticmethod
    def serves(opt: torch.optim.Optimizer) -> bool:
        return isinstance(opt, _FusedStep) and _shard_dims(opt) is not None

    def __init__(self, opt: torch.optim.Optimizer) -> None:
        self.was, opt.track_stats = opt.track_stats, True

    def figures(self, opt: torch.optim.Optimizer) -> list[tuple[float, float]]:
        table = opt.group_stats_tensor()  # columns: update, param and grad norms, nonfinite, ratio
        opt.track_stats = self.was
        sums = table[:, :3].square()
        mesh, dims = _shard_dims(opt)
        for dim in dims:
            torch.distributed.all_reduce(sums, group=mesh.get_group(dim))
        update, param, grad = sums.sqrt().T.tolist()
        return [(_ratio(u, w), g) if any(p.grad is not None for p in group["params"]) else (float("nan"), float("nan"))
                for group, u, w, g in zip(opt.param_groups, update, param, grad)]


def _shard_dims(opt: torch.optim.Optimizer) -> tuple[object, tuple[int, ...]] | None:
    """(mesh, the mesh dims every parameter is sharded on) when each group's sums are the whole
    model's once summed over those dims: no DTensor at all (``(None, ())``), or every parameter a
    DTensor on one mesh, sharded on the same dims and replicated on the others. Else None."""
    params = [p for g in opt.param_groups for p in g["params"]]
    if not any(isinstance(p, DTensor) for p in params):
        return None, ()
    if not all(isinstance(p, DTensor) for p in params):
        return None
    mesh = params[0].device_mesh
    layouts = {tuple(pl.is_shard() for pl in p.placements) for p in params}
    if len(layouts) != 1 or any(p.device_mesh != mesh for p in params) or any(
            not (pl.is_shard() or pl.is_replicate()) for p in params for pl in p.placements):
        return None
    (sharded,) = layouts
    return mesh, tuple(d for d, shard in enumerate(sharded) if shard)
