"""The ``lrfuse`` command.

``lrfuse fit|validate|test``
    a LightningCLI whose model and data default to the bundled digits demo; every LightningCLI flag
    works (``--optimizer lrfuse.FusedAdam --optimizer.lr 3e-3``,
    ``--trainer.callbacks+=lrfuse.LRSchedule --trainer.callbacks.schedule=cosine``, ``--config x.yaml``).
``lrfuse find``
    run the LR range test on the demo, print the suggestion and range, write the plot.
``lrfuse demo``
    find the LR, train with it (FusedAdam, warm-up + cosine), print the suggestion, the final
    validation accuracy and the optimizer step time against ``torch.optim``.
``lrfuse bench``
    the optimizer-step benchmark (:func:`lrfuse.benchmark.main`).
"""

from __future__ import annotations

import argparse
import sys
import time

__all__ = ["build_cli", "main"]

USAGE = """usage: lrfuse {fit,validate,test,find,demo,bench} [options]

  fit|validate|test  LightningCLI with the digits demo as default model and data
                     (lrfuse fit --help lists every flag)
  find               LR range test on the demo: suggestion, range, plot
  demo               find the LR, train with it, report accuracy and optimizer step time
  bench              optimizer step benchmark against torch.optim (lrfuse bench --help)
"""


def build_cli(args: list[str] | None = None, run: bool = True, **kwargs):
    """The ``lrfuse fit|validate|test`` LightningCLI: digits model and data by default.

    Args:
        args: command-line arguments (as LightningCLI's ``args``), e.g. ``["fit", "--trainer.max_steps=5"]``.
        run: run the subcommand (``False``: only parse and instantiate; then ``args`` has no subcommand).
        kwargs: further LightningCLI arguments.
    """
    from lightning.pytorch.cli import LightningCLI

    from lrfuse.lightning.demo import DigitsClassifier, DigitsDataModule

    kwargs.setdefault("save_config_kwargs", {"overwrite": True})
    return LightningCLI(DigitsClassifier, DigitsDataModule, args=args, run=run, **kwargs)


def _quiet() -> None:
    import logging
    import warnings

    # torch.utils.benchmark (used for the step-time line) warns about CUDA on CPU-only machines.
    for name in ("lightning.pytorch", "lightning.fabric", "lightning", "torch.utils.cpp_extension"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")
    warnings.filterwarnings("ignore", message=".*treespec.*")


def _find(argv: list[str]) -> int:
    from lrfuse.lightning.demo import FINDER, find

    parser = argparse.ArgumentParser(prog="lrfuse find", description="LR range test on the digits demo")
    parser.add_argument("--min-lr", type=float, default=FINDER["min_lr"])
    parser.add_argument("--max-lr", type=float, default=FINDER["max_lr"])
    parser.add_argument("--num-steps", type=int, default=FINDER["num_steps"])
    parser.add_argument("--method", default="auto", choices=["auto", "steepest", "valley", "min10"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", default="lr_finder.png", help="where to write the plot ('' for none)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    _quiet()
    result, steps = find(seed=args.seed, plot_path=args.plot or None, progress=not args.no_progress,
                         min_lr=args.min_lr, max_lr=args.max_lr, num_steps=args.num_steps, method=args.method)
    print(result.summary() + f"  [{steps} steps{', stopped: ' + result.stopped if result.stopped else ''}]")
    if result.lr is not None:
        print("candidates: " + ", ".join(f"{k} {v:.3g}" for k, v in result.candidates.items() if v is not None))
    if args.plot:
        print(f"plot: {args.plot}")
    return 0 if result.lr is not None else 1


def _fmt_s(seconds: float) -> str:
    return f"{seconds * 1e6:.1f} us" if seconds < 1e-3 else f"{seconds * 1e3:.2f} ms"


def _demo(argv: list[str]) -> int:
    from lrfuse.lightning import demo

    parser = argparse.ArgumentParser(prog="lrfuse demo", description="find the LR, train with it, report")
    parser.add_argument("--epochs", type=int, default=demo.EPOCHS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", default="lr_finder.png", help="where to write the finder's plot ('' for none)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for the whole demo, the step-time comparison included "
                             "(a model this small runs fastest on one)")
    args = parser.parse_args(argv)
    _quiet()
    progress = not args.no_progress
    start = time.perf_counter()
    import torch

    torch.set_num_threads(args.threads)
    print("lrfuse demo: scikit-learn digits (1,797 8x8 images), MLP 64-128-128-10, lrfuse.FusedAdam, CPU")
    print(f"1/3 LR range test ({demo.FINDER['num_steps']} steps, {demo.FINDER['min_lr']:g} .. "
          f"{demo.FINDER['max_lr']:g}) ...", flush=True)
    result, finder_steps = demo.find(seed=args.seed, plot_path=args.plot or None, progress=progress)
    print(f"    {result.summary()}" + (f"; plot: {args.plot}" if args.plot else ""), flush=True)
    if result.lr is None:
        return 1
    print(f"2/3 training {args.epochs} epochs at lr {result.lr:.3g} (warm-up {demo.WARMUP_STEPS} steps, then cosine) ...",
          flush=True)
    run = demo.train(result.lr, epochs=args.epochs, seed=args.seed, progress=progress)
    print(f"    final validation accuracy {100 * run.val_acc:.2f}% (loss {run.val_loss:.4f}) after {run.steps} steps, "
          f"{run.seconds:.1f} s", flush=True)
    print(f"3/3 optimizer step time on the demo model's parameters (median, {args.threads} thread"
          f"{'s' if args.threads != 1 else ''}):", flush=True)
    try:
        from lrfuse.benchmark import compare_step_time
    except ImportError as error:  # the benchmark module is optional for the demo
        print(f"    skipped ({error})")
    else:
        times = compare_step_time(list(run.model.parameters()), steps=200)
        ours = times.get("lrfuse.FusedAdam")
        for name, seconds in times.items():
            ratio = f"  ({seconds / ours:.2f}x lrfuse)" if ours and name != "lrfuse.FusedAdam" else ""
            print(f"    {name:<34} {_fmt_s(seconds)}{ratio}")
    print(f"done in {time.perf_counter() - start:.1f} s: lr {result.lr:.3g} -> {100 * run.val_acc:.2f}% "
          f"({finder_steps} finder steps + {run.steps} training steps)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``lrfuse`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command in ("fit", "validate", "test"):
        build_cli(args=argv)
        return 0
    if command == "find":
        return _find(rest)
    if command == "demo":
        return _demo(rest)
    if command == "bench":
        from lrfuse.benchmark import main as bench_main

        return bench_main(rest)
    print(f"lrfuse: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
