"""One trial of a search: a fresh Trainer at one LR, resumed from Tune's checkpoint if any, with a
callback that reports the validation metric to Tune at every validation."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lrfuse.threads import torch_threads
from lrfuse.lightning.finder import apply_lr
from lrfuse.lightning.health import LRHealthMonitor, OK, TOO_HIGH, TOO_LOW
from lrfuse.lightning.runtime import QUIET_TRAINER, lr_attr, quiet_logs
from lrfuse.lightning.schedule import LRSchedule
from lrfuse.lightning.search.exact import ExactLoader, checksum, digest

__all__ = ["DECIDED_TRAINER_ARGS", "ERROR", "FORCED", "Payload", "TrialReporter", "run_trial"]

CKPT = "model.ckpt"
# A trial's report that ends the search with this error (the metric is not logged).
ERROR = "lrfuse_error"
# What each entry of a trial's ``reports`` holds, beside the metric.
_REPORTED = ("step", "train_loss", "lr", "trial_lr", "data_chain", "weights_checksum")
# Trainer arguments the search sets for every trial: no checkpoints or loggers of the trial's own
# (Tune keeps both), quiet, a budget in steps and validation every ``eval_every`` steps.
FORCED = {**QUIET_TRAINER, "check_val_every_n_epoch": None, "max_epochs": -1, "max_time": None}
DECIDED_TRAINER_ARGS = frozenset({*FORCED, "max_steps", "val_check_interval", "default_root_dir"})


@dataclass(frozen=True)
class Payload:
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


class TrialReporter(Callback):
    """Applies the trial's LR, reports to Tune at every validation, stops on a non-finite loss."""

    def __init__(self, lr: float, metric: str, mode: str, eval_every: int, monitor: LRHealthMonitor,
                 audit: bool = False) -> None:
        self.lr, self.metric, self.mode, self.eval_every, self.monitor = lr, metric, mode, eval_every, monitor
        self.audit = audit
        self.loader: ExactLoader | None = None
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
        self.lr_attr = lr_attr(pl_module) or "lr"
        if trainer.global_step == 0:
            self.init_checksum = checksum([p for p in pl_module.parameters()])

    @override
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.global_step >= self.next_report and not self.diverged:
            self._no_metric(trainer, f"no validation ran at step {self.next_report} (the model has no "
                                     "validation_step, or the data no val_dataloader)")
            return
        if self.data_checksum is None and trainer.global_step < self.eval_every:
            digest(batch, self._data_hash)  # the data order up to the first report
        if self.audit:
            h = hashlib.sha256(self.data_chain.encode())
            digest(batch, h)
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
        """The search's metric is not there at a report: end the search with an error (raised by the
        driver) naming the metric and what the model logged, rather than train every trial on and
        report NaN."""
        from ray import tune

        logged = ", ".join(sorted(trainer.callback_metrics)) or "nothing"
        message = (f"search_lr(metric={self.metric!r}): {why}; the model logged: {logged}. Pass metric= one of "
                   f"those (and mode=), or self.log({self.metric!r}, ...) in validation_step")
        trainer.should_stop = True
        tune.report({self.metric: math.nan, "step": trainer.global_step, ERROR: message})

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
            trainer.save_checkpoint(os.path.join(folder, CKPT))
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


def run_trial(config: dict, payload: Payload) -> None:
    """One Tune trial: a fresh Trainer at ``config["lr"]``, resumed from Tune's checkpoint if any."""
    quiet_logs()
    with torch_threads(payload.threads):  # the worker's own count comes back (Tune reuses workers)
        _train(config, payload)


def make_model(model: Any) -> pl.LightningModule:
    """The trial's own model: a copy of ``model``, or what the factory ``model`` returns."""
    if isinstance(model, pl.LightningModule):
        return copy.deepcopy(model)
    made = model()
    if not isinstance(made, pl.LightningModule):
        raise TypeError(f"search_lr: the model factory returned {type(made).__name__}, not a LightningModule")
    return made


def _train(config: dict, payload: Payload) -> None:
    from ray import tune

    pl.seed_everything(payload.seed, workers=True, verbose=False)  # the same data order in every trial
    model = make_model(payload.model)  # every trial starts from the same weights
    datamodule = copy.deepcopy(payload.datamodule)
    monitor = LRHealthMonitor(every_n_steps=payload.health_every, warn=False)
    reporter = TrialReporter(float(config["lr"]), payload.metric, payload.mode, payload.eval_every, monitor,
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
                             **FORCED)
        checkpoint = tune.get_checkpoint()
        ckpt_path = None if checkpoint is None else os.path.join(_checkpoint_folder(checkpoint, root), CKPT)
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)


def _checkpoint_folder(checkpoint, root: str) -> str:
    """A local folder holding ``checkpoint``: its own on a local file system (read in place, no
    copy), else a download into ``root`` (Ray's default would be a ``checkpoint_tmp_*`` folder in
    the temp dir that nothing removes)."""
    import pyarrow.fs

    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem) and os.path.isdir(checkpoint.path):
        return checkpoint.path
    return checkpoint.to_directory(os.path.join(root, "restore"))


def _exact_resume(datamodule: pl.LightningDataModule, reporter: TrialReporter) -> None:
    """Serve the datamodule's training loader through :class:`ExactLoader` (one device per trial:
    with several, Lightning must see the plain loader to give it a distributed sampler)."""
    make = datamodule.train_dataloader

    def train_dataloader():
        loader = make()
        trainer = getattr(datamodule, "trainer", None)
        if trainer is not None and trainer.world_size > 1:
            return loader
        reporter.loader = ExactLoader(loader)
        return reporter.loader

    datamodule.train_dataloader = train_dataloader
