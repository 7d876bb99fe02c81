"""LR search on Ray Tune: :func:`search_lr` with ``method="grid" | "random" | "race" | "pbt"``.

Each trial trains the user's LightningModule with a real ``Trainer`` at one learning rate: the
optimizer the model configures is scaled by ``lr / peak`` with :func:`lrfuse.lightning.finder.apply_lr`
(every group, so the ratios between groups stay). The trial's ``_TrialReporter`` callback reports the
validation metric to Tune at every validation (every ``eval_every`` steps) with a checkpoint written
through Tune's storage, so PBT can copy weights and a failed trial resumes (``max_failures``). A
non-finite training loss stops the trial and is reported as diverged; the search goes on.

- ``grid``: ``trials`` LRs log-spaced over the range, each trained for the whole budget.
- ``random``: ``trials`` LRs drawn log-uniformly (seeded), each trained for the whole budget.
- ``race``: the grid's LRs race in lockstep: at each rung (``grace_period`` reports, then times
  ``reduction_factor``) every trial still in the race has reported, the best ``1 / reduction_factor``
  by validation metric go on and the others stop (successive halving, :class:`_Race`). Comparing
  at the same step from the same start is what makes it the "fastest learning rate" method;
  Tune's asynchronous ASHA would compare trials against whoever reached a rung first.
- ``pbt``: a population of ``trials`` (random LRs); at every ``perturbation_interval`` reports the
  worst quarter copies the weights of the best quarter and perturbs its LR (Tune's PBT in its
  synchronous mode, :func:`_pbt_scheduler`: every trial reaches the perturbation point before
  anything is decided, and the draws come from a generator seeded by ``seed``, so the same call
  gives the same trials, LRs and values whatever the timing).

Every trial starts from the same initial weights and the same data order (the model instance is
shipped once, or the factory is called after seeding; the RNG is seeded before fit), and keeps it
for the whole run: a trial paused at a race rung, retried, or resumed after Ctrl-C
(``resume=True``) continues with exactly the batches and RNG draws of an uninterrupted run
(:class:`_ExactLoader`). Each trial reports a checksum of its initial weights and of the batches of
its first evaluation interval; with ``audit=True`` also a hash chained over every batch and the
weights' checksum at every report, so this is checked, not assumed. Under PBT a trial's new LR
reaches its optimizer, torch schedulers and :class:`~lrfuse.LRSchedule` callbacks alike. The range defaults to the plausible range of the LR finder, run
first (:func:`lrfuse.lightning.finder.find_lr`). Verdicts (too high / too low / ok) come from an
:class:`~lrfuse.lightning.health.LRHealthMonitor` attached to every trial.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lrfuse.lightning.finder import apply_lr, find_lr
from lrfuse.lightning.health import LRHealthMonitor, OK, TOO_HIGH, TOO_LOW
from lrfuse.lightning.schedule import LRSchedule

__all__ = ["METHODS", "LRSearchResult", "TrialRecord", "search_lr"]

METHODS = ("grid", "random", "race", "pbt")
_CKPT = "model.ckpt"
_META = "lrfuse_search.json"  # the search's own settings, in the experiment folder (for resume)
# The race's state lives beside Tune's folder, not in it: on a resume Tune copies its folder to a
# staging folder and syncs that back over it, which would put the interrupted run's state back.
_RACE_STATE = os.path.join(".lrfuse", "{name}", "race.json")
# Trainer arguments the search decides for every trial (budget, evaluation period, no own
# checkpoints or loggers: Tune keeps both).
# A trial's report that ends the search with this error (the metric is not logged).
_ERROR = "lrfuse_error"
# What each entry of a trial's ``reports`` holds, beside the metric.
_REPORTED = ("step", "train_loss", "lr", "trial_lr", "data_chain", "weights_checksum")
_FORCED = dict(enable_checkpointing=False, logger=False, enable_progress_bar=False, enable_model_summary=False,
               num_sanity_val_steps=0, check_val_every_n_epoch=None, max_epochs=-1, max_time=None)


# ----------------------------------------------------------------------------- one trial

def _digest(obj: Any, h) -> None:
    if isinstance(obj, torch.Tensor):
        h.update(obj.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            _digest(item, h)
    elif isinstance(obj, dict):
        for key in sorted(obj, key=str):
            _digest(obj[key], h)
    else:
        h.update(repr(obj).encode())


def checksum(obj: Any) -> str:
    """A short sha256 of tensors (bit for bit), nested lists / tuples / dicts of them, or reprs."""
    h = hashlib.sha256()
    _digest(obj, h)
    return h.hexdigest()[:16]


def _global_rng() -> dict:
    """The global RNG states (torch, CUDA, numpy, Python), in types a checkpoint loads with weights_only."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
             "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_global_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def _generators(loader: Any) -> list[torch.Generator]:
    """The torch generators a loader draws its order from (its own, its samplers'), in a fixed order."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    owners = (loader, getattr(loader, "sampler", None), batch_sampler, getattr(batch_sampler, "sampler", None))
    found: list[torch.Generator] = []
    for owner in owners:
        g = getattr(owner, "generator", None)
        if isinstance(g, torch.Generator) and all(g is not f for f in found):
            found.append(g)
    return found


class _ExactLoader:
    """A trial's training loader that resumes at the very batch, RNG draws included.

    A race trial pauses at every rung and a retried trial restarts: both resume from a checkpoint
    in the middle of an epoch, and a plain loader would start the epoch over, in a new order. This
    wrapper is what Lightning sees (it saves a loader's ``state_dict`` in the checkpoint and hands
    it back before the resumed run's first batch). It records the RNG states (global torch / CUDA /
    numpy / Python, and the loader's own generators) at the start of each epoch. On resume it puts
    them back, iterates the inner loader again and skips the batches already trained on, so the
    sampler draws the same order; then, after as many batches as Lightning's fetcher had taken at
    the checkpoint, it restores the global RNGs of the checkpoint, so dropout and augmentations
    draw as in an uninterrupted run. The inner loader is iterated lazily (at the first batch), the
    same way in both runs. ``trained`` is counted by :class:`_TrialReporter`.
    """

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self.trained = 0  # batches of this epoch trained on
        self.served = 0  # batches of this epoch handed to Lightning (its fetcher may be one ahead)
        self._epoch_start: dict | None = None
        self._pending: dict | None = None

    def __len__(self) -> int:
        return len(self.loader)

    # What Lightning reads or sets on a loader: samplers (set_epoch), the worker seeding function.
    @property
    def sampler(self):
        return getattr(self.loader, "sampler", None)

    @property
    def batch_sampler(self):
        return getattr(self.loader, "batch_sampler", None)

    @property
    def worker_init_fn(self):
        return getattr(self.loader, "worker_init_fn", None)

    @worker_init_fn.setter
    def worker_init_fn(self, fn) -> None:
        self.loader.worker_init_fn = fn

    def _states(self) -> dict:
        return {"global": _global_rng(), "generators": [g.get_state() for g in _generators(self.loader)]}

    def _restore(self, states: dict) -> None:
        _set_global_rng(states["global"])
        generators = _generators(self.loader)
        if len(generators) != len(states["generators"]):
            raise RuntimeError("search_lr: the training loader has a different number of generators than when the trial's "
                               "checkpoint was saved; build train_dataloader() the same way every time")
        for g, state in zip(generators, states["generators"]):
            g.set_state(state)

    def state_dict(self) -> dict:
        return {"epoch_start": self._epoch_start, "trained": self.trained, "served": self.served, "now": self._states()}

    def load_state_dict(self, state: dict) -> None:
        self._pending = state

    def __iter__(self):
        pending, self._pending = self._pending, None
        if pending is not None and hasattr(self.loader, "__len__") and pending["trained"] >= len(self.loader):
            # Saved at the end of an epoch: the next one starts from the checkpoint's RNG states. Now,
            # not at the first batch: Lightning ends the restored epoch and calls iter() once more.
            self._restore(pending["now"])
            pending = None
        return _ExactEpoch(self, pending)


class _ExactEpoch:
    """One epoch of an :class:`_ExactLoader` (a resumed one skips what was trained)."""

    def __init__(self, owner: _ExactLoader, pending: dict | None) -> None:
        self.owner, self.pending = owner, pending
        self.it = None
        self.restore_at: int | None = None

    def __iter__(self):
        return self

    def _start(self) -> None:
        owner, pending = self.owner, self.pending
        if pending is not None:
            owner._restore(pending["epoch_start"])
        owner._epoch_start = owner._states()
        owner.trained = owner.served = 0
        self.it = iter(owner.loader)
        if pending is None:
            return
        for _ in range(pending["trained"]):
            next(self.it)
        owner.trained = owner.served = pending["trained"]
        self.restore_at = pending["served"]

    def __next__(self):
        if self.it is None:
            self._start()
        if self.restore_at is not None and self.owner.served >= self.restore_at:
            _set_global_rng(self.pending["now"]["global"])
            self.restore_at = None
        batch = next(self.it)
        self.owner.served += 1
        return batch


class _TrialReporter(Callback):
    """Applies the trial's LR, reports to Tune at every validation, stops on a non-finite loss."""

    def __init__(self, lr: float, metric: str, mode: str, eval_every: int, monitor: LRHealthMonitor,
                 audit: bool = False) -> None:
        self.lr, self.metric, self.mode, self.eval_every, self.monitor = lr, metric, mode, eval_every, monitor
        self.audit = audit
        self.loader: _ExactLoader | None = None
        self.init_checksum: str | None = None
        self._data_hash = hashlib.sha256()
        self.data_checksum: str | None = None
        self.data_chain = ""  # with audit: a hash chained over every batch trained on, resumes included
        self.ckpt_lr: float | None = None  # the trial LR of the checkpoint this run resumed from
        self.starts = 0
        self.start_step = 0
        self.group_lrs: list[float] = []
        self.reports: list[dict] = []  # every report of the weights' lineage (resumes and PBT exploits included)
        self.next_report = eval_every  # the step whose validation is the next report
        self.lr_attr = "lr"
        self.scratch: str | None = None  # the trial's temporary folder (checkpoints are written there)
        self.train_loss = math.nan
        self.diverged = False

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After a checkpoint is restored (on_fit_start comes before it): a resumed PBT trial gets
        # its new LR here, over the donor's.
        apply_lr(trainer, pl_module, self.lr)
        if self.ckpt_lr and self.ckpt_lr != self.lr:
            # An LRSchedule resumed with the donor's base LRs: move them with the trial's LR (it runs
            # after this callback and sets the groups from its base LRs).
            for callback in trainer.callbacks:
                if isinstance(callback, LRSchedule):
                    callback.scale_base_lrs(self.lr / self.ckpt_lr)
        self.ckpt_lr = None
        self.group_lrs = [float(g["lr"]) for g in trainer.optimizers[0].param_groups]
        self.starts += 1
        self.start_step = trainer.global_step
        self.next_report = (trainer.global_step // self.eval_every + 1) * self.eval_every
        self.lr_attr = _lr_attr(pl_module)
        if trainer.global_step == 0:
            self.init_checksum = checksum([p for p in pl_module.parameters()])

    @override
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.global_step >= self.next_report and not self.diverged:
            self._no_metric(trainer, f"no validation ran at step {self.next_report} (the model has no "
                                     "validation_step, or the data no val_dataloader)")
            return
        if self.data_checksum is None and trainer.global_step < self.eval_every:
            _digest(batch, self._data_hash)  # the data order up to the first report
        if self.audit:
            h = hashlib.sha256(self.data_chain.encode())
            _digest(batch, h)
            self.data_chain = h.hexdigest()[:16]

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self.loader is not None:
            self.loader.trained += 1
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not isinstance(loss, torch.Tensor):
            return
        self.train_loss = float(loss.detach())
        if not math.isfinite(self.train_loss):
            self.diverged = True
            trainer.should_stop = True
            self._report(trainer, math.inf if self.mode == "min" else -math.inf, checkpoint=False)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.diverged:
            return
        metrics = trainer.callback_metrics
        if self.metric not in metrics:
            self._no_metric(trainer, f"the validation at step {trainer.global_step} logged no {self.metric!r}")
            return
        value = float(metrics[self.metric])
        if not math.isfinite(value):
            value = math.inf if self.mode == "min" else -math.inf
        self._report(trainer, value, checkpoint=True)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step >= self.next_report and not (self.diverged or trainer.should_stop):
            self._no_metric(trainer, f"no validation ran at step {self.next_report} (the model has no "
                                     "validation_step, or the data no val_dataloader)")

    def _no_metric(self, trainer: pl.Trainer, why: str) -> None:
        """The search's metric is not there at a report: end the search with an error (``_fit``
        raises it) naming the metric and what the model logged, rather than train every trial on and
        report NaN."""
        from ray import tune

        logged = ", ".join(sorted(trainer.callback_metrics)) or "nothing"
        message = (f"search_lr(metric={self.metric!r}): {why}; the model logged: {logged}. Pass metric= one of "
                   f"those (and mode=), or self.log({self.metric!r}, ...) in validation_step")
        trainer.should_stop = True
        tune.report({self.metric: math.nan, "step": trainer.global_step, _ERROR: message})

    def _verdict(self) -> tuple[str, str]:
        """The worst verdict over the groups, as LRHealthMonitor gave it."""
        if self.diverged:
            return TOO_HIGH, f"non-finite training loss ({self.train_loss})"
        status = dict(self.monitor.status)
        for verdict in (TOO_HIGH, TOO_LOW):
            names = [n for n, s in status.items() if s == verdict]
            if names:
                return verdict, self.monitor.reasons.get(names[0], "")
        return OK, ""

    def _report(self, trainer: pl.Trainer, value: float, checkpoint: bool) -> None:
        from ray import tune

        if self.data_checksum is None and (trainer.global_step >= self.eval_every or self.diverged):
            self.data_checksum = self._data_hash.hexdigest()[:16]
        verdict, why = self._verdict()
        optimizer = trainer.optimizers[0]
        self.next_report = trainer.global_step + self.eval_every
        result = {self.metric: value, "step": trainer.global_step, "lr": max(float(g["lr"]) for g in optimizer.param_groups),
                  "group_lrs": self.group_lrs, "train_loss": self.train_loss, "verdict": verdict, "why": why,
                  "diverged": self.diverged, "init_checksum": self.init_checksum,
                  "data_checksum": self.data_checksum, "starts": self.starts, "start_step": self.start_step,
                  "trial_lr": self.lr, "node_id": _node_id(), "lr_attr": self.lr_attr}
        if self.audit:
            result["data_chain"] = self.data_chain
            result["weights_checksum"] = checksum([p for p in trainer.lightning_module.parameters()])
        # Every report so far travels in the checkpoint and in each result: Tune's own result files
        # lose rows around a pause (a paused trial's files are copied back from the storage, which
        # may not have the last rows yet), so which rows they keep would depend on timing.
        self.reports.append({key: result[key] for key in _REPORTED if key in result} | {self.metric: value})
        result["reports"] = json.dumps(self.reports)
        if not checkpoint:
            tune.report(result)
            return
        # In the trial's folder: a trial paused here never comes back from tune.report, and the search
        # removes that folder with the rest of its scratch space.
        with tempfile.TemporaryDirectory(dir=self.scratch, ignore_cleanup_errors=True) as folder:
            trainer.save_checkpoint(os.path.join(folder, _CKPT))
            tune.report(result, checkpoint=tune.Checkpoint.from_directory(folder))

    @override
    def state_dict(self) -> dict:
        return {"init_checksum": self.init_checksum, "data_checksum": self.data_checksum, "starts": self.starts,
                "lr": self.lr, "data_chain": self.data_chain, "reports": self.reports}

    @override
    def load_state_dict(self, state: dict) -> None:
        self.init_checksum, self.data_checksum = state["init_checksum"], state["data_checksum"]
        self.starts = state["starts"]
        self.ckpt_lr, self.data_chain = state.get("lr"), state.get("data_chain", "")
        self.reports = list(state.get("reports", []))


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


@dataclass
class _Payload:
    """What every trial receives (shipped once through Ray's object store)."""

    model: Any  # a LightningModule, or a callable that returns one
    datamodule: Any
    trainer_kwargs: dict
    metric: str
    mode: str
    seed: int
    threads: int
    eval_every: int
    max_steps: int
    health_every: int
    audit: bool = False
    scratch: str | None = None  # the search's temporary folder (trials' folders go in it; removed at the end)


def _quiet() -> None:
    import logging
    import warnings

    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")
    warnings.filterwarnings("ignore", message=".*treespec.*")


def _trial(config: dict, payload: _Payload) -> None:
    """One Tune trial: a fresh Trainer at ``config["lr"]``, resumed from Tune's checkpoint if any."""
    from lrfuse._threads import torch_threads

    _quiet()
    with torch_threads(payload.threads):  # the worker's own count comes back (Tune reuses workers)
        _train(config, payload)


def _train(config: dict, payload: _Payload) -> None:
    from ray import tune

    pl.seed_everything(payload.seed, workers=True, verbose=False)  # the same data order in every trial
    if isinstance(payload.model, pl.LightningModule):
        model = copy.deepcopy(payload.model)  # the trial's own copy; every trial starts from the same weights
    else:
        model = payload.model()
        if not isinstance(model, pl.LightningModule):
            raise TypeError(f"search_lr: the model factory returned {type(model).__name__}, not a LightningModule")
    datamodule = copy.deepcopy(payload.datamodule)
    monitor = LRHealthMonitor(every_n_steps=payload.health_every, warn=False)
    reporter = _TrialReporter(float(config["lr"]), payload.metric, payload.mode, payload.eval_every, monitor,
                              audit=payload.audit)
    _exact_resume(datamodule, reporter)
    kwargs = dict(payload.trainer_kwargs)
    callbacks = [copy.deepcopy(cb) for cb in kwargs.pop("callbacks", None) or []]
    if payload.scratch is not None:
        os.makedirs(payload.scratch, exist_ok=True)  # made on another node of a cluster
    # Everything the trial writes goes in its own folder inside the search's scratch folder: removed
    # when the trial ends, and with the scratch folder when the search ends (also after a failure,
    # a dead worker or Ctrl-C, when a trial never gets to remove its own).
    with tempfile.TemporaryDirectory(prefix="lrfuse-trial-", dir=payload.scratch, ignore_cleanup_errors=True) as root:
        reporter.scratch = root
        # The reporter first: it applies the LR before a schedule callback reads the groups' LRs.
        trainer = pl.Trainer(**kwargs, callbacks=[reporter, *callbacks, monitor], max_steps=payload.max_steps,
                             val_check_interval=payload.eval_every, default_root_dir=os.path.join(root, "trainer"),
                             **_FORCED)
        checkpoint = tune.get_checkpoint()
        ckpt_path = None if checkpoint is None else os.path.join(_checkpoint_folder(checkpoint, root), _CKPT)
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)


def _checkpoint_folder(checkpoint, root: str) -> str:
    """A local folder holding ``checkpoint``: its own on a local file system (read in place, no
    copy), else a download into ``root`` (Ray's default would be a ``checkpoint_tmp_*`` folder in
    the temp dir that nothing removes)."""
    import pyarrow.fs

    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem) and os.path.isdir(checkpoint.path):
        return checkpoint.path
    return checkpoint.to_directory(os.path.join(root, "restore"))


