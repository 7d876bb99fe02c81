"""The ``lrfuse`` command.

``lrfuse fit|validate|test``
    a LightningCLI whose model and data default to the bundled digits demo; every LightningCLI flag
    works (``--optimizer lrfuse.FusedAdam --optimizer.lr 3e-3``,
    ``--trainer.callbacks+=lrfuse.LRSchedule --trainer.callbacks.schedule=cosine``, ``--config x.yaml``).
``lrfuse find``
    the LR range test on the model and data of the same flags and YAML as ``lrfuse fit``
    (``--model my_pkg.MyModule``, ``--config x.yaml``, ``--trainer.precision 16-mixed`` ...): prints
    the suggestion, the plausible range and the ``lrfuse fit`` flags to train with it; writes the plot.
``lrfuse search``
    LR search on Ray Tune (:func:`lrfuse.search_lr`: grid, random, race, PBT) on the same flags:
    prints every trial and the best LR, writes the plot and the config to train with.
``lrfuse demo``
    find the LR, train with it (FusedAdam, warm-up + cosine), print the suggestion, the final
    validation accuracy and the optimizer step time against ``torch.optim``.
``lrfuse bench``
    the optimizer-step benchmark (:func:`lrfuse.benchmark.main`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

__all__ = ["ModelFromConfig", "build_cli", "main"]

USAGE = """usage: lrfuse {fit,validate,test,find,search,demo,bench} [options] | lrfuse --version

  fit|validate|test  LightningCLI with the digits demo as default model and data
                     (lrfuse fit --help lists every flag; --model my_pkg.MyModule for your own)
  find               LR range test on the model and data of fit's flags / --config:
                     suggestion, range, the flags to train with it, plot (lrfuse find --help)
  search             LR search on Ray Tune, --method grid|random|race|pbt, same flags as fit
                     (needs pip install "ray[tune]>=2.60"; lrfuse search --help)
  demo               find the LR, train with it, report accuracy and optimizer step time
  bench              optimizer step benchmark against torch.optim (lrfuse bench --help)
