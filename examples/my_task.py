"""A user's own model and data, as the README's command-line recipes use them.

``lrfuse find``, ``fit`` and ``search`` take any LightningModule and LightningDataModule by import
path: ``PYTHONPATH=examples lrfuse find --model my_task.WineClassifier --data my_task.WineData``.
What the model needs for that:

- an ``lr`` (or ``learning_rate``) argument that ``configure_optimizers`` reads: the finder and the
  search write their LR there, and the ``lrfuse fit`` line they print sets it;
- a ``training_step`` that returns the loss (the range test follows it);
- for ``lrfuse search``, a ``validation_step`` that logs the metric it ranks by (``val_loss``).
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from sklearn.datasets import load_wine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lrfuse


class WineClassifier(pl.LightningModule):
    """An MLP on the 13 features of scikit-learn's wine data (3 cultivars)."""

    def __init__(self, lr: float = 1e-3, hidden: int = 32) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.lr = lr
        self.net = nn.Sequential(nn.Linear(13, hidden), nn.ReLU(), nn.Linear(hidden, 3))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self.net(x), y))

    def configure_optimizers(self):
        return lrfuse.FusedAdamW(self.parameters(), lr=self.lr, weight_decay=0.01)


class WineData(pl.LightningDataModule):
    """scikit-learn's wine data (178 samples, bundled with scikit-learn), standardized, split 80/20."""

    def __init__(self, batch_size: int = 16) -> None:
        super().__init__()
        self.batch_size = batch_size

    def setup(self, stage: str | None = None) -> None:
        x, y = load_wine(return_X_y=True)
        x, y = torch.tensor(x, dtype=torch.float32), torch.tensor(y)
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
        train, val = order[: int(0.8 * len(y))], order[int(0.8 * len(y)):]
        mean, std = x[train].mean(0), x[train].std(0)  # the training split's statistics only
        self.train_set = TensorDataset((x[train] - mean) / std, y[train])
        self.val_set = TensorDataset((x[val] - mean) / std, y[val])

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=64)
