"""The tasks the LR-advice benchmarks judge on: data, model, optimizer and budget of each, split
into a tuning set and an evaluation set.

Rules and thresholds (the finder's suggestion, the health verdicts) may be chosen by looking at
the tuning set only; the READMEs quote the evaluation set. The split was fixed before any rule
was chosen against it (issue 19), and is not to be changed to suit a rule:

- The five datasets of the earlier benchmarks were tuned on by earlier rules, so the three of them
  kept here (``digits``, ``class20``, ``friedman``) are in the tuning set.
- The new families come in pairs of one kind (same loss, similar size and optimizer). In each pair
  one family went to each set by a coin flip, ``random.Random(20261202).random() < 0.5`` per pair
  in the order of ``PAIRS`` (True: the first of the pair is for tuning), drawn once and frozen here.

Every family is small enough to train in about a second on one CPU thread. Data is bundled with
scikit-learn or generated here; nothing is downloaded. Scores are in points: validation accuracy in
percent, or ``100 * max(R^2, 0)`` for regression (a diverged run scores 0, like predicting the mean).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

VAL_FRACTION = 0.4


@dataclass(frozen=True)
class Data:
    x_tr: torch.Tensor
    y_tr: torch.Tensor
    x_va: torch.Tensor
    y_va: torch.Tensor
    n_out: int  # classes, or 1 for regression


@dataclass(frozen=True)
class Task:
    """One task family: ``data(seed)``, ``model(data)``, the optimizer and the fixed budget."""

    name: str
    kind: str  # "clf" (cross-entropy, accuracy) or "reg" (MSE on a standardized target, R^2)
    data: Callable[[int], Data]
    model: Callable[[Data], nn.Module]
    optimizer: str  # a key of OPTIMIZERS
    batch: int
    epochs: int
    note: str = ""
    optimizer_kwargs: dict = field(default_factory=dict)

    def steps_per_epoch(self, data: Data) -> int:
        return len(data.x_tr) // self.batch  # drop_last

    def steps(self, data: Data) -> int:
        return self.epochs * self.steps_per_epoch(data)


# name -> (lrfuse class name, defaults beside lr)
OPTIMIZERS = {
    "adam": ("FusedAdam", {}),
    "adamw": ("FusedAdamW", {"weight_decay": 0.01}),
    "sgd": ("FusedSGD", {"momentum": 0.9}),
    "rmsprop": ("FusedRMSprop", {}),
}


def make_optimizer(task: Task, params, lr: float, cls: str | None = None) -> torch.optim.Optimizer:
    """The task's optimizer (``lrfuse.Fused*``, or torch's class of that name with ``cls="torch"``)."""
    import lrfuse

    name, defaults = OPTIMIZERS[task.optimizer]
    kwargs = {**defaults, **task.optimizer_kwargs}
    klass = getattr(torch.optim, name.removeprefix("Fused")) if cls == "torch" else getattr(lrfuse, name)
    return klass(params, lr=lr, **kwargs)


# ----------------------------------------------------------------------------- data

def _split(x, y, seed: int, kind: str, n_out: int) -> Data:
    from sklearn.model_selection import train_test_split

    strat = y if kind == "clf" else None
    x_tr, x_va, y_tr, y_va = train_test_split(x, y, test_size=VAL_FRACTION, random_state=seed, stratify=strat)
    if x_tr.ndim == 2 and x_tr.dtype.kind == "f":  # tabular: standardize with the training set's statistics
        mu, sd = x_tr.mean(0), x_tr.std(0)
        sd = np.where(sd > 1e-8, sd, 1.0)  # a feature constant in training (digits' corner pixels) stays as it is
        x_tr, x_va = (x_tr - mu) / sd, (x_va - mu) / sd
    if kind == "reg":
        ym, ys = y_tr.mean(), y_tr.std()
        y_tr, y_va = (y_tr - ym) / ys, (y_va - ym) / ys
    xdt = torch.long if x_tr.dtype.kind in "iu" else torch.float32
    ydt = torch.long if kind == "clf" else torch.float32
    return Data(torch.tensor(x_tr, dtype=xdt), torch.tensor(y_tr, dtype=ydt), torch.tensor(x_va, dtype=xdt),
                torch.tensor(y_va, dtype=ydt), n_out)


def _sk(loader: str, kind: str, images: bool = False):
    def make(seed: int) -> Data:
        import sklearn.datasets as ds

        x, y = getattr(ds, loader)(return_X_y=True)
        if images:  # digits as 1x8x8 images in [0, 1]
            x = (x / 16.0).reshape(-1, 1, 8, 8).astype(np.float32)
        n_out = int(y.max()) + 1 if kind == "clf" else 1
        return _split(x, y, seed, kind, n_out)
    return make


def _classification(n: int, features: int, informative: int, classes: int, flip: float = 0.01, sep: float = 1.0,
                    clusters: int = 1):
    def make(seed: int) -> Data:
        from sklearn.datasets import make_classification

        x, y = make_classification(n_samples=n, n_features=features, n_informative=informative,
                                   n_redundant=min(4, features - informative), n_classes=classes,
                                   n_clusters_per_class=clusters, flip_y=flip, class_sep=sep, random_state=seed)
        return _split(x, y, seed, "clf", classes)
    return make


def _regression(generator: str, n: int, **kwargs):
    def make(seed: int) -> Data:
        import sklearn.datasets as ds

        x, y = getattr(ds, generator)(n_samples=n, random_state=seed, **kwargs)
        return _split(x, y, seed, "reg", 1)
    return make


def _two_d(generator: str, n: int, **kwargs):
    def make(seed: int) -> Data:
        import sklearn.datasets as ds

        x, y = getattr(ds, generator)(n_samples=n, random_state=seed, **kwargs)
        return _split(x, y, seed, "clf", 2)
    return make


def _shapes(n: int = 4000, size: int = 12, noise: float = 0.5):
    """Noisy ``size`` x ``size`` images of one of four strokes (horizontal, vertical, diagonal,
    anti-diagonal) of random length and place; the class is the stroke's direction."""
    def make(seed: int) -> Data:
        rng = np.random.default_rng(seed)
        x = rng.normal(0.0, noise, (n, 1, size, size)).astype(np.float32)
        y = rng.integers(0, 4, n)
        for i in range(n):
            length = int(rng.integers(4, size - 2))
            r, c = (int(v) for v in rng.integers(0, size - length, 2))
            k = np.arange(length)
            rows, cols = {0: (np.full(length, r), c + k), 1: (r + k, np.full(length, c)),
                          2: (r + k, c + k), 3: (r + k, c + length - 1 - k)}[int(y[i])]
            x[i, 0, rows, cols] += 1.0
        return _split(x, y, seed, "clf", 4)
    return make


