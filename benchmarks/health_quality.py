"""Are LRHealthMonitor's verdicts right? Runs at far too low, good and far too high LRs (issue 11).

For each dataset and seed, the MLP of ``benchmarks/finder_quality.py`` is trained with
``lrfuse.FusedAdam`` at a constant LR in a real Lightning ``Trainer`` holding
``lrfuse.LRHealthMonitor`` for a fixed budget of optimizer steps. The optimizer has two parameter
groups at the same LR (``body``: the hidden layers, ``head``: the output layer), so every run gives
two verdicts. The LRs and the verdict each should get:

- ``1e-7`` (far too low): ``too_low``;
- two good LRs, ``3e-3`` (the issue's) and ``6e-3``: the grid's best constant LR for digits and
  class20 in every seed, and in the middle of the best ones for class2 and friedman (2e-3 .. 2e-2,
  see "LR-finder quality" in benchmarks/README.md): ``ok``;
- ``3.0`` (far too high): ``too_high``.

Recorded per group: the final verdict, and the steps until it (the first check from which the
verdict was the final one at every later check, read from the ``lr_health/<key>/verdict`` metric
the monitor logs). Reported: the share of correct final verdicts per LR class and pooled, the
"opposite" verdicts (``too_low`` at the too-high LR or ``too_high`` at the too-low one: final, and
given at any check on the way), and the steps to the verdict (median and worst, over the correct
ones). Issue 11's targets: >= 95% correct, no opposite verdict.

    python benchmarks/health_quality.py            # the full run: 4 datasets x 6 seeds x 4 LRs (~2 min)
    python benchmarks/health_quality.py --smoke    # CI: digits, seed 0, the 4 LRs, 60 steps
    python benchmarks/health_quality.py --datasets digits,friedman --seeds 0 1 --json out.json

CPU, one thread by default, deterministic given the seed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
import warnings

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from finder_quality import SPECS, Case, loss_fn  # noqa: E402  (same datasets, models and seeds)

VERDICTS = ("ok", "too_high", "too_low")
CODES = {0.0: "ok", 1.0: "too_high", -1.0: "too_low"}
RUNS = (("too_low", 1e-7), ("good", 3e-3), ("good", 6e-3), ("too_high", 3.0))  # (LR class, LR)
CLASSES = ("too_low", "good", "too_high")
EXPECTED = {"too_low": "too_low", "good": "ok", "too_high": "too_high"}
OPPOSITE = {"too_low": "too_high", "too_high": "too_low", "good": None}
DATASETS = ("digits", "class2", "class20", "friedman")
STEPS, EVERY = 300, 10
TARGETS = dict(correct=0.95, opposite=0)


def _memory_logger():
    from lightning.pytorch.loggers import Logger

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

    return MemoryLogger()


def _module(case: Case, lr: float):
    import lightning.pytorch as pl

    import lrfuse

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = case.net()

        def training_step(self, batch, batch_idx):
            x, y = batch
            return loss_fn(case.spec.task, self.net(x), y)

        def configure_optimizers(self):
            layers = list(self.net)
            head = layers[-1]
            body = [p for m in layers[:-1] for p in m.parameters()]
            return lrfuse.FusedAdam([{"params": body, "name": "body"},
                                     {"params": list(head.parameters()), "name": "head"}], lr=lr)

    return Module()


def run_one(case: Case, lr_class: str, lr: float, steps: int, every: int, root: str) -> dict:
    """Train one run; per group, the final verdict, its reason and the steps until it."""
    import lightning.pytorch as pl

    from lrfuse import LRHealthMonitor

    pl.seed_everything(case.seed, verbose=False)
    monitor, logger = LRHealthMonitor(every_n_steps=every, warn=False), _memory_logger()
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=logger, enable_checkpointing=False,
                         enable_model_summary=False, enable_progress_bar=False, num_sanity_val_steps=0,
                         limit_val_batches=0, max_steps=steps, max_epochs=-1, default_root_dir=root,
                         callbacks=[monitor])
    t0 = time.perf_counter()
    trainer.fit(_module(case, lr), train_dataloaders=case.loader())
    seconds = time.perf_counter() - t0
    groups = {}
    for key in sorted(monitor.status):
        metric = f"lr_health/{key}/verdict"
        history = [(int(step), CODES[float(row[metric])]) for step, row in logger.rows if metric in row]
        final = monitor.status[key]
        assert history and history[-1][1] == final, (key, history[-1:], final)
        since = len(history) - 1
        while since > 0 and history[since - 1][1] == final:
            since -= 1
        groups[key] = {"verdict": final, "why": monitor.reasons.get(key, ""), "steps_to_verdict": history[since][0],
                       "correct": final == EXPECTED[lr_class], "opposite": final == OPPOSITE[lr_class],
                       "opposite_any": OPPOSITE[lr_class] in [v for _, v in history],
                       "history": [v for _, v in history]}
    return {"dataset": case.spec.name, "seed": case.seed, "lr_class": lr_class, "lr": lr, "steps": steps,
            "every": every, "seconds": seconds, "groups": groups}


def summarize(runs: list[dict]) -> dict:
    def stats(rows):
        verdicts = [g for r in rows for g in r["groups"].values()]
        reach = [g["steps_to_verdict"] for g in verdicts if g["correct"]]
        counts = {v: sum(g["verdict"] == v for g in verdicts) for v in VERDICTS}
        n = len(verdicts)
        return {"verdicts": n, "correct": sum(g["correct"] for g in verdicts),
                "share_correct": sum(g["correct"] for g in verdicts) / n if n else float("nan"),
                "opposite": sum(g["opposite"] for g in verdicts), "counts": counts,
                "opposite_any": sum(g["opposite_any"] for g in verdicts),
                "steps_to_verdict_median": float(np.median(reach)) if reach else None,
                "steps_to_verdict_max": int(max(reach)) if reach else None,
                "runs_all_groups_correct": sum(all(g["correct"] for g in r["groups"].values()) for r in rows),
                "runs": len(rows)}

    out = {"pooled": stats(runs), "by_lr_class": {c: stats([r for r in runs if r["lr_class"] == c]) for c in CLASSES},
           "by_lr": {f"{lr:g}": stats([r for r in runs if r["lr"] == lr]) for _, lr in RUNS},
           "by_dataset": {d: stats([r for r in runs if r["dataset"] == d])
                          for d in dict.fromkeys(r["dataset"] for r in runs)}}
    p = out["pooled"]
    out["targets"] = {"correct": p["share_correct"] >= TARGETS["correct"], "opposite": p["opposite"] <= TARGETS["opposite"]}
    return out


def table(summary: dict) -> str:
    lines = ["| LR class | LR | expected | correct | ok / too high / too low | opposite (final / at any check) | "
             "steps to verdict (median / max) | runs all groups right |",
             "|---|--:|---|--:|---|--:|---|--:|"]

    def row(label, lr, expected, s):
        c = s["counts"]
        med = "-" if s["steps_to_verdict_median"] is None else f"{s['steps_to_verdict_median']:.0f} / {s['steps_to_verdict_max']}"
        return (f"| {label} | {lr} | {expected} | {s['correct']}/{s['verdicts']} ({100 * s['share_correct']:.0f}%) | "
                f"{c['ok']} / {c['too_high']} / {c['too_low']} | {s['opposite']} / {s['opposite_any']} | {med} | "
                f"{s['runs_all_groups_correct']}/{s['runs']} |")

    for c in CLASSES:
        lrs = [lr for k, lr in RUNS if k == c]
        if len(lrs) > 1:
            for lr in lrs:
                lines.append(row(c, f"{lr:g}", EXPECTED[c], summary["by_lr"][f"{lr:g}"]))
        lines.append(row(c, ", ".join(f"{lr:g}" for lr in lrs), EXPECTED[c], summary["by_lr_class"][c]))
    lines.append(row("all", "", "", summary["pooled"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="digits, seed 0, the 4 LRs, 60 steps (CI)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0..5 (smoke: 0)")
    parser.add_argument("--datasets", default=None, help=f"comma-separated, of {','.join(DATASETS)} (default all)")
    parser.add_argument("--steps", type=int, default=None, help=f"optimizer steps per run (default {STEPS}; smoke 60)")
    parser.add_argument("--every", type=int, default=None, help=f"the monitor's every_n_steps (default {EVERY}; smoke 5)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--label", default="", help="a name for this run kept in the JSON (e.g. before / after)")
    parser.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results", "health_quality.json"))
    args = parser.parse_args(argv)

    datasets = args.datasets.split(",") if args.datasets else (["digits"] if args.smoke else list(DATASETS))
    unknown = [d for d in datasets if d not in SPECS or d == "digits_cnn"]
    if unknown:
        parser.error(f"unknown dataset(s) {', '.join(unknown)}; choose from {', '.join(DATASETS)}")
    seeds = args.seeds if args.seeds is not None else ([0] if args.smoke else list(range(6)))
    steps = args.steps or (60 if args.smoke else STEPS)
    every = args.every or (5 if args.smoke else EVERY)

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import lightning.pytorch  # noqa: F401  (then quiet its loggers: importing it sets them to INFO)
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("lightning"):
            logging.getLogger(name).setLevel(logging.ERROR)

    start = time.perf_counter()
    runs = []
    with tempfile.TemporaryDirectory() as root:
        for d in datasets:
            for seed in seeds:
                case = Case(SPECS[d], seed)
                for c, lr in RUNS:
                    r = run_one(case, c, lr, steps, every, root)
                    runs.append(r)
                    got = "  ".join(f"{k} {g['verdict']}@{g['steps_to_verdict']}" + ("" if g["correct"] else " (WRONG)")
                                    for k, g in r["groups"].items())
                    print(f"{d} seed {seed} {c} lr {r['lr']:g}: {got}  {r['seconds']:.1f} s", flush=True)
    total = time.perf_counter() - start
    summary = summarize(runs)
    text = table(summary)
    print()
    print(text)
    print(f"\n{len(runs)} runs in {total:.0f} s")
    import lightning

    import lrfuse
    meta = {"date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "seconds": total, "label": args.label,
            "argv": sys.argv[1:] if argv is None else argv, "datasets": datasets, "seeds": seeds, "runs": RUNS,
            "expected": EXPECTED, "steps": steps, "every_n_steps": every, "threads": args.threads, "targets": TARGETS,
            "versions": {"torch": torch.__version__, "lightning": lightning.__version__, "lrfuse": lrfuse.__version__,
                         "python": platform.python_version()}}
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "summary": summary, "runs": runs, "table": text}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
