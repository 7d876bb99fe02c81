"""Tiny models and data for the Lightning tests: CPU, a few steps, nothing written outside tmp_path."""

from __future__ import annotations

import logging

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lrfuse
from lrfuse.groups import layerwise_groups

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
logging.getLogger("lightning.fabric").setLevel(logging.ERROR)


def pytest_configure(config):
    # Lightning's own deprecation noise, not ours.
    config.addinivalue_line("filterwarnings", "ignore:.*treespec.*")
    config.addinivalue_line("filterwarnings", "ignore:.*does not have many workers.*")
    config.addinivalue_line("filterwarnings", "ignore:.*smaller than the logging interval.*")


def quiet_trainer(tmp_path, **kwargs) -> pl.Trainer:
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                    default_root_dir=str(tmp_path))
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def blobs(n=256, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=gen)
    y = (x[:, :4].sum(1) > 0).long() + (x[:, 4:].sum(1) > 0).long()
    return TensorDataset(x, y)


class TinyData(pl.LightningDataModule):
    def __init__(self, batch_size: int = 32):
        super().__init__()
        self.batch_size = batch_size

    def setup(self, stage=None):
        self.train_set, self.val_set = blobs(256, 0), blobs(64, 1)

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=64)


class Tiny(pl.LightningModule):
    """Two layers; ``groups=True`` gives layer-wise groups (ratio 0.5); ``scheduler`` adds a StepLR."""

    def __init__(self, lr: float = 1e-3, groups: bool = False, scheduler: bool = False, fail_at: int | None = None,
                 optimizer: str = "FusedAdam"):
        super().__init__()
        self.save_hyperparameters()
        self.lr = lr
        self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.BatchNorm1d(16))
        self.head = nn.Linear(16, 3)
        self.calls = 0

    def forward(self, x):
        return self.head(self.body(x))

    def training_step(self, batch, batch_idx):
        self.calls += 1
        if self.hparams.fail_at is not None and self.calls >= self.hparams.fail_at:
            raise RuntimeError("boom")
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        params = layerwise_groups(self, lr=self.lr, decay=0.5) if self.hparams.groups else self.parameters()
        cls = getattr(lrfuse, self.hparams.optimizer, None) or getattr(torch.optim, self.hparams.optimizer)
        opt = cls(params, lr=self.lr)
        if self.hparams.scheduler:
            return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)]
        return opt


@pytest.fixture
def data():
    return TinyData()
