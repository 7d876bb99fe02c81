"""LRHealthMonitor: verdicts per group, metric names, the pure rules."""

from __future__ import annotations

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
from lrfuse.lr_health import HealthRules


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


def test_monitor_takes_its_thresholds_as_health_rules(tmp_path):
    rules = HealthRules(high_ratio=1e-9, patience=2)
    monitor, _ = run(tmp_path, Tiny(lr=1e-2), rules=rules, warn=False)
    assert monitor.rules.high_ratio == 1e-9 and monitor.status["FusedAdam"] == "too_high"
    assert rules.state_dict()["count"] == 0  # the caller's rules keep no run's history
    with pytest.raises(ValueError, match="HealthRules"):
        LRHealthMonitor(rules={"high_ratio": 0.2})


def test_loss_is_logged_beside_the_verdicts(tmp_path):
    monitor, logger = run(tmp_path, Tiny(lr=1e-2))
    losses = [row["lr_health/train_loss"] for _, row in logger.rows if "lr_health/train_loss" in row]
    assert len(losses) == monitor.rules.state_dict()["count"] > 3 and losses[-1] < losses[0]


def test_lrfuse_optimizers_are_measured_by_the_kernel_with_the_ratios_of_the_copies(tmp_path, monkeypatch):
    # The same run twice: once with lrfuse's kernel measuring the checked steps (no weights copied),
    # once forced onto the copies every other optimizer takes. Same ratios; track_stats is on for
    # the checked steps only.
    from lrfuse.lightning import health

    def fit():
        pl.seed_everything(0, verbose=False)
        monitor, logger = run(tmp_path, Tiny(lr=1e-2, groups=True), steps=12)
        monitor.grad_norms = [v for _, row in logger.rows for k, v in sorted(row.items()) if k.endswith("/grad_norm")]
        return monitor

    copies = []
    monkeypatch.setattr(health._Copies, "__init__",
                        lambda self, opt, init=health._Copies.__init__: (copies.append(opt), init(self, opt))[1])
    measured = []  # the steps that ran with track_stats on (Lightning runs the hooks inside step's closure)
    zeroed = lrfuse.FusedAdam._zeroed_stats
    monkeypatch.setattr(lrfuse.FusedAdam, "_zeroed_stats",
                        lambda self, plan: (measured.append(self.track_stats), zeroed(self, plan))[1])
    kernel = fit()
    assert copies == [] and len(measured) == 6
    monkeypatch.setattr(health._KernelStats, "serves", staticmethod(lambda opt: False))
    copied = fit()
    assert len(copies) == 6
    assert kernel.ratios.keys() == copied.ratios.keys() == {"FusedAdam/body", "FusedAdam/head"}
    for key in kernel.ratios:
        assert list(kernel.ratios[key]) == pytest.approx(list(copied.ratios[key]), rel=1e-5)
        assert len(kernel.ratios[key]) == 6 and all(r > 0 for r in kernel.ratios[key])
    # The gradient norms logged beside them: the kernel's, and those of the gradients the copies read.
    assert len(kernel.grad_norms) == 12 and all(g > 0 for g in kernel.grad_norms)
    assert kernel.grad_norms == pytest.approx(copied.grad_norms, rel=1e-5)
