"""Does `lrfuse demo`'s LR hold up against a grid search, at a fraction of the cost?

For each seed: the demo's range test picks an LR (lrfuse.lightning.demo.find), one run trains
with it (lrfuse.lightning.demo.train: FusedAdam, warm-up + cosine, fixed epochs); a 10-point
log-spaced grid (1e-5 .. 1) trains the same recipe once per LR. Reported: the suggested LR and
its final validation accuracy, the grid's best LR and accuracy, and the training steps each
approach cost (finder steps + one run, against ten runs). CPU, seeded, deterministic.

    python benchmarks/demo_vs_grid.py [--seeds 0 1 2] [--threads 1]

Done means (issue 3): accuracy within 1 point of the grid's best, at most a fifth of its steps.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

import numpy as np
import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steady on a shared machine)")
    parser.add_argument("--grid", type=int, default=10, help="grid points, log-spaced over 1e-5 .. 1")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from lrfuse.lightning import demo

    from lrfuse.lightning.runtime import quiet_logs

    # After the import: importing Lightning sets its own loggers to INFO.
    warnings.filterwarnings("ignore")
    quiet_logs()

    grid = np.logspace(-5, 0, args.grid)
    ok = True
    for seed in args.seeds:
        start = time.perf_counter()
        result, finder_steps = demo.find(seed=seed)
        if result.lr is None:
            print(f"seed {seed}: the finder made no suggestion: {result.reason}")
            ok = False
            continue
        picked = demo.train(result.lr, seed=seed)
        demo_s = time.perf_counter() - start
        start = time.perf_counter()
        runs = [demo.train(float(lr), seed=seed) for lr in grid]
        grid_s = time.perf_counter() - start
        best = max(runs, key=lambda r: r.val_acc)
        demo_cost = finder_steps + picked.steps
        grid_cost = sum(r.steps for r in runs)
        gap = 100 * (best.val_acc - picked.val_acc)
        passed = gap <= 1.0 and demo_cost * 5 <= grid_cost
        ok &= passed
        print(f"seed {seed}", flush=True)
        print("  grid (lr: val acc %): " + "  ".join(f"{r.lr:.2g}: {100 * r.val_acc:.1f}" for r in runs))
        print(f"  demo: suggested lr {result.lr:.3g} ({result.method}, range {result.low:.2g} .. {result.high:.2g}) "
              f"-> val acc {100 * picked.val_acc:.2f}%  cost {demo_cost} steps ({finder_steps} finder + "
              f"{picked.steps} training), {demo_s:.1f} s")
        print(f"  grid: best lr {best.lr:.3g} -> val acc {100 * best.val_acc:.2f}%  cost {grid_cost} steps "
              f"({len(runs)} x {runs[0].steps}), {grid_s:.1f} s")
        print(f"  gap {gap:+.2f} points (limit 1.00); cost ratio {demo_cost / grid_cost:.3f} (limit 0.200)"
              f" -> {'PASS' if passed else 'FAIL'}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
