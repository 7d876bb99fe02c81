"""The bundled demo: a small classifier on scikit-learn's digits (1,797 8x8 images, shipped inside
the scikit-learn package, so nothing is downloaded).

:class:`DigitsDataModule` and :class:`DigitsClassifier` are the defaults of ``lrfuse fit``;
:func:`train` is the one training recipe shared by ``lrfuse demo`` and
``benchmarks/demo_vs_grid.py`` (FusedAdam, linear warm-up then cosine, a fixed number of epochs),
so the demo and its grid-search comparison train exactly the same way.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lrfuse
from lrfuse.lightning.runtime import quiet_trainer

__all__ = ["DigitsClassifier", "DigitsDataModule", "RunResult", "train", "trainer_kwargs"]


class DigitsDataModule(pl.LightningDataModule):
    """scikit-learn's digits: a stratified train / validation split, pixels scaled to [0, 1].

    Args:
        batch_size: training batch size.
        val_fraction: share of the 1,797 images held out for validation (and test). 0.3 (540
            images) keeps the accuracy's sampling noise near half a point, below the 1-point
            comparisons that ``benchmarks/demo_vs_grid.py`` makes.
        seed: seed of the split (the split does not depend on the global RNG).
    """

    def __init__(self, batch_size: int = 64, val_fraction: float = 0.3, seed: int = 0) -> None:
        super().__init__()
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        self.batch_size, self.val_fraction, self.seed = batch_size, val_fraction, seed
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        try:
            from sklearn.datasets import load_digits
            from sklearn.model_selection import train_test_split
        except ImportError as error:
            raise ImportError("the lrfuse demo needs scikit-learn: pip install 'lrfuse[lightning]'") from error
        x, y = load_digits(return_X_y=True)
        x_tr, x_va, y_tr, y_va = train_test_split(x, y, test_size=self.val_fraction, stratify=y, random_state=self.seed)
        as_set = lambda a, b: TensorDataset(torch.tensor(a / 16.0, dtype=torch.float32), torch.tensor(b))  # noqa: E731
        self.train_set, self.val_set = as_set(x_tr, y_tr), as_set(x_va, y_va)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=512)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()


class DigitsClassifier(pl.LightningModule):
    """An MLP 64 -> hidden -> hidden -> 10 with FusedAdam by default.

    ``lr`` is the attribute :class:`lrfuse.LRFinder` sets. Under LightningCLI, ``--optimizer``
    replaces :meth:`configure_optimizers`.

    Args:
        hidden: width of the hidden layers.
        lr: learning rate of the default optimizer.
        weight_decay: weight decay of the default optimizer.
    """

    def __init__(self, hidden: int = 128, lr: float = 1e-3, weight_decay: float = 0.0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.lr = lr
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def _evaluate(self, batch, prefix: str) -> None:
        x, y = batch
        logits = self(x)
        self.log(f"{prefix}_loss", F.cross_entropy(logits, y), prog_bar=True)
        self.log(f"{prefix}_acc", (logits.argmax(1) == y).float().mean(), prog_bar=True)

    def validation_step(self, batch, batch_idx):
        self._evaluate(batch, "val")

    def test_step(self, batch, batch_idx):
        self._evaluate(batch, "test")

    def configure_optimizers(self):
        return lrfuse.FusedAdam(self.parameters(), lr=self.lr, weight_decay=self.hparams.weight_decay)


def trainer_kwargs(**overrides) -> dict:
    """Quiet CPU trainer settings for the demo, tests and benchmarks."""
    return quiet_trainer(**overrides)


@dataclass
class RunResult:
    """One training run of the demo recipe."""

    lr: float
    val_acc: float
    val_loss: float
    steps: int
    seconds: float
    model: DigitsClassifier


EPOCHS = 20
WARMUP_STEPS = 20


def _schedule(dm: DigitsDataModule, epochs: int, batch_size: int):
    """The demo's schedule: ``WARMUP_STEPS`` of warm-up (at most a quarter of the run), then cosine to 0."""
    from lrfuse.lightning.schedule import LRSchedule

    dm.setup("fit")
    total = epochs * (len(dm.train_set) // batch_size)
    return LRSchedule("cosine", warmup_steps=min(WARMUP_STEPS, total // 4))  # short runs still get a cosine phase


def train(lr: float, epochs: int = EPOCHS, seed: int = 0, batch_size: int = 64, hidden: int = 128,
          progress: bool = False) -> RunResult:
    """Train the demo classifier with the demo's recipe: FusedAdam at ``lr``, ``WARMUP_STEPS`` of
    linear warm-up (at most a quarter of the run) then cosine to 0 (:class:`lrfuse.LRSchedule`),
    ``epochs`` epochs; validate.

    Deterministic for a given ``seed`` (CPU)."""
    pl.seed_everything(seed, verbose=False)
    dm = DigitsDataModule(batch_size=batch_size, seed=seed)
    model = DigitsClassifier(hidden=hidden, lr=lr)
    trainer = pl.Trainer(**trainer_kwargs(max_epochs=epochs, enable_progress_bar=progress,
                                          callbacks=[_schedule(dm, epochs, batch_size)]))
    start = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    seconds = time.perf_counter() - start
    metrics = trainer.validate(model, datamodule=dm, verbose=False)[0]
    return RunResult(lr, float(metrics["val_acc"]), float(metrics["val_loss"]), trainer.global_step, seconds, model)


# The demo's range test: 100 steps (4 epochs of digits) from 1e-5 to 1.
FINDER = dict(min_lr=1e-5, max_lr=1.0, num_steps=100)


def find(seed: int = 0, batch_size: int = 64, hidden: int = 128, plot_path: str | None = None,
         progress: bool = False, epochs: int = EPOCHS, **finder_kwargs):
    """Run :func:`lrfuse.find_lr` on the demo classifier, seeded as :func:`train` is, in a trainer
    set up as :func:`train`'s run of ``epochs`` (its length and schedule: the race follows them).

    Returns:
        ``(result, steps)``: the :class:`~lrfuse.lr_range.LRRangeResult` and the training steps the
        sweep and the race took (their cost).
    """
    from lrfuse.lightning.finder import find_lr

    pl.seed_everything(seed, verbose=False)
    dm = DigitsDataModule(batch_size=batch_size, seed=seed)
    model = DigitsClassifier(hidden=hidden)
    trainer = pl.Trainer(**trainer_kwargs(max_epochs=epochs, callbacks=[_schedule(dm, epochs, batch_size)]))
    kwargs = {**FINDER, **finder_kwargs}
    result = find_lr(trainer, model, datamodule=dm, plot_path=plot_path, verbose=progress, **kwargs)
    race = len(result.race["lrs"]) * result.race["steps"] if result.race else 0
    return result, len(result.lrs) + race
