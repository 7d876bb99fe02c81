"""LR search on Ray Tune against the finder alone and a full grid: which LR, how good, at what cost.

For each task of ``tasks.py`` (its data, model, optimizer, seeds and scores), every method trains
the same seeded model with the task's optimizer at a constant LR for the same budget of steps,
validating every ``budget / 10`` steps, and is judged by the validation score of the LR it picks
(accuracy in percent, or ``100 * max(R^2, 0)``), in points:

- ``finder``: lrfuse's ``find_lr`` (range test of 100 steps over 1e-5 .. 1 and its race, in a
  trainer of the run's length), then one training run at its suggestion;
- ``race``, ``random``, ``pbt``: :func:`lrfuse.search_lr` over the finder's plausible range (its default);
- ``grid``: :func:`lrfuse.search_lr` with a log grid over the whole range 1e-5 .. 1, which is also the
  reference: the best score any of its LRs reached.

Reported per method: the score of its pick and the gap to the full grid's best, its LR against the
grid's best LR (decades), and the cost in training steps (the finder's included) and wall time (Ray
start-up excluded; trials run two at a time on the 2-core VM, so wall time is not steps / speed).

    python benchmarks/search_quality.py            # digits and class20, 8-point grid, budget 300
    python benchmarks/search_quality.py --datasets wine,class50,friedman2 --seeds 0 1 2   # the README's
    python benchmarks/search_quality.py --smoke    # CI: digits, tiny budget, 2 trials a method
    python benchmarks/search_quality.py --render results/search_quality.json   # its tables again
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
METHODS = ("finder", "race", "random", "pbt", "grid")
FULL_RANGE = (1e-5, 1.0)


sys.path.insert(0, str(HERE))
import tasks  # noqa: E402  (the benchmarks' tasks: data, models, seeds and scores)

FALLBACK_LR = 1e-3  # the model's LR, kept when the finder makes no suggestion


def _trainer(root: str, **kwargs):
    import lightning.pytorch as pl

    from lrfuse.lightning.runtime import quiet_trainer

    return pl.Trainer(**quiet_trainer(default_root_dir=root, **kwargs))


def lightning_pieces(case):
    """A LightningModule and DataModule over one ``tasks.Case``: its seeded net, its loader."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset


    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.lr = FALLBACK_LR
            self.net = case.net()  # seeded: the same weights in every method

        def training_step(self, batch, batch_idx):
            return case.loss(self.net, *batch)

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_loss", case.loss(self.net, x, y))
            self.log("val_score", tasks.score(case.task.kind, self.net, x, y))

        def configure_optimizers(self):
            return tasks.make_optimizer(case.task, self.parameters(), self.lr)

    class Data(pl.LightningDataModule):
        def train_dataloader(self):
            return case.loader()  # its own seeded generator: the same batch order every run

        def val_dataloader(self):
            return DataLoader(TensorDataset(case.data.x_va, case.data.y_va), batch_size=len(case.data.y_va))

    return Module, Data


