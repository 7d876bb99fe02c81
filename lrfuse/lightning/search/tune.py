"""Running a search on Ray Tune: its settings, the experiment folder (new, or resumed after
Ctrl-C), the scheduler of each method, and reading back what Tune returns."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

from lrfuse.lightning.search.trial import ERROR, Payload, run_trial

__all__ = ["TuneSettings", "race_state", "run_tune", "saved_search"]

_META = "lrfuse_search.json"  # the search's own settings, in the experiment folder (for resume)
# The race's state lives beside Tune's folder, not in it: on a resume Tune copies its folder to a
# staging folder and syncs that back over it, which would put the interrupted run's state back.
_RACE_STATE = os.path.join(".lrfuse", "{name}", "race.json")


@dataclass(frozen=True)
class TuneSettings:
    """How :func:`run_tune` runs the trials of one search (``search_lr``'s arguments, checked)."""

    method: str
    lrs: list[float]  # the trials' (initial) LRs
    low: float
    high: float
    reports: int  # reports of a full trial (its budget in validations)
    seed: int
    cpus: float = 1  # per trial
    gpus: float = 0  # per trial
    max_concurrent: int | None = None
    storage_path: str | None = None
    name: str | None = None
    max_failures: int = 1
    grace_period: int = 1
    reduction_factor: int = 2
    perturbation_interval: int = 2
    verbose: int = 0
    resume: bool = False


def storage(storage_path) -> str:
    return os.path.abspath(os.path.expanduser(os.fspath(storage_path or "~/ray_results")))


def race_state(storage_path, name: str) -> str:
    return os.path.join(storage(storage_path), _RACE_STATE.format(name=name))


def saved_search(storage_path, name: str | None, method: str) -> dict:
    """The settings a search saved in its experiment folder, checked before resuming it."""
    if not name:
        raise ValueError("search_lr(resume=True) needs name= (and storage_path= if not the default): the experiment "
                         "folder to resume, as the interrupted search printed it")
    folder = os.path.join(storage(storage_path), name)
    meta = os.path.join(folder, _META)
    if not os.path.isfile(meta):
        raise ValueError(f"search_lr(resume=True): {folder} holds no lrfuse search ({_META} missing); pass the "
                         "storage_path and name of the interrupted search, or drop resume=True to start one")
    with open(meta) as f:
        saved = json.load(f)
    if saved["method"] != method:
        raise ValueError(f"search_lr(resume=True): the search in {folder} is method={saved['method']!r}, not "
                         f"{method!r}; pass method={saved['method']!r}")
    return saved


def run_tune(settings: TuneSettings, payload: Payload) -> tuple[list, str]:
    """Run (or resume) the search's trials on Tune; returns Tune's results and the experiment folder.

    Raises the error a trial reported (the metric is not logged), or ``KeyboardInterrupt`` when Tune
    returned with trials unfinished (Ctrl-C)."""
    from ray import tune

    from lrfuse.lightning.search.schedulers import Race, StopOnError, SyncPBT, rungs

    s = settings
    name = s.name or f"lrfuse-{s.method}-{time.strftime('%Y%m%d-%H%M%S')}"
    folder = os.path.join(storage(s.storage_path), name)
    trainable = tune.with_resources(tune.with_parameters(run_trial, payload=payload), {"cpu": s.cpus, "gpu": s.gpus})
    if s.resume:
        # Finished trials stay; unfinished ones go on from their last checkpoint (Tune's own state).
        tuner = tune.Tuner.restore(folder, trainable=trainable, resume_unfinished=True)
        return _fit(tuner, folder, name, s, payload.max_steps)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, _META), "w") as f:
        json.dump({"method": s.method, "low": s.low, "high": s.high, "lrs": s.lrs, "budget": payload.max_steps,
                   "eval_every": payload.eval_every, "metric": payload.metric, "mode": payload.mode}, f)
    scheduler = None
    if s.method == "race":
        scheduler = Race(payload.metric, payload.mode, rungs(s.reports, s.grace_period, s.reduction_factor),
                         s.reduction_factor, race_state(s.storage_path, name))
    elif s.method == "pbt":
        scheduler = SyncPBT(payload.metric, payload.mode, s.low, s.high, s.perturbation_interval * payload.eval_every,
                            payload.max_steps, s.seed)
    run_config = tune.RunConfig(
        name=name, storage_path=storage(s.storage_path), stop=StopOnError(),
        failure_config=tune.FailureConfig(max_failures=s.max_failures),
        # PBT restores a trial from another's checkpoint, which must still be there: it keeps all.
        checkpoint_config=tune.CheckpointConfig(num_to_keep=None if s.method == "pbt" else 2), verbose=s.verbose)
    tuner = tune.Tuner(trainable, param_space={"lr": tune.grid_search(s.lrs)},
                       tune_config=tune.TuneConfig(metric=payload.metric, mode=payload.mode, scheduler=scheduler,
                                                   max_concurrent_trials=s.max_concurrent, reuse_actors=True),
                       run_config=run_config)
    return _fit(tuner, folder, name, s, payload.max_steps)


def _fit(tuner, folder: str, name: str, settings: TuneSettings, budget: int) -> tuple[list, str]:
    grid = tuner.fit()
    errors = [r.metrics[ERROR] for r in grid if r.metrics and r.metrics.get(ERROR)]
    if errors:
        raise ValueError(errors[0])
    # Ctrl-C makes Tune save the experiment, stop every trial and return as if done: a trial short of
    # the budget that neither failed, diverged nor lost the race says the search was interrupted.
    racing = None
    if settings.method == "race":
        with open(race_state(settings.storage_path, name)) as f:
            racing = set(json.load(f)["alive"])
    unfinished = [r for r in grid if r.error is None and (not r.metrics or (
        not r.metrics.get("diverged") and int(r.metrics.get("step", 0)) < budget
        and (racing is None or r.metrics.get("trial_id") in racing)))]
    if unfinished:
        storage_path = settings.storage_path
        where = f"name={name!r}" + ("" if storage_path is None else f", storage_path={os.fspath(storage_path)!r}")
        raise KeyboardInterrupt(f"search_lr was interrupted with {len(unfinished)} trial(s) unfinished; the experiment "
                                f"is saved in {folder}: resume it with search_lr(..., {where}, resume=True) or "
                                f"`lrfuse search ... --name {name} --resume`")
    return list(grid), grid.experiment_path