def _exact_resume(datamodule: pl.LightningDataModule, reporter: _TrialReporter) -> None:
    """Serve the datamodule's training loader through :class:`_ExactLoader` (one device per trial:
    with several, Lightning must see the plain loader to give it a distributed sampler)."""
    make = datamodule.train_dataloader

    def train_dataloader():
        loader = make()
        trainer = getattr(datamodule, "trainer", None)
        if trainer is not None and trainer.world_size > 1:
            return loader
        reporter.loader = _ExactLoader(loader)
        return reporter.loader

    datamodule.train_dataloader = train_dataloader


# ----------------------------------------------------------------------------- results

@dataclass
class TrialRecord:
    """One trial of a search.

    Attributes:
        lr: the trial's LR (the peak of the group with the largest LR); under PBT, its last one.
        group_lrs: every parameter group's LR in the trial (ratios as the model configures them).
        value: the last reported validation metric (``inf`` / ``-inf`` if it diverged, NaN if none).
        steps: training steps done.
        seconds: wall time of the trial.
        stop: why it stopped: ``budget``, ``race (behind at step N)``, ``diverged (step N)``, ``failed: ...``.
        verdict, why: ``too_high`` / ``too_low`` / ``ok`` and the reason, from LRHealthMonitor's rules.
        history: ``(step, value, train_loss, lr)`` at every report of the trial's weights: a report
            that a trial resumed from (pause, retry, Ctrl-C) is kept, one made after that checkpoint
            is not; under PBT a trial that copied another's checkpoint carries that trial's reports
            up to the copy.
        init_checksum, data_checksum: checksums of the initial weights and of the first evaluation
            interval's batches (equal across trials of a grid or race).
        reports: every report as a dict: ``step``, the metric, ``train_loss``, ``lr`` (the largest
            group LR then, schedules included), ``trial_lr`` (the trial's LR then; PBT changes it)
            and, with ``search_lr(audit=True)``, ``data_chain`` (a hash chained over every batch
            trained on so far) and ``weights_checksum``.
        starts: how many times the trial started (more than 1: resumed after a failure or PBT exploit).
        node_id: the Ray node of its last report.
    """

    lr: float
    group_lrs: list[float]
    value: float
    steps: int
    seconds: float
    stop: str
    verdict: str
    why: str = ""
    history: list[tuple[int, float, float, float]] = field(default_factory=list)
    reports: list[dict] = field(default_factory=list)
    init_checksum: str | None = None
    data_checksum: str | None = None
    starts: int = 0
    start_step: int = 0
    node_id: str | None = None
    error: str | None = None


