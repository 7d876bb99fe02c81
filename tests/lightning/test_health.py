"""LRHealthMonitor: verdicts per group, metric names, the pure rules."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from conftest import Tiny, TinyData, quiet_trainer
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import Logger
from torch.utils.data import DataLoader

import lrfuse

from lrfuse.lightning import LRHealthMonitor
from lrfuse.lightning.health import HISTORY, group_keys, group_metric_names
from lrfuse.lr_health import HealthRules, loss_verdict


class MemoryLogger(Logger):
    def __init__(self):
        super().__init__()
        self.rows = []

    @property
    def name(self):
        return "memory"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.rows.append((step, dict(metrics)))


def run(tmp_path, model, steps=30, **kwargs):
    monitor = LRHealthMonitor(every_n_steps=2, **kwargs)
    logger = MemoryLogger()
    trainer = quiet_trainer(tmp_path, max_steps=steps, callbacks=[monitor], logger=logger)
    trainer.fit(model, datamodule=TinyData())
    return monitor, logger


def test_healthy_lr_is_ok_and_logged_per_group(tmp_path):
    monitor, logger = run(tmp_path, Tiny(lr=1e-2, groups=True))
    assert set(monitor.status) == {"FusedAdam/body", "FusedAdam/head"}
    assert set(monitor.status.values()) == {"ok"}, monitor.reasons
    keys = set().union(*(row for _, row in logger.rows))
    assert {"lr_health/FusedAdam/head/lr", "lr_health/FusedAdam/head/update_ratio", "lr_health/FusedAdam/body/verdict"} <= keys
    assert all(1e-5 < r < 0.1 for r in monitor.ratios["FusedAdam/head"])


def test_too_high_is_flagged(tmp_path):
    with pytest.warns(UserWarning, match="looks too high"):
        monitor, _ = run(tmp_path, Tiny(lr=5.0))
    assert monitor.status["FusedAdam"] == "too_high"


def test_too_low_is_flagged(tmp_path):
    with pytest.warns(UserWarning, match="looks too low"):
        monitor, _ = run(tmp_path, Tiny(lr=1e-9))
    assert monitor.status["FusedAdam"] == "too_low"


def test_names_follow_lightning():
    p = torch.nn.Parameter(torch.zeros(1))
    assert group_metric_names(torch.optim.Adam([p])) == ["lr-Adam"]
    two = torch.optim.SGD([{"params": [p]}, {"params": [torch.nn.Parameter(torch.zeros(1))], "name": "head"}], lr=1)
    assert group_metric_names(two) == ["lr-SGD/pg1", "lr-SGD/head"]


def test_rules():
    rules = HealthRules(patience=2)
    assert rules.verdict([0.5]) == ("ok", "")  # one check is not enough
    assert rules.verdict([0.5, 0.5])[0] == "too_high"
    assert rules.verdict([1e-7, 1e-7])[0] == "too_low"
    for loss in (1.0, 0.5, 3.0):
        rules.add_loss(loss)
    assert rules.verdict([1e-3, 1e-3]) == ("too_high", "training loss rising")
    rules.add_loss(math.nan)
    assert rules.loss_state() == "diverging"
    flat = HealthRules()
    for _ in range(8):
        flat.add_loss(1.0)
    assert flat.verdict([5e-5])[0] == "too_low" and flat.verdict([1e-3])[0] == "ok"


def test_argument_error():
    with pytest.raises(ValueError, match="every_n_steps"):
        LRHealthMonitor(every_n_steps=0)


def test_ratio_history_is_bounded(tmp_path):
    monitor = LRHealthMonitor(every_n_steps=1, warn=False)
    quiet_trainer(tmp_path, max_steps=HISTORY + 20, callbacks=[monitor]).fit(Tiny(lr=1e-2), datamodule=TinyData())
    assert len(monitor.ratios["FusedAdam"]) == HISTORY


class TwoAdams(Tiny):
    """Two optimizers of one class (body, head): manual optimization, as Lightning asks for several."""

    def __init__(self):
        super().__init__(lr=1e-2)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        for opt in self.optimizers():
            opt.zero_grad()
        self.manual_backward(loss)
        for opt in self.optimizers():
            opt.step()
        return loss

    def configure_optimizers(self):
        return [lrfuse.FusedAdam(self.body.parameters(), lr=self.lr), lrfuse.FusedAdam(self.head.parameters(), lr=self.lr)]


def test_names_apart_from_learning_rate_monitor_and_per_optimizer(tmp_path):
    monitor, logger = LRHealthMonitor(every_n_steps=2), MemoryLogger()
    trainer = quiet_trainer(tmp_path, max_steps=12, logger=logger, callbacks=[monitor, LearningRateMonitor()])
    trainer.fit(TwoAdams(), datamodule=TinyData())
    assert set(monitor.status) == {"FusedAdam-0", "FusedAdam-1"}
    keys = set().union(*(row for _, row in logger.rows))
    ours = {k for k in keys if k.startswith("lr_health/")}
    assert {"lr_health/FusedAdam-0/lr", "lr_health/FusedAdam-1/update_ratio", "lr_health/FusedAdam-1/verdict"} <= ours
    assert {"lr-FusedAdam", "lr-FusedAdam-1"} <= keys - ours  # Lightning's own, untouched


def test_group_keys():
    p, q = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    two = torch.optim.SGD([{"params": [p]}, {"params": [q], "name": "head"}], lr=1)
    assert group_keys([two]) == [["SGD/pg1", "SGD/head"]]
    assert group_keys([torch.optim.Adam([p]), torch.optim.Adam([q])]) == [["Adam-0"], ["Adam-1"]]


class InOrder(TinyData):
    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=self.batch_size)


def _fit(tmp_path, epochs, ckpt_path=None):
    pl.seed_everything(0, verbose=False)
    monitor = LRHealthMonitor(every_n_steps=3)  # checks straddle the epoch (8 steps) boundary
    trainer = quiet_trainer(tmp_path, max_epochs=epochs, limit_val_batches=0, callbacks=[monitor])
    trainer.fit(Tiny(lr=1e-2, groups=True), datamodule=InOrder(), ckpt_path=ckpt_path)
    return monitor, trainer


def test_state_resumes_from_a_checkpoint(tmp_path):
    full, _ = _fit(tmp_path / "full", 3)
    first, trainer = _fit(tmp_path / "first", 1)
    ckpt = tmp_path / "epoch1.ckpt"
    trainer.save_checkpoint(ckpt)
    resumed, _ = _fit(tmp_path / "resumed", 3, ckpt_path=str(ckpt))
    assert len(full.ratios["FusedAdam/body"]) == 8  # checks at steps 0, 3, ... 21
    assert resumed.ratios == full.ratios and resumed.status == full.status  # the first epoch's checks too
    assert resumed.rules.state_dict() == full.rules.state_dict()
    assert resumed.state_dict() == full.state_dict()


def test_loss_verdict():
    assert loss_verdict([2.3, 1.9, 1.5, float("nan")]) == ("too_high", "training loss diverging")
    assert loss_verdict([2.3, 1.0, 2.5])[0] == "too_high"
    assert loss_verdict([2.3] * 8) == ("too_low", "training loss flat")
    assert loss_verdict([2.3, 2.0, 1.7, 1.5, 1.3, 1.2, 1.1, 1.0]) == ("ok", "")


# The whole history (issue 11): an LR far too high makes the loss explode, kills the units, and the
# updates then shrink; the last checks alone would call it too low.

EXPLODED = [2.3, 5e4, 100.0, 5.0, 2.4] + [2.3] * 10  # exploded, then flat at its start


def _rules(losses, **kwargs):
    rules = HealthRules(**kwargs)
    for loss in losses:
        rules.add_loss(loss)
    return rules


def test_exploded_loss_stays_too_high_once_the_weights_stop_moving():
    rules = _rules(EXPLODED)
    assert rules.loss_state() == "flat"  # what the last checks see
    status, why = rules.verdict([1e-9] * 5)  # the dead units barely move
    assert status == "too_high" and "exploded" in why and "5e+04" in why, why
    assert rules.verdict([1e-3] * 5)[0] == "too_high"
    nan = _rules([2.3, math.nan] + [2.3] * 10)  # a non-finite loss at any point counts too
    status, why = nan.verdict([0.0] * 5)
    assert status == "too_high" and "non-finite" in why, why


def test_exploded_then_fallen_is_never_too_low():
    # Exploded, then fell well below its start (the LR was lowered, say): not too high any more,
    # and tiny updates are the explosion's dead units, so not too low either.
    rules = _rules([2.3, 5e4, 10.0, 1.0, 0.5] + [0.5] * 10)
    assert rules.verdict([1e-9] * 5) == ("ok", "")
    assert rules.verdict([0.5] * 5)[0] == "too_high"  # the current ratio rule still applies


def test_loss_that_never_fell_with_large_updates_is_too_high():
    losses = [1.0, 1.02, 0.99, 1.01, 1.0, 1.0, 1.01, 1.0, 1.0]
    rules = _rules(losses)
    status, why = rules.verdict([0.5, 0.4, 0.3, 0.05, 1e-6, 1e-6])  # large early, tiny now
    assert status == "too_high" and "never fell" in why, why
    # Tiny updates throughout: too low, as before.
    assert rules.verdict([1e-6] * 6)[0] == "too_low"
    # One large first update (Adam's first step at a good LR) with a falling loss: ok.
    good = _rules([2.3, 1.8, 0.75, 0.45])
    assert good.verdict([0.11, 0.04, 0.02, 0.01]) == ("ok", "")
    # Too early to say after `patience` checks or fewer.
    assert _rules(losses[:3]).verdict([0.5, 0.4, 0.05]) == ("ok", "")


def test_history_in_state_dict_and_old_state_dicts():
    rules = _rules(EXPLODED)
    state = rules.state_dict()
    assert state["first"] == 2.3 and state["peak"] == 5e4 and state["count"] == len(EXPLODED)
    fresh = HealthRules()
    fresh.load_state_dict(state)
    assert fresh.state_dict() == state and fresh.verdict([1e-9] * 5)[0] == "too_high"
    # A state dict saved before these rules (losses and best only): rebuilt from the kept losses.
    old = HealthRules()
    old.load_state_dict({"losses": [2.3, 5e4, 40.0, 2.3], "best": 2.3})
    assert old.state_dict()["peak"] == 5e4 and old.verdict([1e-9] * 5)[0] == "too_high"
    older = HealthRules()
    older.load_state_dict({"losses": [2.3, 2.3, 2.3], "best": 2.3})
    assert older.state_dict()["peak"] is None and older.verdict([1e-9] * 5)[0] == "too_low"


def test_monitor_passes_the_history_settings():
    monitor = LRHealthMonitor(explode_factor=5.0, fall_tol=0.5)
    assert monitor.rules.explode_factor == 5.0 and monitor.rules.fall_tol == 0.5


def test_loss_verdict_reads_the_history():
    assert loss_verdict(EXPLODED) == ("too_high", "training loss exploded (to 5e+04) and has not fallen below its start (2.3) since")
    assert loss_verdict([2.3, math.nan] + [2.3] * 8)[0] == "too_high"
    assert loss_verdict([2.3, 5e4, 10.0, 1.0, 0.5, 0.4]) == ("ok", "")  # exploded, then fell
    assert loss_verdict([2.3, 30.0, 2.3], explode_factor=20.0)[0] == "ok"
