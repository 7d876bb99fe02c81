"""LRHealthMonitor: verdicts per group, metric names, the pure rules."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import Tiny, TinyData, quiet_trainer
from lightning.pytorch.loggers import Logger

from lrfuse.lightning import LRHealthMonitor
from lrfuse.lightning.health import HealthRules, group_metric_names


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
    assert set(monitor.status) == {"lr-FusedAdam/body", "lr-FusedAdam/head"}
    assert set(monitor.status.values()) == {"ok"}, monitor.reasons
    keys = set().union(*(row for _, row in logger.rows))
    assert {"lr-FusedAdam/head", "update_ratio-FusedAdam/head", "lr_health-FusedAdam/body"} <= keys
    assert all(1e-5 < r < 0.1 for r in monitor.ratios["lr-FusedAdam/head"])


def test_too_high_is_flagged(tmp_path):
    with pytest.warns(UserWarning, match="looks too high"):
        monitor, _ = run(tmp_path, Tiny(lr=5.0))
    assert monitor.status["lr-FusedAdam"] == "too_high"


def test_too_low_is_flagged(tmp_path):
    with pytest.warns(UserWarning, match="looks too low"):
        monitor, _ = run(tmp_path, Tiny(lr=1e-9))
    assert monitor.status["lr-FusedAdam"] == "too_low"


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