@dataclass
class LRSearchResult:
    """What :func:`search_lr` found.

    Attributes:
        lr: the best trial's LR (peak group), or ``None`` if every trial failed or diverged.
        group_lrs: the best trial's per-group LRs.
        method, metric, mode: as searched.
        low, high: the LR range searched.
        trials: every trial, in the order of their LRs.
        finder: the range test's result when it set the range, else ``None``.
        budget_steps: training steps of a full trial.
        path: Tune's experiment folder (checkpoints, per-trial results; ``Tuner.restore`` resumes it).
        seconds: wall time of the whole search (the finder included).
    """

    lr: float | None
    group_lrs: list[float]
    method: str
    metric: str
    mode: str
    low: float
    high: float
    trials: list[TrialRecord]
    budget_steps: int
    finder: Any = None
    path: str | None = None
    seconds: float = 0.0
    lr_attr: str = "lr"

    @property
    def best(self) -> TrialRecord | None:
        return next((t for t in self.trials if t.lr == self.lr and self.lr is not None), None)

    @property
    def total_steps(self) -> int:
        """Training steps of all trials (the finder's excluded; see :attr:`finder`)."""
        return sum(t.steps for t in self.trials)

    def table(self) -> str:
        """Every trial as a Markdown table, the best marked with ``*``."""
        lines = [f"| | lr | group lrs | {self.metric} | steps | wall s | stopped | verdict |",
                 "|---|--:|---|--:|--:|--:|---|---|"]
        for t in self.trials:
            groups = ", ".join(f"{v:.3g}" for v in t.group_lrs)
            verdict = t.verdict.replace("_", " ") + (f" ({t.why})" if t.why else "")
            lines.append(f"| {'*' if t is self.best else ''} | {t.lr:.3g} | {groups} | {t.value:.4g} | {t.steps} | "
                         f"{t.seconds:.1f} | {t.stop} | {verdict} |")
        return "\n".join(lines)

    def summary(self) -> str:
        """One line: the best LR, its metric and what the search cost."""
        if self.lr is None:
            return f"{self.method} search: no trial finished without diverging or failing"
        best = self.best
        return (f"{self.method} search over {self.low:.3g} .. {self.high:.3g}: best lr {self.lr:.3g} "
                f"({self.metric} {best.value:.4g}), {len(self.trials)} trials, {self.total_steps} steps, "
                f"{self.seconds:.1f} s")

    def config(self) -> dict:
        """The config to train with: ``{"model": {"lr": ...}}`` for ``lrfuse fit --config``."""
        return {"model": {self.lr_attr: self.lr}}

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.config(), sort_keys=False)

    def plot(self, path: str | None = None):
        """Each trial's validation curve (left) and the final metric against the LR (right).

        Needs matplotlib. Returns the figure; writes it to ``path`` if given.
        """
        try:
            import matplotlib
            if path is not None:
                matplotlib.use("Agg", force=False)
            import matplotlib.pyplot as plt
        except ImportError as error:
            raise ImportError("LRSearchResult.plot needs matplotlib: pip install matplotlib") from error
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
        logs = [math.log10(t.lr) for t in self.trials] or [0.0]
        lo, hi = min(logs), max(logs)
        cmap = plt.get_cmap("viridis")
        for t in self.trials:
            finite = [(s, v) for s, v, _, _ in t.history if math.isfinite(v)]
            color = cmap(0.5 if hi == lo else (math.log10(t.lr) - lo) / (hi - lo))
            if finite:
                left.plot(*zip(*finite), "-o", ms=3, color=color, lw=2.5 if t is self.best else 1,
                          label=f"{t.lr:.2g}")
        left.set_xlabel("step")
        left.set_ylabel(self.metric)
        left.set_title(f"{self.method}: {len(self.trials)} trials", fontsize=9)
        if len(self.trials) <= 12:
            left.legend(fontsize=7, title="lr", title_fontsize=7)
        markers = {OK: "o", TOO_HIGH: "^", TOO_LOW: "v"}
        for t in self.trials:
            shown = t.value if math.isfinite(t.value) else np.nan
            right.scatter([t.lr], [shown], marker=markers.get(t.verdict, "o"), color="tab:red" if t is self.best else "tab:blue")
        if self.finder is not None and getattr(self.finder, "lr", None):
            right.axvline(self.finder.lr, color="tab:gray", ls="--", label=f"finder {self.finder.lr:.2g}")
        right.axvspan(self.low, self.high, color="tab:green", alpha=0.1, label="range searched")
        right.set_xscale("log")
        right.set_xlabel("learning rate (peak group)")
        right.set_ylabel(f"last {self.metric}")
        right.set_title("^ too high, v too low, o ok; red: best", fontsize=9)
        right.legend(fontsize=7)
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=120)
        return fig