"""


def build_cli(args: list[str] | None = None, run: bool = True, **kwargs):
    """The LightningCLI of ``lrfuse fit|validate|test|find|search``: any LightningModule and
    LightningDataModule (``--model my_pkg.MyModule``, ``--data ...``), the digits demo by default.

    Args:
        args: command-line arguments (as LightningCLI's ``args``), e.g. ``["fit", "--trainer.max_steps=5"]``.
        run: run the subcommand (``False``: only parse and instantiate; then ``args`` has no subcommand).
        kwargs: further LightningCLI arguments.
    """
    import lightning.pytorch as pl
    from lightning.pytorch.cli import LightningCLI

    class _CLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            # Subclass mode with the demo as default: ``--model.hidden 32`` and YAML ``model: {hidden: 32}``
            # still reach the demo, and ``--model my_pkg.MyModule`` swaps in the user's own.
            parser.set_defaults({"model": {"class_path": "lrfuse.lightning.demo.DigitsClassifier"},
                                 "data": {"class_path": "lrfuse.lightning.demo.DigitsDataModule"}})

    kwargs.setdefault("save_config_kwargs", {"overwrite": True})
    return _CLI(pl.LightningModule, pl.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                args=args, run=run, **kwargs)


def _split(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """This command's own options, and the rest for LightningCLI (``--model.*``, ``--trainer.*``, ``--config``)."""
    if any(a in ("-h", "--help") for a in argv):
        parser.print_help()
        print("\nModel, data and trainer: the flags and YAML of `lrfuse fit` (lrfuse fit --help lists them).")
        raise SystemExit(0)
    args, rest = parser.parse_known_args(argv)
    if not any(a.startswith("--seed_everything") for a in rest):
        rest = [f"--seed_everything={args.seed}", *rest]  # reproducible by default, unlike fit's random seed
    return args, rest


def _lr_flag(cli) -> str | None:
    """The flag that sets the LR in ``lrfuse fit``: the optimizer's when given, else the model's."""
    if cli.config.get("optimizer") is not None:
        return "optimizer.lr"
    from lrfuse.lightning.runtime import LR_ATTRS

    init_args = cli.config["model"].get("init_args") or {}
    return next((f"model.{name}" for name in LR_ATTRS if name in init_args), None)


def _train_with(cli, rest: list[str], lr: float) -> str:
    flag = _lr_flag(cli)
    if flag is None:
        return (f"the model takes no lr / learning_rate argument: set its LR to {lr:.3g} "
                "(group ratios as the model configures them)")
    return "train with: lrfuse fit " + " ".join([*rest, f"--{flag}={lr:.3g}"])


def _config_with_lr(cli, lr: float) -> str:
    """The parsed config (model, data, trainer, optimizer) with the LR set: YAML for ``lrfuse fit --config``."""
    config = cli.config.clone()
    flag = _lr_flag(cli)
    if flag == "optimizer.lr":
        config["optimizer"]["init_args"]["lr"] = lr
    elif flag is not None:
        config["model"]["init_args"][flag.split(".", 1)[1]] = lr
    return cli.parser.dump(config, skip_none=True)


def _quiet_cli(rest: list[str]):
    # No logger or checkpoints unless asked for: a range test or a search writes only its plot / Tune's folder.
    return build_cli(args=rest, run=False, save_config_callback=None,
                     trainer_defaults={"logger": False, "enable_checkpointing": False})


class ModelFromConfig:
    """A model factory for :func:`~lrfuse.search_lr`: the model ``lrfuse fit --config`` builds from
    ``config`` (YAML text, seed included), built in each trial. The model's weights never travel
    through Ray, and the trial's model is a new instance, built as ``lrfuse fit`` builds it."""

    def __init__(self, config: str) -> None:
        self.config = config

    def __call__(self):
        return _quiet_cli(["--config", self.config]).model


def _quiet() -> None:
    from lrfuse.lightning.runtime import quiet_logs

    # torch.utils.benchmark (used for the step-time line) warns about CUDA on CPU-only machines.
    quiet_logs("torch.utils.cpp_extension")


def _progress(args: argparse.Namespace) -> bool:
    # A progress bar redraws with carriage returns: piped to a file or a CI log it is thousands of fragments.
    return not args.no_progress and sys.stdout.isatty()


def _find(argv: list[str]) -> int:
    from lrfuse.lightning.demo import FINDER
    from lrfuse.lightning.finder import find_lr

    parser = argparse.ArgumentParser(
        prog="lrfuse find", allow_abbrev=False,
        description="LR range test on the model and data of `lrfuse fit`'s flags or --config (default: the digits demo)")
    parser.add_argument("--min-lr", type=float, default=FINDER["min_lr"])
    parser.add_argument("--max-lr", type=float, default=FINDER["max_lr"])
    parser.add_argument("--num-steps", type=int, default=FINDER["num_steps"])
    parser.add_argument("--method", default="auto", choices=["auto", "steepest", "valley", "min10"],
                        help="the curve's method (what --no-race suggests)")
    parser.add_argument("--no-race", action="store_true",
                        help="the curve's suggestion alone, without the race (a fifth of the run per candidate)")
    parser.add_argument("--seed", type=int, default=0, help="seed_everything, unless --seed_everything is given")
    parser.add_argument("--plot", default="lr_finder.png", help="where to write the plot ('' for none)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (the default when stdout is not a terminal)")
    args, rest = _split(parser, argv)
    _quiet()
    cli = _quiet_cli(rest)
    length = cli.config["trainer"]
    if not args.no_race and length.get("max_epochs") is None and length.get("max_steps") in (None, -1):
        # Lightning's default run is 1,000 epochs: a race over a fifth of that is not what anyone means.
        parser.error("the race trains each candidate for a fifth of the run, so it needs the run's length: "
                     "add --trainer.max_epochs N or --trainer.max_steps N (as you will train), or --no-race")
    result = find_lr(cli.trainer, cli.model, datamodule=cli.datamodule, min_lr=args.min_lr, max_lr=args.max_lr,
                     num_steps=args.num_steps, method=args.method, plot_path=args.plot or None,
                     verbose=_progress(args), race=not args.no_race)
    stopped = f", stopped: {result.stopped}" if result.stopped else ""
    print(result.summary() + f"  [{len(result.lrs)} steps{stopped}]")
    if result.lr is not None:
        print("candidates: " + ", ".join(f"{k} {v:.3g}" for k, v in result.candidates.items() if v is not None))
        print(_train_with(cli, rest, result.lr))
    if args.plot:
        print(f"plot: {args.plot}")
    return 0 if result.lr is not None else 1


def _search(argv: list[str]) -> int:
    from lrfuse.lightning.search import DECIDED_TRAINER_ARGS, METHODS, search_lr

    parser = argparse.ArgumentParser(
        prog="lrfuse search", allow_abbrev=False,
        description="LR search on Ray Tune on the model and data of `lrfuse fit`'s flags or --config "
                    "(default: the digits demo); the range defaults to the LR finder's plausible range")
    parser.add_argument("--method", default="race", choices=METHODS)
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--min-lr", type=float, default=None, help="with --max-lr: the range (default: the finder's)")
    parser.add_argument("--max-lr", type=float, default=None)
    parser.add_argument("--max-steps", type=int, default=None,
                        help="training steps of a trial (default: --trainer.max_steps if set, else 300)")
    parser.add_argument("--eval-every", type=int, default=None, help="validation / report period (default max-steps/10)")
    parser.add_argument("--metric", default="val_loss")
    parser.add_argument("--mode", default="min", choices=["min", "max"])
    parser.add_argument("--address", default=None, help="join this Ray cluster ('auto': the one this machine is in)")
    parser.add_argument("--runtime-env-json", type=json.loads, default=None, metavar="JSON",
                        help="Ray's runtime environment for the trials, e.g. '{\"working_dir\": \".\"}' to ship "
                             "your model's module to every node of a cluster")
    parser.add_argument("--cpus-per-trial", type=float, default=1)
    parser.add_argument("--gpus-per-trial", type=float, default=0)
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray (default: all)")
    parser.add_argument("--max-failures", type=int, default=1)
    parser.add_argument("--storage-path", default=None, help="Tune's results and checkpoints (default ~/ray_results)")
    parser.add_argument("--name", default=None)
    parser.add_argument("--resume", action="store_true",
                        help="continue the interrupted search --name (in --storage-path), same flags otherwise")
    parser.add_argument("--seed", type=int, default=0, help="seed_everything, unless --seed_everything is given")
    parser.add_argument("--plot", default="lr_search.png", help="where to write the plot ('' for none)")
    parser.add_argument("--save-config", default="", help="write the config to train with here (YAML for lrfuse fit)")
    parser.add_argument("--dashboard", action="store_true", help="start Ray's dashboard (127.0.0.1)")
    args, rest = _split(parser, argv)
    _quiet()
    cli = _quiet_cli(rest)
    trainer = {k: v for k, v in cli.config_init["trainer"].as_dict().items()
               if v is not None and k not in DECIDED_TRAINER_ARGS}
    # The trainer's own default callbacks (progress bar, summary, checkpointing) are the search's to decide.
    from lightning.pytorch.callbacks import ModelCheckpoint, ModelSummary, ProgressBar

    trainer["callbacks"] = [cb for cb in trainer.get("callbacks") or []
                            if not isinstance(cb, (ModelCheckpoint, ModelSummary, ProgressBar))]
    for key in ("accelerator", "devices"):
        if trainer.get(key) == "auto":
            del trainer[key]  # search_lr picks from the per-trial resources
    max_steps = args.max_steps or (cli.trainer.max_steps if cli.trainer.max_steps > 0 else 300)
    model = ModelFromConfig(cli.parser.dump(cli.config, skip_none=True))
    result = search_lr(model, cli.datamodule, method=args.method, trials=args.trials, min_lr=args.min_lr,
                       max_lr=args.max_lr, max_steps=max_steps, eval_every=args.eval_every, metric=args.metric,
                       mode=args.mode, trainer_kwargs=trainer, seed=args.seed, cpus_per_trial=args.cpus_per_trial,
                       gpus_per_trial=args.gpus_per_trial, address=args.address, runtime_env=args.runtime_env_json, num_cpus=args.num_cpus,
                       include_dashboard=args.dashboard, storage_path=args.storage_path, name=args.name,
                       max_failures=args.max_failures, resume=args.resume)
    if result.finder is not None:
        print(f"finder: {result.finder.summary()}")
    print(result.table())
    print(result.summary())
    print(f"results: {result.path}")
    if args.plot:
        result.plot(args.plot)
        print(f"plot: {args.plot}")
    if result.lr is None:
        return 1
    print(_train_with(cli, rest, result.lr))
    if args.save_config:
        with open(args.save_config, "w") as f:
            f.write(_config_with_lr(cli, result.lr))
        print(f"config: {args.save_config} (lrfuse fit --config {args.save_config})")
    return 0


def _fmt_s(seconds: float) -> str:
    return f"{seconds * 1e6:.1f} us" if seconds < 1e-3 else f"{seconds * 1e3:.2f} ms"


def _demo(argv: list[str]) -> int:
    from lrfuse.lightning import demo

    parser = argparse.ArgumentParser(prog="lrfuse demo", description="find the LR, train with it, report")
    parser.add_argument("--epochs", type=int, default=demo.EPOCHS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", default="lr_finder.png", help="where to write the finder's plot ('' for none)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (the default when stdout is not a terminal)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for the whole demo, the step-time comparison included "
                             "(a model this small runs fastest on one)")
    args = parser.parse_args(argv)
    _quiet()
    from lrfuse.threads import torch_threads

    with torch_threads(args.threads):  # the caller's count comes back afterwards
        return _run_demo(args)


def _run_demo(args: argparse.Namespace) -> int:
    from lrfuse.lightning import demo

    progress = _progress(args)
    start = time.perf_counter()
    print("lrfuse demo: scikit-learn digits (1,797 8x8 images), MLP 64-128-128-10, lrfuse.FusedAdam, CPU")
    print(f"1/3 LR range test ({demo.FINDER['num_steps']} steps, {demo.FINDER['min_lr']:g} .. "
          f"{demo.FINDER['max_lr']:g}), then a race of 4 LRs around its edge, a fifth of the run each ...", flush=True)
    result, finder_steps = demo.find(seed=args.seed, epochs=args.epochs, plot_path=args.plot or None, progress=progress)
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


def version() -> str:
    """lrfuse's version, the torch it runs with, and which kernels serve the CPU and CUDA."""
    import torch

    import lrfuse
    from lrfuse import ops

    return (f"lrfuse {lrfuse.__version__} (torch {torch.__version__}; kernels: cpu {ops.backend('cpu')} "
            f"[{ops.cpu_isa()}], cuda {ops.backend('cuda')})")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``lrfuse`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        print(version())
        return 0
    command, rest = argv[0], argv[1:]
    if command in ("fit", "validate", "test"):
        # No progress bar when stdout is not a terminal (a log, a pipe); --trainer.enable_progress_bar overrides.
        build_cli(args=argv, trainer_defaults={"enable_progress_bar": sys.stdout.isatty()})
        return 0
    if command == "find":
        return _find(rest)
    if command == "search":
        return _search(rest)
    if command == "demo":
        return _demo(rest)
    if command == "bench":
        from lrfuse.benchmark import main as bench_main

        return bench_main(rest)
    print(f"lrfuse: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
