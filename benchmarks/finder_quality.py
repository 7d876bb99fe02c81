"""How good are the LR finders' suggestions? lrfuse's finder (every method) and Lightning's against a grid.

For each dataset and seed, one range test with lrfuse's finder (``lrfuse.find_lr``; the four
suggestions ``auto``, ``steepest``, ``valley`` and ``min10`` are read from the one curve) and one
with Lightning's (``Tuner(trainer).lr_find``, its steepest-gradient suggestion), both sweeping the
same range (1e-5 .. 1, 100 steps) from the same seeded initial weights and batch order. Each
suggestion is then trained at the dataset's fixed budget (the same number of steps for every run
of a dataset) under three protocols, the LR as the peak of the schedule: a constant LR; linear
warm-up (10% of the steps) then cosine to 0; and one-cycle with ``LRSchedule("onecycle",
total_steps=steps)``'s defaults (warm-up over the first 30% from peak/25, cosine annealing to
peak/25e4). ``lrfuse:auto+schedule`` is what ``LRFinder`` does by default: it reads the
``LRSchedule`` callback of its trainer, and its suggestion is that schedule's peak (the constant
pick divided by the schedule's mean factor, capped at the LR of the smoothed loss minimum); under
the constant protocol there is no schedule and it is ``lrfuse:auto``'s LR. The sweep runs once, in
a trainer holding the warm-up + cosine protocol's callback; the one-cycle suggestion is read from
the same curve with the mean factor the finder computes for the one-cycle protocol's callback (the
sweep itself does not depend on the callback). ``lrfuse:auto+schedule-nocap`` is the ablation
without the cap at the loss minimum. The reference is a 10-point log grid (1e-5 .. 1) trained the same way: the grid's
best validation score. Reported per method, per dataset and pooled: the median and worst gap to
the grid's best (points), the share of (seed, protocol) cases within 1 point, the spread of the
suggestion across seeds (std of log10 lr, decades, per protocol, the worse one), its bias against the grid's best LR, the cost
in training steps, and silent failures (no suggestion, or a suggestion within a decade of the
sweep's minimum LR).

    python benchmarks/finder_quality.py                 # the full run (6 seeds, 5 datasets)
    python benchmarks/finder_quality.py --smoke         # CI: 1 dataset, 1 seed, tiny budget, every protocol
    python benchmarks/finder_quality.py --datasets digits,friedman --seeds 0 1 2 --json out.json
    python benchmarks/finder_quality.py --merge a.json b.json --json all.json   # runs made side by side

Datasets (bundled with scikit-learn or generated; nothing is downloaded):

- ``digits``: scikit-learn's 8x8 digits (1,797 images), an MLP 64-128-128-10; 30% for validation.
- ``digits_cnn``: the same images as 1x8x8 inputs to a small CNN (conv 16, conv 32, pool, linear).
- ``class2``: ``make_classification`` 2 classes, 20 features (10 informative), 3% label noise; an
  MLP; a new dataset per seed.
- ``class20``: ``make_classification`` 20 classes, 40 features (30 informative); an MLP.
- ``friedman``: ``make_friedman1`` regression (10 features, noise 1.0), MSE loss on a standardized
  target; score ``100 * max(R^2, 0)`` on validation (a diverged run scores 0, like predicting the mean).

Classification scores are validation accuracy in percent, so a "point" is one percentage point
everywhere. Training runs use a plain loop (``lrfuse.FusedAdam``, batch 64, LR factor from
``lrfuse.schedules``, the same math as the ``LRSchedule`` callback); the finders run in Lightning.
Each seed fixes the data split (or generated dataset), the initial weights (the finders sweep from
the same weights every run starts from) and the batch order. CPU, one thread, deterministic.

When a finder makes no suggestion, the LR is left as it was (lrfuse's ``LRFinder`` does that, and
Lightning's ``update_attr`` too); the case is then trained at the model's default 1e-3, scored like
the others, and counted as a failure.

Issue 11's targets, checked per method: median gap <= 0.5 points, >= 85% of cases within 1 point,
worst gap <= 3 points, spread <= 0.15 decades (on the worst dataset), finder cost (sweep plus the
one training run) <= 1/5 of the grid's.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

LRFUSE_METHODS = ("auto", "steepest", "valley", "min10")
# Schedule-aware: LRFinder's default, which reads the LRSchedule callback of its trainer (none under
# the constant protocol, so the same LR as lrfuse:auto there). "-nocap": the ablation without the
# cap at the loss minimum (constant pick / mean factor alone), benchmark-only.
SCHEDULE_METHODS = ("lrfuse:auto+schedule", "lrfuse:auto+schedule-nocap")
METHODS = tuple(f"lrfuse:{m}" for m in LRFUSE_METHODS) + SCHEDULE_METHODS + ("lightning",)
PROTOCOLS = ("constant", "warmup_cosine", "onecycle")
GRID_RANGE = (1e-5, 1.0)
FALLBACK_LR = 1e-3  # the model's LR, kept when a finder makes no suggestion
BATCH = 64
TARGETS = dict(median_gap=0.5, within1=0.85, worst_gap=3.0, spread=0.15, cost=0.2)


@dataclass(frozen=True)
class Spec:
    """One dataset family: how to make it, the model, the fixed training budget."""

    name: str
    task: str  # "clf" or "reg"
    model: str  # "mlp" or "cnn"
    steps: int  # training steps of every run of this dataset


# Budgets chosen so the full run (5 datasets x 6 seeds x 2 protocols) took ~12 min on 2 shared vCPUs; with
# the third protocol, ~27 min one dataset at a time (digits_cnn ~14 of them) on the same, loaded, VM.
SPECS = {
    "digits": Spec("digits", "clf", "mlp", 300),
    "digits_cnn": Spec("digits_cnn", "clf", "cnn", 300),
    "class2": Spec("class2", "clf", "mlp", 300),
    "class20": Spec("class20", "clf", "mlp", 300),
    "friedman": Spec("friedman", "reg", "mlp", 300),
}


# ----------------------------------------------------------------------------- data and models

def make_data(name: str, seed: int):
    """``(x_train, y_train, x_val, y_val, n_out)`` as tensors; deterministic in ``seed``."""
    from sklearn.datasets import load_digits, make_classification, make_friedman1
    from sklearn.model_selection import train_test_split

    if name in ("digits", "digits_cnn"):
        x, y = load_digits(return_X_y=True)
        x_tr, x_va, y_tr, y_va = train_test_split(x / 16.0, y, test_size=0.3, stratify=y, random_state=seed)
        if name == "digits_cnn":
            x_tr, x_va = x_tr.reshape(-1, 1, 8, 8), x_va.reshape(-1, 1, 8, 8)
        return _tensors(x_tr, y_tr, x_va, y_va, classification=True) + (10,)
    if name == "class2":
        x, y = make_classification(n_samples=6000, n_features=20, n_informative=10, n_redundant=4, n_classes=2,
                                   flip_y=0.03, class_sep=0.8, random_state=seed)
        n_out = 2
    elif name == "class20":
        x, y = make_classification(n_samples=6000, n_features=40, n_informative=30, n_redundant=5, n_classes=20,
                                   n_clusters_per_class=1, flip_y=0.01, class_sep=1.5, random_state=seed)
        n_out = 20
    elif name == "friedman":
        x, y = make_friedman1(n_samples=6000, n_features=10, noise=1.0, random_state=seed)
        n_out = 1
    else:
        raise ValueError(f"unknown dataset {name!r}")
    x_tr, x_va, y_tr, y_va = train_test_split(x, y, test_size=0.5, random_state=seed)
    mu, sd = x_tr.mean(0), x_tr.std(0) + 1e-8
    x_tr, x_va = (x_tr - mu) / sd, (x_va - mu) / sd
    if name == "friedman":
        ym, ys = y_tr.mean(), y_tr.std()
        y_tr, y_va = (y_tr - ym) / ys, (y_va - ym) / ys
        return _tensors(x_tr, y_tr, x_va, y_va, classification=False) + (n_out,)
    return _tensors(x_tr, y_tr, x_va, y_va, classification=True) + (n_out,)


def _tensors(x_tr, y_tr, x_va, y_va, classification: bool):
    ydt = torch.long if classification else torch.float32
    return (torch.tensor(x_tr, dtype=torch.float32), torch.tensor(y_tr, dtype=ydt),
            torch.tensor(x_va, dtype=torch.float32), torch.tensor(y_va, dtype=ydt))


def make_net(spec: Spec, n_in: int, n_out: int) -> nn.Module:
    if spec.model == "cnn":
        return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                             nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 4 * 4, n_out))
    return nn.Sequential(nn.Linear(n_in, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, n_out))


def loss_fn(task: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y) if task == "clf" else F.mse_loss(out.squeeze(-1), y)


@torch.no_grad()
def score(task: str, net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Validation score in points: accuracy in percent, or 100 * max(R^2, 0)."""
    net.eval()
    out = net(x)
    net.train()
    if task == "clf":
        return 100.0 * float((out.argmax(1) == y).float().mean())
    pred = out.squeeze(-1).double()
    if not torch.isfinite(pred).all():
        return 0.0
    r2 = 1.0 - float(((pred - y) ** 2).sum() / ((y - y.mean()) ** 2).sum())
    return 100.0 * max(r2, 0.0)