def _records(results, metric: str, mode: str, budget: int, method: str) -> list[TrialRecord]:
    records = []
    for result in results:
        m = result.metrics or {}
        reports = json.loads(m["reports"]) if m.get("reports") else []
        history = [(int(r["step"]), float(r[metric]), float(r["train_loss"]), float(r["lr"])) for r in reports]
        steps = int(m.get("step", 0))
        if result.error is not None:
            stop = f"failed: {type(result.error).__name__}"
        elif m.get("diverged"):
            stop = f"diverged (step {steps})"
        elif steps >= budget:
            stop = "budget"
        elif method == "race":
            stop = f"race (behind at step {steps})"
        else:
            stop = f"stopped at step {steps}"
        worst = math.inf if mode == "min" else -math.inf
        value = float(m.get(metric, math.nan)) if m else math.nan
        records.append(TrialRecord(
            lr=float(result.config["lr"]),  # under PBT the trial's last (Tune updates it on exploit)
            group_lrs=list(m.get("group_lrs", [])), value=worst if m.get("diverged") else value, steps=steps,
            seconds=float(m.get("time_total_s", 0.0)), stop=stop, verdict=m.get("verdict", TOO_HIGH if m.get("diverged") else ""),
            why=m.get("why", ""), history=history, reports=reports, init_checksum=m.get("init_checksum"),
            data_checksum=m.get("data_checksum"), starts=int(m.get("starts", 0)), start_step=int(m.get("start_step", 0)),
            node_id=m.get("node_id"), error=None if result.error is None else str(result.error)))
    records.sort(key=lambda t: t.lr)
    return records


