"""What ``LRHealthMonitor`` costs a real Lightning run, per optimizer step.

    python benchmarks/bench_health.py            # CPU; JSON in benchmarks/results/bench_health_cpu.json
    python benchmarks/bench_health.py --quick    # a smoke test, not a measurement (writes no JSON)

Two models, each trained with FusedAdam by a real ``Trainer`` (no validation, no checkpointing,
the loggers a run would have replaced by one that keeps nothing):

- ``demo``: the bundled demo (``lrfuse demo``'s MLP 64-128-128-10 on scikit-learn's digits, batch 64);
- ``mlp_2048``: a larger MLP, 1024 -> 2048 -> 2048 -> 2048 -> 1024 (12.6M parameters) on random
  data, batch 64.

Configurations, each run as separate fits taken in turn (the order reversed every other round),
so all of them see the machine's drift alike:

- ``none``: no monitor;
- ``kernel``: ``LRHealthMonitor(every_n_steps=1)``, a check at every step, measured by the
  kernel's own pass (``track_stats`` on for the checked step);
- ``copies``: the same, forced onto the copies every other optimizer takes (weights copied before
  the step, norms computed after it): the monitor's cost before issue 21;
- ``kernel_every_10``: the default period, ``every_n_steps=10``.

A fit's step time is the median over its steps (after 5 warm-up steps) of the time from one
``on_train_batch_start`` to the next; each configuration's step time is the median over its fits.
The overhead (``vs_none``) is the median over rounds of a fit's time over ``none``'s fit of the
same round: the machine drifts between rounds (fits of one configuration varied by 1.4x in a run),
less within one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import lrfuse
from lrfuse.benchmark import machine_info

CONFIGS = ("none", "kernel", "copies", "kernel_every_10")
WARMUP = 5


def _imports():
    import lightning.pytorch as pl

    from lrfuse.lightning import health
    from lrfuse.lightning.demo import DigitsClassifier, DigitsDataModule
    from lrfuse.lightning.runtime import quiet_logs, quiet_trainer

    quiet_logs()
    return pl, health, DigitsClassifier, DigitsDataModule, quiet_trainer


def _models(quick: bool):
    pl, _, DigitsClassifier, DigitsDataModule, _ = _imports()
    from torch.utils.data import DataLoader, TensorDataset

    class Mlp(pl.LightningModule):
        def __init__(self, width: int) -> None:
            super().__init__()
            w = width
            self.net = torch.nn.Sequential(torch.nn.Linear(w // 2, w), torch.nn.ReLU(), torch.nn.Linear(w, w),
                                           torch.nn.ReLU(), torch.nn.Linear(w, w), torch.nn.ReLU(),
                                           torch.nn.Linear(w, w // 2))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return lrfuse.FusedAdam(self.parameters(), lr=1e-4)

    width = 256 if quick else 2048
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64 * 40, width // 2, generator=g), torch.randn(64 * 40, width // 2, generator=g))
    return {
        "demo": (lambda: DigitsClassifier(lr=1e-3), lambda: DigitsDataModule(batch_size=64)),
        f"mlp_{width}": (lambda: Mlp(width), lambda: pl.LightningDataModule.from_datasets(
            DataLoader(data, batch_size=64, shuffle=True, drop_last=True))),
    }


def _fit(make_model, make_data, config: str, steps: int) -> float:
    """One fit of ``steps`` steps under ``config``; the median step time in seconds."""
    pl, health, _, _, quiet_trainer = _imports()
    times: list[float] = []

    class Clock(pl.Callback):
        def on_train_batch_start(self, *args) -> None:
            times.append(time.perf_counter())

    callbacks = [Clock()]
    if config != "none":
        callbacks.append(health.LRHealthMonitor(every_n_steps=10 if config == "kernel_every_10" else 1, warn=False))
    serves = health._KernelStats.serves
    if config == "copies":
        health._KernelStats.serves = staticmethod(lambda opt: False)
    try:
        torch.manual_seed(0)
        trainer = pl.Trainer(**quiet_trainer(max_steps=steps, callbacks=callbacks, logger=False,
                                             limit_val_batches=0, enable_checkpointing=False))
        trainer.fit(make_model(), datamodule=make_data())
    finally:
        health._KernelStats.serves = serves
    gaps = [b - a for a, b in zip(times, times[1:])][WARMUP:]
    return statistics.median(gaps)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", default=None,
                        help="where to write the figures (default: results/bench_health_cpu.json; none with --quick)")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.steps = 1, 15
    torch.set_num_threads(2)
    out = {"machine": machine_info(torch.device("cpu"), 2), "rounds": args.rounds, "steps": args.steps, "rows": {}}
    for name, (make_model, make_data) in _models(args.quick).items():
        fits = {c: [] for c in CONFIGS}
        for r in range(args.rounds):
            for config in (CONFIGS if r % 2 == 0 else CONFIGS[::-1]):
                fits[config].append(_fit(make_model, make_data, config, args.steps))
        params = sum(p.numel() for p in make_model().parameters())
        row = {"params": params}
        for config in CONFIGS:
            ratios = [t / n for t, n in zip(fits[config], fits["none"])]
            row[config] = {"step_ms": statistics.median(fits[config]) * 1e3, "vs_none": statistics.median(ratios),
                           "fits_ms": [t * 1e3 for t in fits[config]]}
        out["rows"][name] = row
        print(f"{name} ({params:,} parameters): " + ", ".join(
            f"{c} {row[c]['step_ms']:.2f} ms ({row[c]['vs_none']:.3f}x)" for c in CONFIGS), flush=True)
    path = args.json or (None if args.quick else str(Path(__file__).parent / "results" / "bench_health_cpu.json"))
    if path:
        Path(path).write_text(json.dumps(out, indent=1) + "\n")
        print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