def _sequences(n: int, length: int, vocab: int, groups: int):
    """Token sequences, each drawn from its own Dirichlet mix over ``vocab`` tokens; the label is
    the group (tokens ``g, g + groups, g + 2 * groups, ...``) with the most tokens (ties: the lowest)."""
    def make(seed: int) -> Data:
        rng = np.random.default_rng(seed)
        mix = rng.dirichlet(np.ones(vocab), n)
        x = np.stack([rng.choice(vocab, length, p=p) for p in mix]).astype(np.int64)
        counts = np.stack([(x % groups == g).sum(1) for g in range(groups)], 1)
        return _split(x, counts.argmax(1), seed, "clf", groups)
    return make


# ----------------------------------------------------------------------------- models

def mlp(width: int, depth: int = 2, dropout: float = 0.0):
    def make(data: Data) -> nn.Module:
        layers, n_in = [], data.x_tr.shape[1]
        for _ in range(depth):
            layers += [nn.Linear(n_in, width), nn.ReLU()] + ([nn.Dropout(dropout)] if dropout else [])
            n_in = width
        return nn.Sequential(*layers, nn.Linear(n_in, data.n_out))
    return make


def cnn(channels: tuple[int, int] = (16, 32)):
    def make(data: Data) -> nn.Module:
        h = data.x_tr.shape[-1]
        return nn.Sequential(nn.Conv2d(1, channels[0], 3, padding=1), nn.ReLU(),
                             nn.Conv2d(channels[0], channels[1], 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Flatten(), nn.Linear(channels[1] * (h // 2) ** 2, data.n_out))
    return make


class _GRU(nn.Module):
    def __init__(self, vocab: int, n_out: int, emb: int = 16, hidden: int = 32) -> None:
        super().__init__()
        self.emb, self.gru, self.head = nn.Embedding(vocab, emb), nn.GRU(emb, hidden, batch_first=True), nn.Linear(hidden, n_out)

    def forward(self, x):
        return self.head(self.gru(self.emb(x))[1][-1])


class _Transformer(nn.Module):
    def __init__(self, vocab: int, length: int, n_out: int, d: int = 32, heads: int = 2) -> None:
        super().__init__()
        self.emb, self.pos = nn.Embedding(vocab, d), nn.Parameter(torch.randn(length, d) * 0.02)
        self.block = nn.TransformerEncoderLayer(d, heads, dim_feedforward=2 * d, dropout=0.0, batch_first=True)
        self.head = nn.Linear(d, n_out)

    def forward(self, x):
        return self.head(self.block(self.emb(x) + self.pos).mean(1))


def gru(data: Data) -> nn.Module:
    return _GRU(int(data.x_tr.max()) + 1, data.n_out)


def transformer(data: Data) -> nn.Module:
    return _Transformer(int(data.x_tr.max()) + 1, data.x_tr.shape[1], data.n_out)


# ----------------------------------------------------------------------------- the families

def _t(name, kind, data, model, optimizer, batch, epochs, note, **kw) -> Task:
    return Task(name, kind, data, model, optimizer, batch, epochs, note, **kw)


# The earlier benchmarks' datasets (tuned on before): tuning only.
EARLIER = [
    _t("digits", "clf", _sk("load_digits", "clf"), mlp(128), "adam", 64, 15, "scikit-learn digits, 1,797 8x8 images"),
    _t("class20", "clf", _classification(6000, 40, 30, 20, sep=1.5), mlp(128), "adam", 64, 8,
       "20 classes, 6,000 samples"),
    _t("friedman", "reg", _regression("make_friedman1", 6000, noise=1.0), mlp(128), "adam", 64, 8,
       "Friedman #1, noise 1.0, MSE"),
]

# Pairs of one kind; one of each pair is for tuning, the other for evaluation (see the docstring).
PAIRS = [
    (_t("regression_linear", "reg", _regression("make_regression", 1000, n_features=20, n_informative=5, noise=10.0),
        mlp(32), "adam", 32, 30, "20 features (5 informative), noise 10, 1,000 samples, MSE"),
     _t("diabetes", "reg", _sk("load_diabetes", "reg"), mlp(64), "adam", 16, 40,
        "scikit-learn diabetes, 442 samples, MSE")),
    (_t("friedman_noisy_large", "reg", _regression("make_friedman1", 8000, noise=3.0), mlp(256), "adamw", 256, 12,
        "Friedman #1, noise 3.0, 8,000 samples, AdamW, MSE"),
     _t("friedman2", "reg", _regression("make_friedman2", 3000, noise=30.0), mlp(64, dropout=0.1), "adamw", 128, 20,
        "Friedman #2, noise 30, 3,000 samples, dropout 0.1, AdamW, MSE")),
    (_t("breast_cancer", "clf", _sk("load_breast_cancer", "clf"), mlp(32), "adam", 16, 20,
        "scikit-learn breast cancer, 569 samples, binary"),
     _t("binary_small", "clf", _classification(250, 10, 5, 2, flip=0.05), mlp(64), "adam", 16, 30,
        "binary, 250 samples, 5% label noise")),
    (_t("moons", "clf", _two_d("make_moons", 300, noise=0.3), mlp(16), "sgd", 16, 50,
        "two moons, 300 samples, SGD momentum 0.9"),
     _t("circles", "clf", _two_d("make_circles", 1000, noise=0.1, factor=0.5), mlp(32), "sgd", 32, 30,
        "two circles, 1,000 samples, SGD momentum 0.9")),
    (_t("wine", "clf", _sk("load_wine", "clf"), mlp(64), "rmsprop", 16, 40, "scikit-learn wine, 178 samples, 3 classes, RMSprop"),
     _t("iris", "clf", _sk("load_iris", "clf"), mlp(32), "rmsprop", 16, 50, "scikit-learn iris, 150 samples, 3 classes, RMSprop")),
    (_t("class50", "clf", _classification(10000, 40, 30, 50, sep=2.0), mlp(256), "adam", 256, 15,
        "50 classes, 10,000 samples, batch 256"),
     _t("class12_small", "clf", _classification(600, 20, 12, 12, sep=1.5), mlp(128), "adam", 32, 25,
        "12 classes, 600 samples")),
    (_t("class10_wide_dropout", "clf", _classification(8000, 30, 20, 10, flip=0.03), mlp(512, dropout=0.3), "adamw",
        128, 6, "10 classes, 8,000 samples, MLP 512 with dropout 0.3, AdamW weight decay 0.05",
        optimizer_kwargs={"weight_decay": 0.05}),
     _t("digits_dropout", "clf", _sk("load_digits", "clf"), mlp(256, dropout=0.2), "adamw", 32, 10,
        "digits, MLP 256 with dropout 0.2, AdamW")),
    (_t("shapes_cnn", "clf", _shapes(), cnn(), "sgd", 32, 5, "generated 12x12 strokes, 4 directions, small CNN, SGD momentum 0.9"),
     _t("digits_cnn_rmsprop", "clf", _sk("load_digits", "clf", images=True), cnn(), "rmsprop", 32, 8,
        "digits as 8x8 images, small CNN, RMSprop")),
    (_t("seq_gru", "clf", _sequences(4000, 16, 6, 3), gru, "adam", 64, 8, "generated sequences (16 tokens), majority group of 3, GRU"),
     _t("seq_transformer", "clf", _sequences(4000, 20, 12, 4), transformer, "adamw", 64, 8,
        "generated sequences (20 tokens), majority group of 4, one transformer layer, AdamW")),
    (_t("class10_rmsprop", "clf", _classification(6000, 20, 12, 10, sep=1.2), mlp(64), "rmsprop", 128, 10,
        "10 classes, 6,000 samples, RMSprop"),
     _t("regression_sgd", "reg", _regression("make_regression", 5000, n_features=30, n_informative=10, noise=5.0),
        mlp(64), "sgd", 64, 10, "30 features (10 informative), noise 5, 5,000 samples, SGD momentum 0.9, MSE")),
]
# random.Random(20261202).random() < 0.5, once per pair, in PAIRS' order.
_FLIPS = (True, True, False, True, False, False, True, True, True, True)

TUNING = EARLIER + [a if first else b for (a, b), first in zip(PAIRS, _FLIPS)]
EVALUATION = [b if first else a for (a, b), first in zip(PAIRS, _FLIPS)]
TASKS = {t.name: t for t in TUNING + EVALUATION}
SPLITS = {"tuning": [t.name for t in TUNING], "evaluation": [t.name for t in EVALUATION]}


def tasks_of(names: str) -> list[Task]:
    """``"tuning"``, ``"evaluation"``, or comma-separated task names."""
    if names in SPLITS:
        return [TASKS[n] for n in SPLITS[names]]
    unknown = [n for n in names.split(",") if n not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(unknown)}; choose from tuning, evaluation, {', '.join(TASKS)}")
    return [TASKS[n] for n in names.split(",")]


# ----------------------------------------------------------------------------- one case

def loss_fn(kind: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y) if kind == "clf" else F.mse_loss(out.squeeze(-1), y)


@torch.no_grad()
def score(kind: str, net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Validation score in points: accuracy in percent, or ``100 * max(R^2, 0)``."""
    was = net.training
    net.eval()
    out = net(x)
    net.train(was)
    if kind == "clf":
        return 100.0 * float((out.argmax(1) == y).float().mean())
    pred = out.squeeze(-1).double()
    if not torch.isfinite(pred).all():
        return 0.0
    r2 = 1.0 - float(((pred - y) ** 2).sum() / ((y - y.mean()) ** 2).sum())
    return 100.0 * max(r2, 0.0)


class Case:
    """One (task, seed): its data, and seeded weights and batch order, identical for every run."""

    def __init__(self, task: Task, seed: int) -> None:
        self.task, self.seed = task, seed
        self.data = task.data(seed)
        self.steps = task.steps(self.data)

    def net(self) -> nn.Module:
        torch.manual_seed(self.seed)  # the same initial weights for the finders and every training run
        return self.task.model(self.data)

    def loader(self) -> DataLoader:
        gen = torch.Generator().manual_seed(self.seed)  # the same batch order for every run
        return DataLoader(TensorDataset(self.data.x_tr, self.data.y_tr), batch_size=self.task.batch, shuffle=True,
                          drop_last=True, generator=gen)

    def val_loader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.data.x_va, self.data.y_va), batch_size=512)

    def loss(self, net: nn.Module, x, y) -> torch.Tensor:
        return loss_fn(self.task.kind, net(x), y)

    def score(self, net: nn.Module) -> float:
        return score(self.task.kind, net, self.data.x_va, self.data.y_va)

    def module(self, lr: float = 1e-3, groups: bool = False):
        """The case as a LightningModule (``self.lr``; ``val_loss`` logged), for finders and monitors.

        ``groups``: two parameter groups at the same LR, ``body`` (all but the last layer) and ``head``.
        """
        import lightning.pytorch as pl

        case = self

        class Module(pl.LightningModule):
            def __init__(self) -> None:
                super().__init__()
                self.lr = lr
                self.net = case.net()

            def training_step(self, batch, batch_idx):
                return case.loss(self.net, *batch)

            def validation_step(self, batch, batch_idx):
                self.log("val_loss", case.loss(self.net, *batch))

            def configure_optimizers(self):
                params = list(self.net.parameters())
                if groups:
                    head = list(list(self.net.children())[-1].parameters())
                    body = [p for p in params if all(p is not h for h in head)]
                    params = [{"params": body, "name": "body"}, {"params": head, "name": "head"}]
                return make_optimizer(case.task, params, self.lr)

        return Module()


def train(case: Case, lr: float, factor: Callable[[int], float] = lambda t: 1.0, steps: int | None = None) -> float:
    """Train ``steps`` (default: the task's budget) at LR ``lr * factor(t)``; the validation score.

    A non-finite loss ends the run (further steps cannot recover): what is left is scored.
    """
    steps = case.steps if steps is None else steps
    net = case.net()
    opt = make_optimizer(case.task, net.parameters(), lr)
    loader = case.loader()
    t = 0
    while t < steps:
        for x, y in loader:
            if t >= steps:
                break
            opt.param_groups[0]["lr"] = lr * factor(t)
            opt.zero_grad(set_to_none=True)
            loss = case.loss(net, x, y)
            if not torch.isfinite(loss):
                return case.score(net)
            loss.backward()
            opt.step()
            t += 1
    return case.score(net)


def log_grid(low: float = 1e-5, high: float = 1.0, points: int = 10) -> list[float]:
    return [float(v) for v in np.logspace(math.log10(low), math.log10(high), points)]