def _pick(records: list[TrialRecord], mode: str, budget: int) -> TrialRecord | None:
    """The best trial by its last metric, among those that used the whole budget where any did."""
    usable = [t for t in records if t.error is None and math.isfinite(t.value)]
    full = [t for t in usable if t.steps >= budget]
    pool = full or usable
    if not pool:
        return None
    return (min if mode == "min" else max)(pool, key=lambda t: t.value)


# ----------------------------------------------------------------------------- the search

def _lr_attr(model: Any) -> str:
    """The model's LR argument (``lr`` or ``learning_rate``) for :meth:`LRSearchResult.config`."""
    hparams = getattr(model, "hparams", {}) or {}
    for name in ("lr", "learning_rate"):
        if name in hparams or name in getattr(model, "__dict__", {}):
            return name
    return "lr"


def search_lr(model: pl.LightningModule | Callable[[], pl.LightningModule], datamodule: pl.LightningDataModule,
              method: str = "race", *, trials: int = 8, min_lr: float | None = None, max_lr: float | None = None,
              max_steps: int = 300, eval_every: int | None = None, metric: str = "val_loss", mode: str = "min",
              trainer_kwargs: dict | None = None, finder_kwargs: dict | None = None, seed: int = 0,
              cpus_per_trial: float = 1, gpus_per_trial: float = 0, max_concurrent: int | None = None,
              address: str | None = None, num_cpus: int | None = None, include_dashboard: bool = False,
              storage_path: str | None = None, name: str | None = None, max_failures: int = 1,
              grace_period: int = 1, reduction_factor: int = 2, perturbation_interval: int = 2,
              resume: bool = False, audit: bool = False, verbose: int = 0) -> LRSearchResult:
    """Search the learning rate on Ray Tune: ``"grid"``, ``"random"``, ``"race"`` or ``"pbt"``.

    Every trial trains ``model`` (a copy of it, or a fresh one from the factory) for ``max_steps``
    at one LR, validates every ``eval_every`` steps and reports ``metric``. The LR is the peak of
    the model's own optimizer groups, all scaled together (ratios kept, as the finder does). The
    search writes its results under ``storage_path`` / ``name`` and nothing else: the trials'
    temporary files live in one folder of the temp dir, removed when the search ends, also after
    an error or Ctrl-C. Ray
    starts locally on 127.0.0.1 (usage statistics off, no dashboard) unless ``address`` joins a
    cluster or Ray is already initialised in this process.

    Args:
        model: a LightningModule (every trial starts from its current weights) or a callable
            returning one (called in each trial after seeding with ``seed``).
        datamodule: the data; each trial uses a copy, seeded alike, so batches come in the same order.
        method: ``grid`` | ``random`` | ``race`` | ``pbt`` (see the module's docstring).
        trials: number of trials (the PBT population).
        min_lr, max_lr: the range; default: the LR finder's plausible range, run first.
        max_steps: the budget of a trial in training steps (rounded up to a multiple of ``eval_every``).
        eval_every: validation (and report, checkpoint) period in steps; default ``max_steps // 10``.
        metric, mode: the validation metric the model logs and whether lower or higher is better.
        trainer_kwargs: further ``pl.Trainer`` arguments for each trial (e.g. ``precision``,
            ``callbacks``); budget, validation period, logging and checkpointing are the search's.
        finder_kwargs: arguments of the range test (:class:`lrfuse.LRFinder`) when it sets the range.
        seed: seed of every trial (weights from a factory, data order) and of random/PBT LRs.
        cpus_per_trial, gpus_per_trial: Ray resources of a trial (its torch threads: ``cpus_per_trial``).
        max_concurrent: at most this many trials at once (default: as resources allow); grid and
            random only (the race and PBT need every trial in the search at once).
        address: join this Ray cluster (``"auto"``: the one this machine is part of).
        num_cpus: CPUs of a local Ray (default: all).
        include_dashboard: start Ray's dashboard (on 127.0.0.1) with a local Ray.
        storage_path, name: where Tune keeps checkpoints and results (default ``~/ray_results``;
            a shared path on a multi-node cluster) and the experiment's folder name.
        max_failures: times a failed trial is retried from its last checkpoint.
        grace_period, reduction_factor: the race's first rung (in reports) and halving factor.
        perturbation_interval: PBT's exploit / explore period, in reports.
        resume: continue the interrupted search (Ctrl-C) saved under ``storage_path`` / ``name``:
            finished trials are kept, unfinished ones resume from their last checkpoint, the race
            from its last rung. Pass the same model, data and settings; the range and LRs are the
            saved ones (no finder run).
        audit: checksum every training batch and the weights at every report
            (:attr:`TrialRecord.reports`), to check that trials saw identical data and resumed
            exactly; costs a host copy and a hash of each batch.
        verbose: Tune's console output (0 silent, 1 a status table, 2 every result).

    Returns:
        An :class:`LRSearchResult`: best LR and group LRs, every trial, ``plot(path)``, ``to_yaml()``.

    Raises:
        ValueError: for an unknown method, ``trials < 1``, ``min_lr >= max_lr`` or one of them
            missing, a budget or period below 1, an unknown mode, negative resources or failures,
            ``max_concurrent`` below ``trials`` for the race or PBT;
            with ``resume``, a missing ``name`` or experiment folder, or another method than saved;
            at the first report, when ``metric`` is not there (no validation ran, or it logged other
            names: the message lists them); the search stops then.
        KeyboardInterrupt: when the search is interrupted (Ctrl-C); the message says how to resume.
        ImportError: without Ray Tune (``pip install "lrfuse[search]"``).
        RuntimeError: when the finder, run for the range, makes no suggestion.
    """
    start = time.perf_counter()
    if method not in METHODS:
        raise ValueError(f"search_lr: unknown method {method!r}; use one of {', '.join(METHODS)}")
    if not isinstance(trials, int) or trials < 1:
        raise ValueError(f"search_lr: trials must be an integer >= 1, got {trials!r}")
    if (min_lr is None) != (max_lr is None):
        raise ValueError(f"search_lr: give both min_lr and max_lr, or neither (the finder's range), got min_lr={min_lr}, "
                         f"max_lr={max_lr}")
    if min_lr is not None and not (0 < min_lr < max_lr and math.isfinite(max_lr)):
        raise ValueError(f"search_lr needs 0 < min_lr < max_lr (finite), got min_lr={min_lr}, max_lr={max_lr}")
    if max_steps < 1:
        raise ValueError(f"search_lr: max_steps must be >= 1, got {max_steps}")
    eval_every = eval_every if eval_every is not None else max(1, max_steps // 10)
    if eval_every < 1:
        raise ValueError(f"search_lr: eval_every must be >= 1, got {eval_every}")
    if mode not in ("min", "max"):
        raise ValueError(f"search_lr: mode must be 'min' or 'max', got {mode!r}")
    if cpus_per_trial <= 0 or gpus_per_trial < 0:
        raise ValueError(f"search_lr needs cpus_per_trial > 0 and gpus_per_trial >= 0, got {cpus_per_trial}, "
                         f"{gpus_per_trial}")
    if max_failures < 0:
        raise ValueError(f"search_lr: max_failures must be >= 0, got {max_failures}")
    if grace_period < 1 or reduction_factor < 2 or perturbation_interval < 1:
        raise ValueError("search_lr needs grace_period >= 1, reduction_factor >= 2 and perturbation_interval >= 1, "
                         f"got {grace_period}, {reduction_factor}, {perturbation_interval}")
    if max_concurrent is not None and max_concurrent < 1:
        raise ValueError(f"search_lr: max_concurrent must be >= 1, got {max_concurrent}")
    if method in ("race", "pbt") and max_concurrent is not None and max_concurrent < trials:
        # Tune's limit holds trials back until others end; the race and PBT compare every trial at the
        # same step, so they would decide among whoever happened to be there.
        raise ValueError(f"search_lr(method={method!r}) compares all {trials} trials at the same step, so they must all "
                         f"be in the search at once: max_concurrent={max_concurrent} < trials is not possible; "
                         "limit the trials running at a time with cpus_per_trial (or num_cpus) instead")
    saved = _saved_search(storage_path, name, method) if resume else None
    if not (isinstance(model, pl.LightningModule) or callable(model)):
        raise TypeError(f"search_lr: model must be a LightningModule or a callable returning one, "
                        f"got {type(model).__name__}")
    from lrfuse.lightning import _ray

    reports = math.ceil(max_steps / eval_every)
    budget = reports * eval_every  # every trial ends on a validation
    trainer_kwargs = dict(trainer_kwargs or {})
    trainer_kwargs.setdefault("accelerator", "gpu" if gpus_per_trial > 0 else "cpu")
    trainer_kwargs.setdefault("devices", 1)
    # Ray first (it fails at once when missing, and starts while the finder runs).
    started = _ray.init(address=address, num_cpus=num_cpus, include_dashboard=include_dashboard)
    scratch = tempfile.mkdtemp(prefix="lrfuse-search-")  # the trials' temporary folders; removed below
    try:
        finder = None
        if saved is not None:  # the saved range: the trials' LRs are fixed already
            min_lr, max_lr = saved["low"], saved["high"]
        elif min_lr is None:
            finder = _run_finder(model, datamodule, trainer_kwargs, seed, finder_kwargs or {})
            if finder.lr is None:
                raise RuntimeError(f"search_lr: the LR finder made no suggestion ({finder.reason}); pass min_lr and "
                                   "max_lr to search a range of your choice")
            min_lr, max_lr = finder.low, finder.high
            if not min_lr < max_lr:  # a one-point range: search half a decade either side
                min_lr, max_lr = finder.lr / 3, finder.lr * 3
        lrs = _initial_lrs(method, trials, min_lr, max_lr, seed)
        payload = _Payload(model=model, datamodule=datamodule, trainer_kwargs=trainer_kwargs, metric=metric, mode=mode,
                           seed=seed, threads=max(1, int(cpus_per_trial)), eval_every=eval_every, max_steps=budget,
                           health_every=max(1, budget // 30), audit=audit, scratch=scratch)
        results, path = _run_tune(method, lrs, min_lr, max_lr, payload, cpus_per_trial, gpus_per_trial, max_concurrent,
                                  storage_path, name, max_failures, grace_period, reduction_factor,
                                  perturbation_interval, reports, verbose, seed, resume)
    finally:
        if started:
            import ray

            ray.shutdown()
        shutil.rmtree(scratch, ignore_errors=True)
    records = _records(results, metric, mode, budget, method)
    best = _pick(records, mode, budget)
    # A factory's model exists only in the trials: they report its LR argument's name.
    lr_attr = _lr_attr(model) if isinstance(model, pl.LightningModule) else next(
        (r.metrics["lr_attr"] for r in results if r.metrics and r.metrics.get("lr_attr")), "lr")
    return LRSearchResult(lr=None if best is None else best.lr, group_lrs=[] if best is None else best.group_lrs,
                          method=method, metric=metric, mode=mode, low=float(min_lr), high=float(max_lr), trials=records,
                          budget_steps=budget, finder=finder, path=path, seconds=time.perf_counter() - start,
                          lr_attr=lr_attr)


def _storage(storage_path) -> str:
    return os.path.abspath(os.path.expanduser(os.fspath(storage_path or "~/ray_results")))


def _race_state(storage_path, name: str) -> str:
    return os.path.join(_storage(storage_path), _RACE_STATE.format(name=name))


def _saved_search(storage_path, name: str | None, method: str) -> dict:
    """The settings a search saved in its experiment folder, checked before resuming it."""
    if not name:
        raise ValueError("search_lr(resume=True) needs name= (and storage_path= if not the default): the experiment "
                         "folder to resume, as the interrupted search printed it")
    folder = os.path.join(_storage(storage_path), name)
    meta = os.path.join(folder, _META)
    if not os.path.isfile(meta):
        raise ValueError(f"search_lr(resume=True): {folder} holds no lrfuse search ({_META} missing); pass the "
                         "storage_path and name of the interrupted search, or drop resume=True to start one")
    with open(meta) as f:
        saved = json.load(f)
    if saved["method"] != method:
        raise ValueError(f"search_lr(resume=True): the search in {folder} is method={saved['method']!r}, not "
                         f"{method!r}; pass method={saved['method']!r}")
    return saved


def _run_finder(model, datamodule, trainer_kwargs: dict, seed: int, finder_kwargs: dict):
    """The range test on a copy of the model (or a fresh one from the factory), seeded as the trials
    are. Its curve gives the search's range; the finder's own race is left out (``race=False``
    unless ``finder_kwargs`` says otherwise): the search's trials are the comparison."""
    finder_kwargs = {"race": False, **finder_kwargs}
    pl.seed_everything(seed, verbose=False)
    probe = copy.deepcopy(model) if isinstance(model, pl.LightningModule) else model()
    kwargs = {k: v for k, v in trainer_kwargs.items() if k != "callbacks"}
    with tempfile.TemporaryDirectory() as root:
        trainer = pl.Trainer(**{**kwargs, **_FORCED, "max_epochs": 1, "default_root_dir": root})
        return find_lr(trainer, probe, datamodule=copy.deepcopy(datamodule), **finder_kwargs)


def _initial_lrs(method: str, trials: int, low: float, high: float, seed: int) -> list[float]:
    if method in ("grid", "race"):
        return [float(v) for v in np.geomspace(low, high, trials)] if trials > 1 else [math.sqrt(low * high)]
    rng = np.random.default_rng(seed)
    return [float(v) for v in np.exp(rng.uniform(math.log(low), math.log(high), trials))]


def _race_scheduler(metric: str, mode: str, rungs: list[int], reduction_factor: int, state_path: str):
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import FIFOScheduler, TrialScheduler

    class _Race(FIFOScheduler):
        """Successive halving in lockstep: a trial that reaches a rung waits (paused, checkpointed)
        until every trial still in the race has reported there; then the best ``1 / reduction_factor``
        continue and the rest stop. Trials that end (diverge, fail) leave the race.

        The race's state is written to ``state_path`` at every change: Tune restores its trials,
        not a custom scheduler's state, and a resumed race must continue from the same rung."""

        def __init__(self) -> None:
            super().__init__()
            self._metric, self._mode = metric, mode
            self.alive: set[str] = set()
            self.scores: dict[int, dict[str, float]] = {r: {} for r in rungs}
            self.decided: set[int] = set()
            self.waiting: dict[str, int] = {}
            self._known: set[str] = set()  # every trial the race has seen (saved, for a resume)
            self._loaded = False

        def set_search_properties(self, metric, mode, **spec) -> bool:
            return True  # set at construction

        def _load(self) -> None:
            # Once, before the first trial: a resumed search finds the interrupted race's state.
            self._loaded = True
            if os.path.isfile(state_path):
                with open(state_path) as f:
                    state = json.load(f)
                self.alive, self.decided = set(state["alive"]), set(state["decided"])
                self.scores = {r: dict(state["scores"].get(str(r), {})) for r in rungs}
                self.waiting = dict(state["waiting"])
                self._known = set(state["known"])

        def _save(self) -> None:
            state = {"alive": sorted(self.alive), "decided": sorted(self.decided), "waiting": self.waiting,
                     "scores": {str(r): v for r, v in self.scores.items()},
                     "known": sorted(self._known | self.alive)}
            os.makedirs(os.path.dirname(state_path), exist_ok=True)
            tmp = state_path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(state, f)
            os.replace(tmp, state_path)

        def on_trial_add(self, tune_controller, trial) -> None:
            if not self._loaded:
                self._load()
            if trial.trial_id in self._known:
                return  # a resumed race's trial: the saved state says whether it is still racing
            self._known.add(trial.trial_id)
            self.alive.add(trial.trial_id)
            self._save()

        def _rung(self) -> int | None:
            return next((r for r in rungs if r not in self.decided), None)

        def _decide(self, tune_controller) -> None:
            rung = self._rung()
            if rung is None or any(t not in self.scores[rung] for t in self.alive):
                return
            # Ties (two diverged trials) go by trial id, i.e. the order of the LRs: never by timing or
            # by a set's order.
            ranked = sorted(self.alive, key=lambda t: (self.scores[rung][t], t))
            self.alive = set(ranked[:max(1, math.ceil(len(ranked) / reduction_factor))])
            self.decided.add(rung)
            self._save()
            for trial in tune_controller.get_trials():
                if trial.status in (Trial.PAUSED, Trial.PENDING) and trial.trial_id not in self.alive:
                    tune_controller.stop_trial(trial)

        def on_trial_result(self, tune_controller, trial, result: dict) -> str:
            rung = self._rung()
            if rung is None or result.get("training_iteration") != rung:
                return TrialScheduler.CONTINUE
            value = float(result.get(metric, math.nan))
            score = value if mode == "min" else -value
            self.scores[rung][trial.trial_id] = math.inf if math.isnan(score) else score
            self._decide(tune_controller)
            if trial.trial_id not in self.alive:
                return TrialScheduler.STOP
            if rung in self.decided:
                return TrialScheduler.CONTINUE
            self.waiting[trial.trial_id] = rung
            self._save()
            return TrialScheduler.PAUSE

        def _leave(self, tune_controller, trial) -> None:
            self.alive.discard(trial.trial_id)
            self._save()
            self._decide(tune_controller)

        def on_trial_complete(self, tune_controller, trial, result) -> None:
            self._leave(tune_controller, trial)

        def on_trial_error(self, tune_controller, trial) -> None:
            self._leave(tune_controller, trial)

        def on_trial_remove(self, tune_controller, trial) -> None:
            self._leave(tune_controller, trial)

        def _may_run(self, trial) -> bool:
            # Not a trial cut by the race, nor one waiting at a rung not decided yet (after a resume
            # Tune requeues paused trials as pending).
            rung = self.waiting.get(trial.trial_id)
            return trial.trial_id in self.alive and (rung is None or rung in self.decided)

        def choose_trial_to_run(self, tune_controller):
            for trial in tune_controller.get_trials():
                # A trial cut while it was pausing (saving its checkpoint) can end up paused all the
                # same; Tune would wait for it forever. Stop it once the save is done.
                if (trial.status in (Trial.PENDING, Trial.PAUSED) and trial.trial_id in self._known
                        and trial.trial_id not in self.alive and not getattr(trial, "is_saving", False)):
                    tune_controller.stop_trial(trial)
            for status in (Trial.PENDING, Trial.PAUSED):
                for trial in tune_controller.get_trials():
                    if trial.status == status and self._may_run(trial):
                        return trial
            return None

        def debug_string(self) -> str:
            return f"lrfuse race: rungs {rungs}, {len(self.alive)} in the race"

    return _Race()


def _pbt_scheduler(metric: str, mode: str, low: float, high: float, interval: int, budget: int, seed: int):
    """Tune's PBT, synchronous and seeded: the same search gives the same trials, LRs and values.

    Asynchronous PBT (Tune's default) decides a trial's exploit when that trial reports, against
    whoever else has reported by then, so the outcome depends on timing. In the synchronous mode
    a trial that reaches a perturbation point waits (paused, checkpointed) until every live trial
    has reached it; then all decisions are taken at once, in a fixed order (by score, ties by the
    order the trials were added). Time is our ``step`` (``interval`` steps between perturbations).

    Tune's PBT draws the donor and the perturbation from Python's global ``random`` (and would
    resample a Tune domain from numpy's global RNG), which anything else in the driver may draw
    from too; here they come from a ``random.Random(seed)`` of the scheduler's own, and the
    resample is a log-uniform draw from it. Besides:

    - The last report (``budget`` steps) decides nothing: an exploit there would give the trial a
      new LR with nothing left to train, and its record an LR that did not produce its value.
    - A diverged trial's report is not a PBT result: the trial ends (as in every method) and is
      reported as diverged.
    - Tune's check "every live trial is at the point" counts failed trials as live, and decides
      only when a trial reports: a trial that ends early (diverged, failed) while the others wait
      would leave them waiting forever. Here finished trials do not count, and when nothing can
      run and every live trial waits, the round is decided then (:meth:`choose_trial_to_run`).
    - Tune adds trials to a search a few at a time (up to about 16 pending), which is safe: a
      pending trial is live and has not reached the point, so no round is decided before every
      trial is there. A concurrency limit (``max_concurrent``) would hold trials back until others
      end, which is why :func:`search_lr` refuses one below the population.
    """
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import PopulationBasedTraining, TrialScheduler
    from ray.tune.schedulers import pbt as tune_pbt

    rng = random.Random(seed)

    def resample() -> float:
        return math.exp(rng.uniform(math.log(low), math.log(high)))

    class _Unfinished:
        """The controller as PBT sees it: its live trials are the unfinished ones (Tune's include failed trials)."""

        def __init__(self, controller) -> None:
            self._controller = controller

        def __getattr__(self, name: str):
            return getattr(self._controller, name)

        def get_live_trials(self):
            return [t for t in self._controller.get_trials() if t in self._controller.get_live_trials()
                    and not t.is_finished()]

    class _SyncPBT(PopulationBasedTraining):
        def __init__(self) -> None:
            super().__init__(time_attr="step", metric=metric, mode=mode, perturbation_interval=interval,
                             hyperparam_mutations={"lr": resample}, perturbation_factors=(2.0, 0.5),
                             quantile_fraction=0.25, synch=True)

        def set_search_properties(self, metric, mode, **spec) -> bool:
            return True  # set at construction

        def _decide(self, controller, trial, result: dict) -> str:
            # Tune's pbt module calls random.choice / random.random: ours for the call. The Tune loop
            # runs in the driver's one thread, and nothing else reads that module's name.
            saved, tune_pbt.random = tune_pbt.random, rng
            try:
                return super().on_trial_result(_Unfinished(controller), trial, result)
            finally:
                tune_pbt.random = saved

        def on_trial_result(self, tune_controller, trial, result: dict) -> str:
            if result.get("diverged") or result.get("step", 0) >= budget:
                return TrialScheduler.CONTINUE
            return self._decide(tune_controller, trial, result)

        def choose_trial_to_run(self, tune_controller):
            trial = super().choose_trial_to_run(tune_controller)
            if trial is not None:
                return trial
            live = _Unfinished(tune_controller).get_live_trials()
            waiting = [t for t in live if t.status == Trial.PAUSED and not t.is_saving
                       and self._trial_state[t].last_train_time >= self._next_perturbation_sync]
            if not waiting or len(waiting) < len(live):
                return None
            # Every live trial waits at the point, and no report is coming to decide the round.
            self._decide(tune_controller, waiting[0], self._trial_state[waiting[0]].last_result)
            return super().choose_trial_to_run(tune_controller)

    return _SyncPBT()


def _rungs(reports: int, grace_period: int, reduction_factor: int) -> list[int]:
    """Report counts at which the race halves: grace, grace * rf, ... (before the last report)."""
    rungs, r = [], grace_period
    while r < reports:
        rungs.append(r)
        r *= reduction_factor
    return rungs


def _run_tune(method, lrs, low, high, payload, cpus, gpus, max_concurrent, storage_path, name, max_failures,
              grace_period, reduction_factor, perturbation_interval, reports, verbose, seed, resume=False):
    from ray import tune

    name = name or f"lrfuse-{method}-{time.strftime('%Y%m%d-%H%M%S')}"
    folder = os.path.join(_storage(storage_path), name)
    trainable = tune.with_resources(tune.with_parameters(_trial, payload=payload), {"cpu": cpus, "gpu": gpus})
    if resume:
        # Finished trials stay; unfinished ones go on from their last checkpoint (Tune's own state).
        tuner = tune.Tuner.restore(folder, trainable=trainable, resume_unfinished=True)
        return _fit(tuner, folder, name, storage_path, method, payload.max_steps)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, _META), "w") as f:
        json.dump({"method": method, "low": low, "high": high, "lrs": lrs, "budget": payload.max_steps,
                   "eval_every": payload.eval_every, "metric": payload.metric, "mode": payload.mode}, f)
    scheduler = None
    if method == "race":
        scheduler = _race_scheduler(payload.metric, payload.mode, _rungs(reports, grace_period, reduction_factor),
                                    reduction_factor, _race_state(storage_path, name))
    elif method == "pbt":
        scheduler = _pbt_scheduler(payload.metric, payload.mode, low, high, perturbation_interval * payload.eval_every,
                                   payload.max_steps, seed)
    run_config = tune.RunConfig(
        name=name, storage_path=_storage(storage_path), stop=_stop_on_error(),
        failure_config=tune.FailureConfig(max_failures=max_failures),
        # PBT restores a trial from another's checkpoint, which must still be there: it keeps all.
        checkpoint_config=tune.CheckpointConfig(num_to_keep=None if method == "pbt" else 2), verbose=verbose)
    tuner = tune.Tuner(trainable, param_space={"lr": tune.grid_search(lrs)},
                       tune_config=tune.TuneConfig(metric=payload.metric, mode=payload.mode, scheduler=scheduler,
                                                   max_concurrent_trials=max_concurrent, reuse_actors=True),
                       run_config=run_config)
    return _fit(tuner, folder, name, storage_path, method, payload.max_steps)


def _stop_on_error():
    """A Tune stopper that ends the whole search at a trial's error report (``_ERROR``)."""
    from ray.tune.stopper import Stopper

    class _StopOnError(Stopper):
        def __init__(self) -> None:
            self.error: str | None = None

        def __call__(self, trial_id: str, result: dict) -> bool:
            if result.get(_ERROR):
                self.error = result[_ERROR]
            return bool(result.get(_ERROR))

        def stop_all(self) -> bool:
            return self.error is not None

    return _StopOnError()


def _fit(tuner, folder: str, name: str, storage_path, method: str, budget: int) -> tuple[list, str]:
    grid = tuner.fit()
    errors = [r.metrics[_ERROR] for r in grid if r.metrics and r.metrics.get(_ERROR)]
    if errors:
        raise ValueError(errors[0])
    # Ctrl-C makes Tune save the experiment, stop every trial and return as if done: a trial short of
    # the budget that neither failed, diverged nor lost the race says the search was interrupted.
    racing = None
    if method == "race":
        with open(_race_state(storage_path, name)) as f:
            racing = set(json.load(f)["alive"])
    unfinished = [r for r in grid if r.error is None and (not r.metrics or (
        not r.metrics.get("diverged") and int(r.metrics.get("step", 0)) < budget
        and (racing is None or r.metrics.get("trial_id") in racing)))]
    if unfinished:
        where = f"name={name!r}" + ("" if storage_path is None else f", storage_path={os.fspath(storage_path)!r}")
        raise KeyboardInterrupt(f"search_lr was interrupted with {len(unfinished)} trial(s) unfinished; the experiment "
                                f"is saved in {folder}: resume it with search_lr(..., {where}, resume=True) or "
                                f"`lrfuse search ... --name {name} --resume`")
    return list(grid), grid.experiment_path