class Case:
    """One (dataset, seed): its data and a seeded model / loader, identical for every run."""

    def __init__(self, spec: Spec, seed: int) -> None:
        self.spec, self.seed = spec, seed
        self.x_tr, self.y_tr, self.x_va, self.y_va, self.n_out = make_data(spec.name, seed)
        self.n_in = self.x_tr.shape[1]

    def net(self) -> nn.Module:
        torch.manual_seed(self.seed)  # the same initial weights for the finders and every training run
        return make_net(self.spec, self.n_in, self.n_out)

    def loader(self) -> DataLoader:
        gen = torch.Generator().manual_seed(self.seed)  # the same batch order for every run
        return DataLoader(TensorDataset(self.x_tr, self.y_tr), batch_size=BATCH, shuffle=True, drop_last=True,
                          generator=gen)


def protocol_schedule(protocol: str, steps: int):
    """``(LRSchedule callback, its factor function)`` of a protocol; ``(None, constant)`` for constant.

    ``onecycle`` uses the callback's and ``make_schedule``'s defaults (``pct_start=0.3``,
    ``div_factor=25``, ``final_div_factor=1e4``): what a user gets from ``LRSchedule("onecycle")``.
    """
    from lrfuse.lightning import LRSchedule
    from lrfuse.schedules import make_schedule

    if protocol == "constant":
        return None, make_schedule("constant")
    if protocol == "onecycle":
        return LRSchedule("onecycle", total_steps=steps), make_schedule("onecycle", total_steps=steps)
    if protocol != "warmup_cosine":
        raise ValueError(f"unknown protocol {protocol!r}")
    kwargs = dict(total_steps=steps, warmup_steps=max(1, steps // 10))
    return LRSchedule("cosine", **kwargs), make_schedule("cosine", **kwargs)


def train(case: Case, lr: float, protocol: str, steps: int) -> float:
    """Train ``steps`` steps of FusedAdam at peak ``lr`` under ``protocol``; the validation score."""
    import lrfuse

    net = case.net()
    opt = lrfuse.FusedAdam(net.parameters(), lr=lr)
    _, sched = protocol_schedule(protocol, steps)
    loader = case.loader()
    t = 0
    while t < steps:
        for x, y in loader:
            if t >= steps:
                break
            opt.param_groups[0]["lr"] = lr * sched(t)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(case.spec.task, net(x), y)
            if not torch.isfinite(loss):  # diverged: further steps cannot recover; score what is left
                return score(case.spec.task, net, case.x_va, case.y_va)
            loss.backward()
            opt.step()
            t += 1
    return score(case.spec.task, net, case.x_va, case.y_va)


# ----------------------------------------------------------------------------- finders

def _module(case: Case):
    import lightning.pytorch as pl

    import lrfuse

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.lr = FALLBACK_LR
            self.net = case.net()

        def training_step(self, batch, batch_idx):
            x, y = batch
            return loss_fn(case.spec.task, self.net(x), y)

        def configure_optimizers(self):
            return lrfuse.FusedAdam(self.parameters(), lr=self.lr)

    return Module()


def _trainer(root: str, **kwargs):
    import lightning.pytorch as pl

    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_model_summary=False, enable_progress_bar=False, num_sanity_val_steps=0,
                      default_root_dir=root, **kwargs)


def run_lrfuse(case: Case, finder: dict, root: str, steps: int, protocols=PROTOCOLS) -> tuple[dict[str, dict[str, float | None]], int]:
    """One lrfuse sweep; per protocol, the suggestion of every method from its curve, and the steps it took.

    The sweep runs in a trainer holding the warm-up + cosine protocol's ``LRSchedule`` callback, so
    ``find_lr``'s own suggestion is the schedule-aware one (the finder detects the callback). The
    other scheduled protocols' suggestions are read from the same curve with the mean factor the
    finder computes for their callback (``lrfuse.lightning.finder.schedule_mean``), which is what
    ``LRFinder`` suggests in a trainer holding that callback: the sweep does not depend on it. The
    schedule-blind methods are read from the same curve with ``schedule_mean=1``.
    """
    import lightning.pytorch as pl

    from lrfuse import find_lr
    from lrfuse.lightning.finder import schedule_mean
    from lrfuse.schedules import mean_factor

    pl.seed_everything(case.seed, verbose=False)
    callback, fn = protocol_schedule("warmup_cosine", steps)
    trainer = _trainer(root, max_epochs=1, callbacks=[callback])
    result = find_lr(trainer, _module(case), train_dataloaders=case.loader(), **finder)
    assert result.schedule_mean == mean_factor(fn, steps) and result.suggest("auto").lr == result.lr
    blind = {f"lrfuse:{m}": result.suggest(m, schedule_mean=1.0).lr for m in LRFUSE_METHODS}
    auto = blind["lrfuse:auto"]
    out = {}
    for protocol in protocols:
        if protocol == "constant":
            out[protocol] = {**blind, "lrfuse:auto+schedule": auto, "lrfuse:auto+schedule-nocap": auto}
            continue
        cb, fn = protocol_schedule(protocol, steps)
        mean, _ = schedule_mean(trainer, cb)
        assert mean == mean_factor(fn, steps)
        aware = result.suggest("auto", schedule_mean=mean).lr
        assert protocol != "warmup_cosine" or aware == result.lr
        out[protocol] = {**blind, "lrfuse:auto+schedule": aware,
                         "lrfuse:auto+schedule-nocap": None if auto is None else auto / mean}
    return out, len(result.lrs)


def run_lightning(case: Case, finder: dict, root: str) -> tuple[float | None, int]:
    """Lightning's own range test (``Tuner.lr_find``); its suggestion and the steps it took."""
    import lightning.pytorch as pl
    from lightning.pytorch.tuner import Tuner

    pl.seed_everything(case.seed, verbose=False)
    trainer = _trainer(root, max_epochs=-1)
    lf = Tuner(trainer).lr_find(_module(case), train_dataloaders=case.loader(), min_lr=finder["min_lr"],
                                max_lr=finder["max_lr"], num_training=finder["num_steps"], update_attr=False)
    return lf.suggestion(), len(lf.results["lr"])


# ----------------------------------------------------------------------------- the benchmark

def run_case(spec: Spec, seed: int, grid: np.ndarray, finder: dict, steps: int, root: str,
             protocols=PROTOCOLS) -> dict:
    case = Case(spec, seed)
    cache: dict[tuple[str, float], float] = {}

    def trained(lr: float, protocol: str) -> float:
        key = (protocol, float(lr))
        if key not in cache:
            cache[key] = train(case, float(lr), protocol, steps)
        return cache[key]

    t0 = time.perf_counter()
    suggestions, lrfuse_steps = run_lrfuse(case, finder, root, steps, protocols)
    light, light_steps = run_lightning(case, finder, root)
    for protocol in protocols:
        suggestions[protocol]["lightning"] = light
    finder_steps = {m: light_steps if m == "lightning" else lrfuse_steps for m in METHODS}
    t1 = time.perf_counter()
    out = {"dataset": spec.name, "seed": seed, "steps": steps, "suggested": suggestions,
           "finder_steps": finder_steps, "protocols": {}}
    for protocol in protocols:
        grid_scores = [trained(lr, protocol) for lr in grid]
        best_i = int(np.argmax(grid_scores))
        methods = {}
        for m in METHODS:
            lr = suggestions[protocol][m]
            failure = None
            if lr is None:
                failure = "none"
            elif lr < 10 * finder["min_lr"]:
                failure = "collapse"
            used = FALLBACK_LR if lr is None else lr
            s = trained(used, protocol)
            methods[m] = {"lr": lr, "trained_lr": used, "score": s, "gap": grid_scores[best_i] - s,
                          "failure": failure}
        out["protocols"][protocol] = {"grid": [[float(lr), s] for lr, s in zip(grid, grid_scores)],
                                      "best_lr": float(grid[best_i]), "best_score": grid_scores[best_i],
                                      "methods": methods}
    out["seconds"] = {"finders": t1 - t0, "training": time.perf_counter() - t1}
    out["grid_steps"] = len(grid) * steps
    return out


def summarize(cases: list[dict], methods=METHODS) -> dict:
    """Per method: the statistics of the report over ``cases`` (any subset: a dataset, a protocol)."""
    out = {}
    datasets = sorted({c["dataset"] for c in cases})
    for m in methods:
        gaps, within, bias, fails, cost, cost_total = [], [], [], 0, [], []
        n_cases = 0
        for c in cases:
            for protocol, p in c["protocols"].items():
                r = p["methods"][m]
                n_cases += 1
                gaps.append(r["gap"])
                within.append(r["gap"] <= 1.0)
                fails += r["failure"] is not None
                if r["lr"] is not None:
                    bias.append(math.log10(r["lr"] / p["best_lr"]))
            cost.append(c["finder_steps"][m] / c["grid_steps"])
            cost_total.append((c["finder_steps"][m] + c["steps"]) / c["grid_steps"])
        spreads = {}
        for d in datasets:  # the worst protocol: a schedule-aware suggestion differs between them
            per_protocol = [[math.log10(c["suggested"][p][m]) for c in cases if c["dataset"] == d
                             and p in c["protocols"] and c["suggested"][p][m]] for p in PROTOCOLS]
            spreads[d] = max(float(np.std(logs)) if len(logs) > 1 else 0.0 for logs in per_protocol)
        out[m] = {"cases": n_cases, "median_gap": float(np.median(gaps)), "worst_gap": float(np.max(gaps)),
                  "mean_gap": float(np.mean(gaps)), "within1": float(np.mean(within)),
                  "spread": max(spreads.values()), "spread_by_dataset": spreads,
                  "bias": float(np.median(bias)) if bias else None,
                  "cost": float(np.mean(cost)), "cost_total": float(np.mean(cost_total)), "failures": fails}
        s = out[m]
        s["targets"] = {"median_gap": s["median_gap"] <= TARGETS["median_gap"],
                        "within1": s["within1"] >= TARGETS["within1"],
                        "worst_gap": s["worst_gap"] <= TARGETS["worst_gap"],
                        "spread": s["spread"] <= TARGETS["spread"],
                        "cost": s["cost_total"] <= TARGETS["cost"]}
    return out


def grid_spread(cases: list[dict], protocol: str) -> float:
    """The grid's own best LR across seeds (std of log10, worst dataset): the reference's spread."""
    spreads = []
    for d in sorted({c["dataset"] for c in cases}):
        logs = [math.log10(c["protocols"][protocol]["best_lr"]) for c in cases if c["dataset"] == d]
        spreads.append(float(np.std(logs)) if len(logs) > 1 else 0.0)
    return max(spreads)


def _row(label: str, m: str, s: dict) -> str:
    met = sum(s["targets"].values())
    bias = "-" if s["bias"] is None else f"{s['bias']:+.2f}"
    return (f"| {label} | {m} | {s['median_gap']:.2f} | {s['worst_gap']:.2f} | {100 * s['within1']:.0f}% | "
            f"{s['spread']:.2f} | {bias} | {s['cost']:.3f} / {s['cost_total']:.3f} | {s['failures']} | {met}/5 |")


HEADER = ("| cases | method | median gap | worst gap | within 1 pt | spread (dec) | bias (dec) | "
          "cost: sweep / +run | failures | targets |\n|---|---|--:|--:|--:|--:|--:|--:|--:|--:|")


def protocols_of(cases: list[dict]) -> list[str]:
    """The protocols the cases were trained under, in PROTOCOLS' order (every case has each)."""
    present = [p for p in PROTOCOLS if any(p in c["protocols"] for c in cases)]
    missing = [(c["dataset"], c["seed"]) for c in cases if set(c["protocols"]) != set(present)]
    if missing:
        raise SystemExit(f"cases {missing} lack some of the protocols {present}; report them apart")
    return present


def report(cases: list[dict]) -> tuple[str, dict]:
    protocols = protocols_of(cases)
    summary = {"pooled": summarize(cases),
               "by_protocol": {p: summarize([_only(c, p) for c in cases]) for p in protocols},
               "by_dataset": {}, "by_dataset_protocol": {}, "grid_best_spread": {}}
    lines = [HEADER]
    for m in METHODS:
        lines.append(_row("all", m, summary["pooled"][m]))
    for p in protocols:
        summary["grid_best_spread"][p] = grid_spread(cases, p)
        for m in METHODS:
            lines.append(_row(p, m, summary["by_protocol"][p][m]))
    lines.append("")
    lines.append(HEADER)
    for d in sorted({c["dataset"] for c in cases}, key=list(SPECS).index):
        sub = [c for c in cases if c["dataset"] == d]
        summary["by_dataset"][d] = summarize(sub)
        summary["by_dataset_protocol"][d] = {p: summarize([_only(c, p) for c in sub]) for p in protocols}
        for m in METHODS:
            lines.append(_row(d, m, summary["by_dataset"][d][m]))
    lines.append("")
    lines.append("| dataset | protocol | grid best LR per seed | best score (median) | "
                 + " | ".join(f"{m} gap" for m in METHODS) + " |")
    lines.append("|---|---|---|--:|" + "--:|" * len(METHODS))
    for d in summary["by_dataset"]:
        for p in protocols:
            sub = [c for c in cases if c["dataset"] == d]
            best = " ".join(f"{c['protocols'][p]['best_lr']:.0e}" for c in sub)
            med = float(np.median([c["protocols"][p]["best_score"] for c in sub]))
            gaps = " | ".join(f"{summary['by_dataset_protocol'][d][p][m]['median_gap']:.2f}" for m in METHODS)
            lines.append(f"| {d} | {p} | {best} | {med:.2f} | {gaps} |")
    return "\n".join(lines), summary


def _only(case: dict, protocol: str) -> dict:
    return {**case, "protocols": {protocol: case["protocols"][protocol]}}


def merge(paths: list[str], out: str | None) -> int:
    """Report the cases of several runs (same grid, finder and budgets) as one."""
    runs = [json.load(open(p)) for p in paths]
    keys = ("grid", "finder", "batch", "threads")
    for run in runs[1:]:
        if any(run["meta"][k] != runs[0]["meta"][k] for k in keys):
            raise SystemExit(f"--merge: the runs differ in {', '.join(k for k in keys if run['meta'][k] != runs[0]['meta'][k])}")
    cases = [c for run in runs for c in run["cases"]]
    table, summary = report(cases)
    print(table)
    meta = {**runs[0]["meta"], "merged": [r["meta"]["argv"] for r in runs],
            "seconds": sum(r["meta"]["seconds"] for r in runs), "wall_seconds": max(r["meta"]["seconds"] for r in runs),
            "process_seconds": sum(r["meta"].get("process_seconds", math.nan) for r in runs),
            "protocols": protocols_of(cases),
            "datasets": list(dict.fromkeys(d for r in runs for d in r["meta"]["datasets"])),
            "seeds": {d: sorted({c["seed"] for c in cases if c["dataset"] == d}) for d in {c["dataset"] for c in cases}},
            "steps": {k: v for r in runs for k, v in r["meta"]["steps"].items()}}
    if out:
        with open(out, "w") as f:
            json.dump({"meta": meta, "summary": summary, "cases": cases, "table": table}, f, indent=1)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="1 dataset, 1 seed, tiny budget, 4 grid points (CI)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0..5 (smoke: 0)")
    parser.add_argument("--datasets", default=None, help=f"comma-separated, of {','.join(SPECS)} (default all)")
    parser.add_argument("--steps", type=int, default=None, help="override every dataset's training budget")
    parser.add_argument("--grid", type=int, default=None, help="grid points over 1e-5 .. 1 (default 10)")
    parser.add_argument("--finder-steps", type=int, default=None, help="range-test steps (default 100)")
    parser.add_argument("--protocols", default=None,
                        help=f"comma-separated, of {','.join(PROTOCOLS)} (default all, smoke too)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results", "finder_quality.json"))
    parser.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                        help="report the cases of earlier runs' JSON files together (e.g. one run per dataset, "
                             "run side by side) instead of running")
    args = parser.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.json)

    datasets = (args.datasets.split(",") if args.datasets else (["digits"] if args.smoke else list(SPECS)))
    unknown = [d for d in datasets if d not in SPECS]
    if unknown:
        parser.error(f"unknown dataset(s) {', '.join(unknown)}; choose from {', '.join(SPECS)}")
    protocols = [p for p in PROTOCOLS if p in args.protocols.split(",")] if args.protocols else list(PROTOCOLS)
    if args.protocols and (not protocols or set(args.protocols.split(",")) - set(PROTOCOLS)):
        parser.error(f"--protocols: choose from {', '.join(PROTOCOLS)}")
    seeds = args.seeds if args.seeds is not None else ([0] if args.smoke else list(range(6)))
    n_grid = args.grid or (4 if args.smoke else 10)
    finder = dict(min_lr=GRID_RANGE[0], max_lr=GRID_RANGE[1], num_steps=args.finder_steps or (40 if args.smoke else 100))
    grid = np.logspace(math.log10(GRID_RANGE[0]), math.log10(GRID_RANGE[1]), n_grid)

    torch.set_num_threads(args.threads)
    import functools

    import lightning.pytorch.tuner.lr_finder as lightning_lr_finder  # then quiet Lightning: importing it
    # sets its loggers to INFO, and its lr_find always shows a progress bar
    lightning_lr_finder.tqdm = functools.partial(lightning_lr_finder.tqdm, disable=True)

    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)

    start = time.perf_counter()
    cases = []
    with tempfile.TemporaryDirectory() as root:  # Lightning's finder writes a checkpoint there
        for d in datasets:
            spec = SPECS[d]
            steps = args.steps or (60 if args.smoke else spec.steps)
            for seed in seeds:
                c = run_case(spec, seed, grid, finder, steps, root, protocols)
                cases.append(c)
                sug = "  ".join(f"{m} {v:.2g}" if v else f"{m} -" for m, v in c["suggested"]["constant"].items()
                                if m not in SCHEDULE_METHODS)
                for p in protocols[1:] if protocols[0] == "constant" else protocols:
                    aware = c["suggested"][p]["lrfuse:auto+schedule"]
                    sug += f"  auto+schedule ({p}) {aware:.2g}" if aware else f"  auto+schedule ({p}) -"
                best = "  ".join(f"{p} {c['protocols'][p]['best_lr']:.0e}:{c['protocols'][p]['best_score']:.1f}"
                                 for p in protocols)
                print(f"{d} seed {seed}: {sug} | grid best {best} | "
                      f"{c['seconds']['finders']:.1f}+{c['seconds']['training']:.1f} s", flush=True)
    total = time.perf_counter() - start
    table, summary = report(cases)
    print()
    print(table)
    spread = summary["grid_best_spread"]
    print("\nthe grid's own best LR across seeds, std of log10 (worst dataset): "
          + ", ".join(f"{p} {v:.2f}" for p, v in spread.items()))
    print(f"\n{len(cases)} (dataset, seed) cases x {len(protocols)} protocols in {total:.0f} s "
          f"({time.process_time():.0f} s process time)")
    import lightning
    import sklearn

    import lrfuse
    meta = {"date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "seconds": total,
            "argv": sys.argv[1:] if argv is None else argv, "datasets": datasets, "seeds": seeds,
            "protocols": protocols, "process_seconds": time.process_time(),
            "grid": grid.tolist(), "finder": finder, "fallback_lr": FALLBACK_LR, "batch": BATCH,
            "steps": {d: args.steps or (60 if args.smoke else SPECS[d].steps) for d in datasets},
            "targets": TARGETS, "threads": args.threads,
            "versions": {"torch": torch.__version__, "lightning": lightning.__version__,
                         "sklearn": sklearn.__version__, "lrfuse": lrfuse.__version__,
                         "python": platform.python_version()},
            "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}}
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "summary": summary, "cases": cases, "table": table}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
