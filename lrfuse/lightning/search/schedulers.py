"""The Tune schedulers behind the race and PBT, and the stopper that ends a search at a trial's
error. Imported only when a search runs (they subclass Ray Tune's classes)."""

from __future__ import annotations

import json
import math
import os
import random

from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler, PopulationBasedTraining, TrialScheduler
from ray.tune.schedulers import pbt as tune_pbt
from ray.tune.stopper import Stopper

from lrfuse.lightning.search.trial import ERROR

__all__ = ["Race", "StopOnError", "SyncPBT", "rungs"]


def rungs(reports: int, grace_period: int, reduction_factor: int) -> list[int]:
    """Report counts at which the race halves: grace, grace * rf, ... (before the last report)."""
    out, r = [], grace_period
    while r < reports:
        out.append(r)
        r *= reduction_factor
    return out


class Race(FIFOScheduler):
    """Successive halving in lockstep: a trial that reaches a rung waits (paused, checkpointed)
    until every trial still in the race has reported there; then the best ``1 / reduction_factor``
    continue and the rest stop. Trials that end (diverge, fail) leave the race.

    The race's state is written to ``state_path`` at every change: Tune restores its trials, not a
    custom scheduler's state, and a resumed race must continue from the same rung."""

    def __init__(self, metric: str, mode: str, rungs: list[int], reduction_factor: int, state_path: str) -> None:
        super().__init__()
        self._metric, self._mode = metric, mode
        self.rungs, self.reduction_factor, self.state_path = rungs, reduction_factor, state_path
        self.alive: set[str] = set()
        self.scores: dict[int, dict[str, float]] = {r: {} for r in rungs}
        self.decided: set[int] = set()
        self.waiting: dict[str, int] = {}
        self._known: set[str] = set()  # every trial the race has seen (saved, for a resume)
        self._loaded = False

    def set_search_properties(self, metric, mode, **spec) -> bool:
        return True  # set at construction

    def _load(self) -> None:
        # Once, before the first trial: a resumed search finds the interrupted race's state.
        self._loaded = True
        if os.path.isfile(self.state_path):
            with open(self.state_path) as f:
                state = json.load(f)
            self.alive, self.decided = set(state["alive"]), set(state["decided"])
            self.scores = {r: dict(state["scores"].get(str(r), {})) for r in self.rungs}
            self.waiting = dict(state["waiting"])
            self._known = set(state["known"])

    def _save(self) -> None:
        state = {"alive": sorted(self.alive), "decided": sorted(self.decided), "waiting": self.waiting,
                 "scores": {str(r): v for r, v in self.scores.items()},
                 "known": sorted(self._known | self.alive)}
        os.makedirs(os.path.dirname(self.state_path), exist_ok=True)
        tmp = self.state_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(state, f)
        os.replace(tmp, self.state_path)

    def on_trial_add(self, tune_controller, trial) -> None:
        if not self._loaded:
            self._load()
        if trial.trial_id in self._known:
            return  # a resumed race's trial: the saved state says whether it is still racing
        self._known.add(trial.trial_id)
        self.alive.add(trial.trial_id)
        self._save()

    def _rung(self) -> int | None:
        return next((r for r in self.rungs if r not in self.decided), None)

    def _decide(self, tune_controller) -> None:
        rung = self._rung()
        if rung is None or any(t not in self.scores[rung] for t in self.alive):
            return
        # Ties (two diverged trials) go by trial id, i.e. the order of the LRs: never by timing or
        # by a set's order.
        ranked = sorted(self.alive, key=lambda t: (self.scores[rung][t], t))
        self.alive = set(ranked[:max(1, math.ceil(len(ranked) / self.reduction_factor))])
        self.decided.add(rung)
        self._save()
        for trial in tune_controller.get_trials():
            if trial.status in (Trial.PAUSED, Trial.PENDING) and trial.trial_id not in self.alive:
                tune_controller.stop_trial(trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        rung = self._rung()
        if rung is None or result.get("training_iteration") != rung:
            return TrialScheduler.CONTINUE
        value = float(result.get(self._metric, math.nan))
        score = value if self._mode == "min" else -value
        self.scores[rung][trial.trial_id] = math.inf if math.isnan(score) else score
        self._decide(tune_controller)
        if trial.trial_id not in self.alive:
            return TrialScheduler.STOP
        if rung in self.decided:
            return TrialScheduler.CONTINUE
        self.waiting[trial.trial_id] = rung
        self._save()
        return TrialScheduler.PAUSE

    def _leave(self, tune_controller, trial) -> None:
        self.alive.discard(trial.trial_id)
        self._save()
        self._decide(tune_controller)

    def on_trial_complete(self, tune_controller, trial, result) -> None:
        self._leave(tune_controller, trial)

    def on_trial_error(self, tune_controller, trial) -> None:
        self._leave(tune_controller, trial)

    def on_trial_remove(self, tune_controller, trial) -> None:
        self._leave(tune_controller, trial)

    def _may_run(self, trial) -> bool:
        # Not a trial cut by the race, nor one waiting at a rung not decided yet (after a resume
        # Tune requeues paused trials as pending).
        rung = self.waiting.get(trial.trial_id)
        return trial.trial_id in self.alive and (rung is None or rung in self.decided)

    def choose_trial_to_run(self, tune_controller):
        for trial in tune_controller.get_trials():
            # A trial cut while it was pausing (saving its checkpoint) can end up paused all the
            # same; Tune would wait for it forever. Stop it once the save is done.
            if (trial.status in (Trial.PENDING, Trial.PAUSED) and trial.trial_id in self._known
                    and trial.trial_id not in self.alive and not getattr(trial, "is_saving", False)):
                tune_controller.stop_trial(trial)
        for status in (Trial.PENDING, Trial.PAUSED):
            for trial in tune_controller.get_trials():
                if trial.status == status and self._may_run(trial):
                    return trial
        return None

    def debug_string(self) -> str:
        return f"lrfuse race: rungs {self.rungs}, {len(self.alive)} in the race"


class _Unfinished:
    """The controller as PBT sees it: its live trials are the unfinished ones (Tune's include failed trials)."""

    def __init__(self, controller) -> None:
        self._controller = controller

    def __getattr__(self, name: str):
        return getattr(self._controller, name)

    def get_live_trials(self):
        return [t for t in self._controller.get_trials() if t in self._controller.get_live_trials()
                and not t.is_finished()]


class SyncPBT(PopulationBasedTraining):
    """Tune's PBT, synchronous and seeded: the same search gives the same trials, LRs and values.

    Asynchronous PBT (Tune's default) decides a trial's exploit when that trial reports, against
    whoever else has reported by then, so the outcome depends on timing. In the synchronous mode
    a trial that reaches a perturbation point waits (paused, checkpointed) until every live trial
    has reached it; then all decisions are taken at once, in a fixed order (by score, ties by the
    order the trials were added). Time is our ``step`` (``interval`` steps between perturbations).

    Tune's PBT draws the donor and the perturbation from Python's global ``random`` (and would
    resample a Tune domain from numpy's global RNG), which anything else in the driver may draw
    from too; here they come from a ``random.Random(seed)`` of the scheduler's own, and the
    resample is a log-uniform draw from it. Besides:

    - The last report (``budget`` steps) decides nothing: an exploit there would give the trial a
      new LR with nothing left to train, and its record an LR that did not produce its value.
    - A diverged trial's report is not a PBT result: the trial ends (as in every method) and is
      reported as diverged.
    - Tune's check "every live trial is at the point" counts failed trials as live, and decides
      only when a trial reports: a trial that ends early (diverged, failed) while the others wait
      would leave them waiting forever. Here finished trials do not count, and when nothing can
      run and every live trial waits, the round is decided then (:meth:`choose_trial_to_run`).
    - Tune adds trials to a search a few at a time (up to about 16 pending), which is safe: a
      pending trial is live and has not reached the point, so no round is decided before every
      trial is there. A concurrency limit (``max_concurrent``) would hold trials back until others
      end, which is why :func:`search_lr` refuses one below the population.
    """

    def __init__(self, metric: str, mode: str, low: float, high: float, interval: int, budget: int, seed: int) -> None:
        self._rng = random.Random(seed)
        self._low, self._high, self._budget = low, high, budget
        super().__init__(time_attr="step", metric=metric, mode=mode, perturbation_interval=interval,
                         hyperparam_mutations={"lr": self._resample}, perturbation_factors=(2.0, 0.5),
                         quantile_fraction=0.25, synch=True)

    def _resample(self) -> float:
        return math.exp(self._rng.uniform(math.log(self._low), math.log(self._high)))

    def set_search_properties(self, metric, mode, **spec) -> bool:
        return True  # set at construction

    def _decide(self, controller, trial, result: dict) -> str:
        # Tune's pbt module calls random.choice / random.random: ours for the call. The Tune loop
        # runs in the driver's one thread, and nothing else reads that module's name.
        saved, tune_pbt.random = tune_pbt.random, self._rng
        try:
            return super().on_trial_result(_Unfinished(controller), trial, result)
        finally:
            tune_pbt.random = saved

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if result.get("diverged") or result.get("step", 0) >= self._budget:
            return TrialScheduler.CONTINUE
        return self._decide(tune_controller, trial, result)

    def choose_trial_to_run(self, tune_controller):
        trial = super().choose_trial_to_run(tune_controller)
        if trial is not None:
            return trial
        live = _Unfinished(tune_controller).get_live_trials()
        waiting = [t for t in live if t.status == Trial.PAUSED and not t.is_saving
                   and self._trial_state[t].last_train_time >= self._next_perturbation_sync]
        if not waiting or len(waiting) < len(live):
            return None
        # Every live trial waits at the point, and no report is coming to decide the round.
        self._decide(tune_controller, waiting[0], self._trial_state[waiting[0]].last_result)
        return super().choose_trial_to_run(tune_controller)


class StopOnError(Stopper):
    """Ends the whole search at a trial's error report (:data:`~lrfuse.lightning.search.trial.ERROR`)."""

    def __init__(self) -> None:
        self.error: str | None = None

    def __call__(self, trial_id: str, result: dict) -> bool:
        if result.get(ERROR):
            self.error = result[ERROR]
        return bool(result.get(ERROR))

    def stop_all(self) -> bool:
        return self.error is not None
