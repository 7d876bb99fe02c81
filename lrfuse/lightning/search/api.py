"""The search itself: :func:`search_lr` checks its arguments, sets the range (the LR finder, run
first, by default), starts Ray and runs the trials on Tune, and returns an :class:`LRSearchResult`."""

from __future__ import annotations

import copy
import math
import shutil
import tempfile
import time
from collections.abc import Callable

import lightning.pytorch as pl
import numpy as np

from lrfuse.lightning.finder import find_lr
from lrfuse.lightning.runtime import lr_attr
from lrfuse.lightning.search.result import LRSearchResult, pick, records
from lrfuse.lightning.search.trial import DECIDED_TRAINER_ARGS, FORCED, Payload, make_model
from lrfuse.lightning.search.tune import TuneSettings, run_tune, saved_search

__all__ = ["METHODS", "search_lr"]

METHODS = ("grid", "random", "race", "pbt")


def search_lr(model: pl.LightningModule | Callable[[], pl.LightningModule], datamodule: pl.LightningDataModule,
              method: str = "race", *, trials: int = 8, min_lr: float | None = None, max_lr: float | None = None,
              max_steps: int = 300, eval_every: int | None = None, metric: str = "val_loss", mode: str = "min",
              trainer_kwargs: dict | None = None, finder_kwargs: dict | None = None, seed: int = 0,
              cpus_per_trial: float = 1, gpus_per_trial: float = 0, max_concurrent: int | None = None,
              address: str | None = None, runtime_env: dict | None = None, num_cpus: int | None = None,
              include_dashboard: bool = False, storage_path: str | None = None, name: str | None = None, max_failures: int = 1,
              grace_period: int = 1, reduction_factor: int = 2, perturbation_interval: int = 2,
              resume: bool = False, audit: bool = False, verbose: int = 0) -> LRSearchResult:
    """Search the learning rate on Ray Tune: ``"grid"``, ``"random"``, ``"race"`` or ``"pbt"``.

    Every trial trains ``model`` (a copy of it, or a fresh one from the factory) for ``max_steps``
    at one LR, validates every ``eval_every`` steps and reports ``metric``. The LR is the peak of
    the model's own optimizer groups, all scaled together (ratios kept, as the finder does). The
    search writes its results under ``storage_path`` / ``name`` and nothing else: the trials'
    temporary files, and the session folders (logs, sockets) of a Ray it starts, live in one folder
    of the temp dir, removed when the search ends, also after an error or Ctrl-C. Ray starts
    locally on 127.0.0.1 (usage statistics off, no dashboard) unless ``address`` joins a cluster
    or Ray is already initialised in this process.

    Args:
        model: a LightningModule (every trial starts from its current weights) or a callable
            returning one (called in each trial after seeding with ``seed``).
        datamodule: the data; each trial uses a copy, seeded alike, so batches come in the same order.
        method: ``grid`` | ``random`` | ``race`` | ``pbt`` (see the module's docstring).
        trials: number of trials (the PBT population).
        min_lr, max_lr: the range; default: the LR finder's plausible range, run first.
        max_steps: the budget of a trial in training steps (rounded up to a multiple of ``eval_every``).
        eval_every: validation (and report, checkpoint) period in steps; default ``max_steps // 10``.
        metric, mode: the validation metric the model logs and whether lower or higher is better.
        trainer_kwargs: further ``pl.Trainer`` arguments for each trial (e.g. ``precision``,
            ``callbacks``); budget, validation period, logging and checkpointing are the search's.
        finder_kwargs: arguments of the range test (:class:`lrfuse.LRFinder`) when it sets the range.
        seed: seed of every trial (weights from a factory, data order) and of random/PBT LRs.
        cpus_per_trial, gpus_per_trial: Ray resources of a trial (its torch threads: ``cpus_per_trial``).
        max_concurrent: at most this many trials at once (default: as resources allow); grid and
            random only (the race and PBT need every trial in the search at once).
        address: join this Ray cluster (``"auto"``: the one this machine is part of).
        runtime_env: Ray's runtime environment for the trials, e.g. ``{"working_dir": "."}`` to ship
            the folder that holds your model's module to every node of a cluster.
        num_cpus: CPUs of a local Ray (default: all).
        include_dashboard: start Ray's dashboard (on 127.0.0.1) with a local Ray.
        storage_path, name: where Tune keeps checkpoints and results (default ``~/ray_results``;
            a shared path on a multi-node cluster) and the experiment's folder name.
        max_failures: times a failed trial is retried from its last checkpoint.
        grace_period, reduction_factor: the race's first rung (in reports) and halving factor.
        perturbation_interval: PBT's exploit / explore period, in reports.
        resume: continue the interrupted search (Ctrl-C) saved under ``storage_path`` / ``name``:
            finished trials are kept, unfinished ones resume from their last checkpoint, the race
            from its last rung. Pass the same model, data and settings; the range and LRs are the
            saved ones (no finder run).
        audit: checksum every training batch and the weights at every report
            (:attr:`TrialRecord.reports`), to check that trials saw identical data and resumed
            exactly; costs a host copy and a hash of each batch.
        verbose: Tune's console output (0 silent, 1 a status table, 2 every result).

    Returns:
        An :class:`LRSearchResult`: best LR and group LRs, every trial, ``plot(path)``, ``to_yaml()``.

    Raises:
        ValueError: for an unknown method, ``trials < 1``, ``min_lr >= max_lr`` or one of them
            missing, a budget or period below 1, an unknown mode, negative resources or failures,
            ``max_concurrent`` below ``trials`` for the race or PBT, ``trainer_kwargs`` that set
            what the search decides (:data:`DECIDED_TRAINER_ARGS`: budget, validation period,
            checkpoints, loggers, progress bar);
            with ``resume``, a missing ``name`` or experiment folder, or another method than saved;
            at the first report, when ``metric`` is not there (no validation ran, or it logged other
            names: the message lists them); the search stops then.
        KeyboardInterrupt: when the search is interrupted (Ctrl-C); the message says how to resume.
        ImportError: without Ray Tune (``pip install "ray[tune]>=2.60"``).
        RuntimeError: when the finder, run for the range, makes no suggestion.
    """
    start = time.perf_counter()
    if method not in METHODS:
        raise ValueError(f"search_lr: unknown method {method!r}; use one of {', '.join(METHODS)}")
    if not isinstance(trials, int) or trials < 1:
        raise ValueError(f"search_lr: trials must be an integer >= 1, got {trials!r}")
    if (min_lr is None) != (max_lr is None):
        raise ValueError(f"search_lr: give both min_lr and max_lr, or neither (the finder's range), got min_lr={min_lr}, "
                         f"max_lr={max_lr}")
    if min_lr is not None and not (0 < min_lr < max_lr and math.isfinite(max_lr)):
        raise ValueError(f"search_lr needs 0 < min_lr < max_lr (finite), got min_lr={min_lr}, max_lr={max_lr}")
    if max_steps < 1:
        raise ValueError(f"search_lr: max_steps must be >= 1, got {max_steps}")
    eval_every = eval_every if eval_every is not None else max(1, max_steps // 10)
    if eval_every < 1:
        raise ValueError(f"search_lr: eval_every must be >= 1, got {eval_every}")
    if mode not in ("min", "max"):
        raise ValueError(f"search_lr: mode must be 'min' or 'max', got {mode!r}")
    if cpus_per_trial <= 0 or gpus_per_trial < 0:
        raise ValueError(f"search_lr needs cpus_per_trial > 0 and gpus_per_trial >= 0, got {cpus_per_trial}, "
                         f"{gpus_per_trial}")
    if max_failures < 0:
        raise ValueError(f"search_lr: max_failures must be >= 0, got {max_failures}")
    if grace_period < 1 or reduction_factor < 2 or perturbation_interval < 1:
        raise ValueError("search_lr needs grace_period >= 1, reduction_factor >= 2 and perturbation_interval >= 1, "
                         f"got {grace_period}, {reduction_factor}, {perturbation_interval}")
    if max_concurrent is not None and max_concurrent < 1:
        raise ValueError(f"search_lr: max_concurrent must be >= 1, got {max_concurrent}")
    if method in ("race", "pbt") and max_concurrent is not None and max_concurrent < trials:
        # Tune's limit holds trials back until others end; the race and PBT compare every trial at the
        # same step, so they would decide among whoever happened to be there.
        raise ValueError(f"search_lr(method={method!r}) compares all {trials} trials at the same step, so they must all "
                         f"be in the search at once: max_concurrent={max_concurrent} < trials is not possible; "
                         "limit the trials running at a time with cpus_per_trial (or num_cpus) instead")
    saved = saved_search(storage_path, name, method) if resume else None
    if not (isinstance(model, pl.LightningModule) or callable(model)):
        raise TypeError(f"search_lr: model must be a LightningModule or a callable returning one, "
                        f"got {type(model).__name__}")
    from lrfuse.lightning.search import cluster

    reports = math.ceil(max_steps / eval_every)
    budget = reports * eval_every  # every trial ends on a validation
    trainer_kwargs = dict(trainer_kwargs or {})
    decided = sorted(DECIDED_TRAINER_ARGS & set(trainer_kwargs))
    if decided:
        raise ValueError(f"search_lr(trainer_kwargs=...): {', '.join(decided)} are the search's to set for every trial "
                         "(budget: max_steps=, validation period: eval_every=; no checkpoints, loggers or progress "
                         "bars of a trial's own: Tune keeps both); remove them from trainer_kwargs")
    trainer_kwargs.setdefault("accelerator", "gpu" if gpus_per_trial > 0 else "cpu")
    trainer_kwargs.setdefault("devices", 1)
    # The trials' temporary folders, and the session folders of a Ray started here: removed below.
    scratch = tempfile.mkdtemp(prefix="lrfuse-")
    started = False
    try:
        # Ray first (it fails at once when missing, and starts while the finder runs).
        started = cluster.init(address=address, num_cpus=num_cpus, include_dashboard=include_dashboard,
                               session_dir=cluster.session_dir_in(scratch),
                               **({"runtime_env": runtime_env} if runtime_env else {}))
        finder = None
        if saved is not None:  # the saved range: the trials' LRs are fixed already
            min_lr, max_lr = saved["low"], saved["high"]
        elif min_lr is None:
            finder = _run_finder(model, datamodule, trainer_kwargs, seed, finder_kwargs or {})
            if finder.lr is None:
                raise RuntimeError(f"search_lr: the LR finder made no suggestion ({finder.reason}); pass min_lr and "
                                   "max_lr to search a range of your choice")
            min_lr, max_lr = finder.low, finder.high
            if not min_lr < max_lr:  # a one-point range: search half a decade either side
                min_lr, max_lr = finder.lr / 3, finder.lr * 3
        lrs = _initial_lrs(method, trials, min_lr, max_lr, seed)
        payload = Payload(model=model, datamodule=datamodule, trainer_kwargs=trainer_kwargs, metric=metric, mode=mode,
                          seed=seed, threads=max(1, int(cpus_per_trial)), eval_every=eval_every, max_steps=budget,
                          health_every=max(1, budget // 30), audit=audit, scratch=scratch)
        settings = TuneSettings(method=method, lrs=lrs, low=min_lr, high=max_lr, reports=reports, seed=seed,
                                cpus=cpus_per_trial, gpus=gpus_per_trial, max_concurrent=max_concurrent,
                                storage_path=storage_path, name=name, max_failures=max_failures,
                                grace_period=grace_period, reduction_factor=reduction_factor,
                                perturbation_interval=perturbation_interval, verbose=verbose, resume=resume)
        results, path = run_tune(settings, payload)
    finally:
        if started:
            import ray

            ray.shutdown()
        shutil.rmtree(scratch, ignore_errors=True)
    trials_run = records(results, metric, mode, budget, method)
    best = pick(trials_run, mode, budget)
    # A factory's model exists only in the trials: they report its LR argument's name.
    attr = (lr_attr(model) or "lr") if isinstance(model, pl.LightningModule) else next(
        (r.metrics["lr_attr"] for r in results if r.metrics and r.metrics.get("lr_attr")), "lr")
    return LRSearchResult(lr=None if best is None else best.lr, group_lrs=[] if best is None else best.group_lrs,
                          method=method, metric=metric, mode=mode, low=float(min_lr), high=float(max_lr), trials=trials_run,
                          budget_steps=budget, finder=finder, path=path, seconds=time.perf_counter() - start,
                          lr_attr=attr)


def _run_finder(model, datamodule, trainer_kwargs: dict, seed: int, finder_kwargs: dict):
    """The range test on a copy of the model (or a fresh one from the factory), seeded as the trials
    are. Its curve gives the search's range; the finder's own race is left out (``race=False``
    unless ``finder_kwargs`` says otherwise): the search's trials are the comparison."""
    finder_kwargs = {"race": False, **finder_kwargs}
    pl.seed_everything(seed, verbose=False)
    probe = make_model(model)
    kwargs = {k: v for k, v in trainer_kwargs.items() if k != "callbacks"}
    with tempfile.TemporaryDirectory() as root:
        trainer = pl.Trainer(**{**kwargs, **FORCED, "max_epochs": 1, "default_root_dir": root})
        return find_lr(trainer, probe, datamodule=copy.deepcopy(datamodule), **finder_kwargs)


def _initial_lrs(method: str, trials: int, low: float, high: float, seed: int) -> list[float]:
    if method in ("grid", "race"):
        return [float(v) for v in np.geomspace(low, high, trials)] if trials > 1 else [math.sqrt(low * high)]
    rng = np.random.default_rng(seed)
    return [float(v) for v in np.exp(rng.uniform(math.log(low), math.log(high), trials))]