def run_dataset(name: str, seed: int, budget: int, grid_points: int, trials: dict, storage: str, reports: int = 10,
                finder_steps: int = 100) -> dict:
    import lightning.pytorch as pl

    from lrfuse.lightning.finder import find_lr
    from lrfuse.lightning.search import search_lr

    case = tasks.Case(tasks.TASKS[name], seed)
    Module, Data = lightning_pieces(case)
    out = {"dataset": name, "seed": seed, "budget": budget, "methods": {}}
    common = dict(max_steps=budget, eval_every=max(1, budget // reports), metric="val_score", mode="max", seed=seed,
                  storage_path=storage)

    # The finder alone: its sweep, then one run at the suggestion (the same Trainer path as a trial).
    t0 = time.perf_counter()
    pl.seed_everything(seed, verbose=False)
    # The finder in a trainer set up as the run (its length: the race trains a fifth of it per candidate).
    finder = find_lr(_trainer(storage, max_steps=budget), Module(), datamodule=Data(), min_lr=FULL_RANGE[0],
                     max_lr=FULL_RANGE[1], num_steps=finder_steps)
    finder_seconds = time.perf_counter() - t0
    finder_cost = len(finder.lrs) + (len(finder.race["lrs"]) * finder.race["steps"] if finder.race else 0)
    lr = finder.lr if finder.lr is not None else FALLBACK_LR
    single = search_lr(Module(), Data(), "grid", trials=1, min_lr=lr / 1.0001, max_lr=lr * 1.0001, **common)
    (run,) = single.trials
    out["finder"] = {"lr": finder.lr, "low": finder.low, "high": finder.high, "steps": finder_cost,
                     "method": finder.method}
    out["methods"]["finder"] = _entry(run.lr, run.value, finder_cost + run.steps, finder_seconds + run.seconds)

    searches = {
        "race": dict(method="race", trials=trials["race"]),
        "random": dict(method="random", trials=trials["random"]),
        "pbt": dict(method="pbt", trials=trials["pbt"], perturbation_interval=2),
        "grid": dict(method="grid", trials=grid_points, min_lr=FULL_RANGE[0], max_lr=FULL_RANGE[1]),
    }
    for method, kwargs in searches.items():
        if "min_lr" not in kwargs:  # the default search space: the finder's plausible range
            kwargs.update(min_lr=finder.low, max_lr=finder.high)
        result = search_lr(Module(), Data(), **kwargs, **common)
        best = result.best
        cost = result.total_steps + (0 if method == "grid" else finder_cost)
        seconds = sum(t.seconds for t in result.trials) + (0 if method == "grid" else finder_seconds)
        out["methods"][method] = _entry(result.lr, best.value if best else math.nan, cost, seconds)
        out["methods"][method]["trials"] = [{"lr": t.lr, "value": t.value, "steps": t.steps, "stop": t.stop,
                                             "verdict": t.verdict} for t in result.trials]
        out["methods"][method]["search_seconds"] = result.seconds
    grid = out["methods"]["grid"]["trials"]
    best = max(grid, key=lambda t: t["value"] if math.isfinite(t["value"]) else -math.inf)
    out["grid_best"] = {"lr": best["lr"], "value": best["value"]}
    for m in out["methods"].values():
        m["gap"] = best["value"] - m["value"]
        m["lr_vs_grid"] = None if not m["lr"] else math.log10(m["lr"] / best["lr"])
    return out


def _entry(lr, value, steps, seconds) -> dict:
    return {"lr": lr, "value": value, "steps": int(steps), "seconds": seconds}


def table(results: list[dict]) -> str:
    lines = ["| dataset | method | LR picked | score | gap to grid's best | LR vs grid's best (dec) | "
             "steps | x full run | trial wall s |", "|---|---|--:|--:|--:|--:|--:|--:|--:|"]
    for r in results:
        for m in METHODS:
            e = r["methods"][m]
            lr = "-" if not e["lr"] else f"{e['lr']:.2g}"
            dec = "-" if e["lr_vs_grid"] is None else f"{e['lr_vs_grid']:+.2f}"
            lines.append(f"| {r['dataset']} (seed {r['seed']}) | {m} | {lr} | {e['value']:.2f} | {e['gap']:.2f} | {dec} | "
                         f"{e['steps']} | {e['steps'] / r['budget']:.1f} | {e['seconds']:.0f} |")
    return "\n".join(lines)


def summary(results: list[dict]) -> str:
    """Per method over every dataset-seed: the gap to the grid's best (median, worst, how many within
    1 point), the cost in full runs (median) and the trials' wall time (sum)."""
    lines = ["| method | cases | median gap | worst gap | within 1 pt | cost, x full run (median) | trial wall s (sum) |",
             "|---|--:|--:|--:|--:|--:|--:|"]
    for m in METHODS:
        entries = [(r["methods"][m], r["budget"]) for r in results]
        gaps = [e["gap"] for e, _ in entries]
        costs = [e["steps"] / budget for e, budget in entries]
        lines.append(f"| {m} | {len(entries)} | {statistics.median(gaps):.2f} | {max(gaps):.2f} | "
                     f"{sum(g <= 1 for g in gaps)}/{len(gaps)} | {statistics.median(costs):.1f} | "
                     f"{sum(e['seconds'] for e, _ in entries):.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true",
                        help="digits only, budget 20 in 4 reports, a 40-step finder, 2 trials a method (CI)")
    parser.add_argument("--datasets", default=None, help="comma-separated tasks of benchmarks/tasks.py "
                                                        "(default digits,class20)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--budget", type=int, default=None, help="training steps of a run (default 300; smoke 20)")
    parser.add_argument("--grid", type=int, default=None, help="full-grid points (default 8; smoke 2)")
    parser.add_argument("--num-cpus", type=int, default=None)
    parser.add_argument("--storage", default=None, help="Tune's folder (default: a temporary one)")
    parser.add_argument("--json", default=str(HERE / "results" / "search_quality.json"))
    parser.add_argument("--render", default=None, metavar="JSON",
                        help="print the tables of a saved run (e.g. results/search_quality.json) and exit")
    args = parser.parse_args(argv)
    if args.render:
        with open(args.render) as f:
            saved = json.load(f)["results"]
        print(f"{summary(saved)}\n\n{table(saved)}")
        return 0
    datasets = args.datasets.split(",") if args.datasets else (["digits"] if args.smoke else ["digits", "class20"])
    unknown = [d for d in datasets if d not in tasks.TASKS]
    if unknown:
        parser.error(f"unknown dataset(s) {', '.join(unknown)}; choose from {', '.join(tasks.TASKS)}")
    budget = args.budget or (20 if args.smoke else 300)
    grid_points = args.grid or (2 if args.smoke else 8)
    trials = {"race": 2, "random": 2, "pbt": 2} if args.smoke else {"race": 8, "random": 4, "pbt": 4}

    import tempfile

    from lrfuse.lightning.runtime import quiet_logs

    warnings.filterwarnings("ignore")
    quiet_logs("ray")
    torch.set_num_threads(1)
    from lrfuse.lightning.search import cluster

    start = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        # One Ray for every search, its session folders (logs, sockets) in tmp: removed with it.
        started = cluster.init(num_cpus=args.num_cpus, session_dir=cluster.session_dir_in(tmp))
        try:
            from ray import cloudpickle

            # The trial workers cannot import these scripts: their classes travel by value.
            cloudpickle.register_pickle_by_value(sys.modules[__name__])
            cloudpickle.register_pickle_by_value(tasks)
            for name in datasets:
                for seed in args.seeds:
                    # The smoke run checks the plumbing: fewer reports (each one validates and
                    # checkpoints) and a shorter finder sweep keep it short.
                    r = run_dataset(name, seed, budget, grid_points, trials, args.storage or tmp,
                                    reports=4 if args.smoke else 10, finder_steps=40 if args.smoke else 100)
                    results.append(r)
                    print(f"{name} seed {seed}: grid best {r['grid_best']['lr']:.2g} -> {r['grid_best']['value']:.2f}; "
                          + ", ".join(f"{m} {e['value']:.2f} ({e['steps']} steps)" for m, e in r["methods"].items()),
                          flush=True)
        finally:
            if started:
                import ray

                ray.shutdown()
    total = time.perf_counter() - start
    text = table(results)
    print(f"\n{summary(results)}\n\n{text}")
    print(f"\n{len(results)} dataset-seeds in {total:.0f} s")
    import lightning
    import ray

    meta = {"date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "seconds": total, "datasets": datasets,
            "seeds": args.seeds, "budget": budget, "grid_points": grid_points, "trials": trials,
            "full_range": FULL_RANGE, "argv": sys.argv[1:] if argv is None else argv,
            "versions": {"torch": torch.__version__, "lightning": lightning.__version__, "ray": ray.__version__,
                         "python": platform.python_version()},
            "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}}
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results, "summary": summary(results), "table": text}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
