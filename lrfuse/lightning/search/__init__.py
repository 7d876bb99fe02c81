"""LR search on Ray Tune: :func:`search_lr` with ``method="grid" | "random" | "race" | "pbt"``.

Each trial trains the user's LightningModule with a real ``Trainer`` at one learning rate: the
optimizer the model configures is scaled by ``lr / peak`` with :func:`lrfuse.lightning.finder.apply_lr`
(every group, so the ratios between groups stay). The trial's ``TrialReporter`` callback reports the
validation metric to Tune at every validation (every ``eval_every`` steps) with a checkpoint written
through Tune's storage, so PBT can copy weights and a failed trial resumes (``max_failures``). A
non-finite training loss stops the trial and is reported as diverged; the search goes on.

- ``grid``: ``trials`` LRs log-spaced over the range, each trained for the whole budget.
- ``random``: ``trials`` LRs drawn log-uniformly (seeded), each trained for the whole budget.
- ``race``: the grid's LRs race in lockstep: at each rung (``grace_period`` reports, then times
  ``reduction_factor``) every trial still in the race has reported, the best ``1 / reduction_factor``
  by validation metric go on and the others stop (successive halving, ``schedulers.Race``). Comparing
  at the same step from the same start is what makes it the "fastest learning rate" method;
  Tune's asynchronous ASHA would compare trials against whoever reached a rung first.
- ``pbt``: a population of ``trials`` (random LRs); at every ``perturbation_interval`` reports the
  worst quarter copies the weights of the best quarter and perturbs its LR (Tune's PBT in its
  synchronous mode, ``schedulers.SyncPBT``: every trial reaches the perturbation point before
  anything is decided, and the draws come from a generator seeded by ``seed``, so the same call
  gives the same trials, LRs and values whatever the timing).

Every trial starts from the same initial weights and the same data order (the model instance is
shipped once, or the factory is called after seeding; the RNG is seeded before fit), and keeps it
for the whole run: a trial paused at a race rung, retried, or resumed after Ctrl-C
(``resume=True``) continues with exactly the batches and RNG draws of an uninterrupted run
(``exact.ExactLoader``). Each trial reports a checksum of its initial weights and of the batches of
its first evaluation interval; with ``audit=True`` also a hash chained over every batch and the
weights' checksum at every report, so this is checked, not assumed. Under PBT a trial's new LR
reaches its optimizer, torch schedulers and :class:`~lrfuse.LRSchedule` callbacks alike. The range defaults to the plausible range of the LR finder, run
first (:func:`lrfuse.lightning.finder.find_lr`). Verdicts (too high / too low / ok) come from an
:class:`~lrfuse.lightning.health.LRHealthMonitor` attached to every trial.

The package, by job:

- ``api``: :func:`search_lr` (checks, the range, Ray, Tune, the result);
- ``trial``: one trial (its Trainer, the reporter callback, the Trainer arguments the search decides);
- ``exact``: checksums and the loader that resumes at the very batch;
- ``schedulers``: the race, synchronous seeded PBT and the stop-on-error rule (they subclass Tune's);
- ``tune``: the settings of a run on Tune, the experiment folder, resume;
- ``result``: :class:`TrialRecord` and :class:`LRSearchResult`;
- ``cluster``: starting Ray locally (127.0.0.1, usage statistics off) or joining a cluster.

Ray is imported only when a search starts: importing this package needs Lightning, not Ray.
"""

from lrfuse.lightning.search.api import METHODS, search_lr
from lrfuse.lightning.search.result import LRSearchResult, TrialRecord
from lrfuse.lightning.search.trial import DECIDED_TRAINER_ARGS

__all__ = ["DECIDED_TRAINER_ARGS", "METHODS", "LRSearchResult", "TrialRecord", "search_lr"]
