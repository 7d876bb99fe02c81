"""Trials that are bit-for-bit what they claim: checksums of weights and batches, and a training
loader that resumes at the very batch, RNG draws included (a race trial pauses at every rung, a
retried or resumed trial restarts from a checkpoint in the middle of an epoch)."""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from lrfuse.lightning.runtime import loader_generators, rng_state, set_rng_state

__all__ = ["ExactLoader", "checksum", "digest"]


def digest(obj: Any, h) -> None:
    """Feed ``obj`` to the hash ``h``: tensors bit for bit, nested lists / tuples / dicts, else its repr."""
    if isinstance(obj, torch.Tensor):
        h.update(obj.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            digest(item, h)
    elif isinstance(obj, dict):
        for key in sorted(obj, key=str):
            digest(obj[key], h)
    else:
        h.update(repr(obj).encode())


def checksum(obj: Any) -> str:
    """A short sha256 of tensors (bit for bit), nested lists / tuples / dicts of them, or reprs."""
    h = hashlib.sha256()
    digest(obj, h)
    return h.hexdigest()[:16]


class ExactLoader:
    """A trial's training loader that resumes at the very batch, RNG draws included.

    A plain loader resumed in the middle of an epoch would start the epoch over, in a new order.
    This wrapper is what Lightning sees (it saves a loader's ``state_dict`` in the checkpoint and
    hands it back before the resumed run's first batch). It records the RNG states (global torch /
    CUDA / numpy / Python, and the loader's own generators) at the start of each epoch. On resume
    it puts them back, iterates the inner loader again and skips the batches already trained on,
    so the sampler draws the same order; then, after as many batches as Lightning's fetcher had
    taken at the checkpoint, it restores the global RNGs of the checkpoint, so dropout and
    augmentations draw as in an uninterrupted run. The inner loader is iterated lazily (at the
    first batch), the same way in both runs. ``trained`` is counted by the trial's reporter.
    """

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self.trained = 0  # batches of this epoch trained on
        self.served = 0  # batches of this epoch handed to Lightning (its fetcher may be one ahead)
        self._epoch_start: dict | None = None
        self._pending: dict | None = None

    def __len__(self) -> int:
        return len(self.loader)

    # What Lightning reads or sets on a loader: samplers (set_epoch), the worker seeding function.
    @property
    def sampler(self):
        return getattr(self.loader, "sampler", None)

    @property
    def batch_sampler(self):
        return getattr(self.loader, "batch_sampler", None)

    @property
    def worker_init_fn(self):
        return getattr(self.loader, "worker_init_fn", None)

    @worker_init_fn.setter
    def worker_init_fn(self, fn) -> None:
        self.loader.worker_init_fn = fn

    def _states(self) -> dict:
        return {"global": rng_state(), "generators": [g.get_state() for g in loader_generators(self.loader)]}

    def _restore(self, states: dict) -> None:
        set_rng_state(states["global"])
        generators = loader_generators(self.loader)
        if len(generators) != len(states["generators"]):
            raise RuntimeError("search_lr: the training loader has a different number of generators than when the trial's "
                               "checkpoint was saved; build train_dataloader() the same way every time")
        for g, state in zip(generators, states["generators"]):
            g.set_state(state)

    def state_dict(self) -> dict:
        return {"epoch_start": self._epoch_start, "trained": self.trained, "served": self.served, "now": self._states()}

    def load_state_dict(self, state: dict) -> None:
        self._pending = state

    def __iter__(self):
        pending, self._pending = self._pending, None
        if pending is not None and hasattr(self.loader, "__len__") and pending["trained"] >= len(self.loader):
            # Saved at the end of an epoch: the next one starts from the checkpoint's RNG states. Now,
            # not at the first batch: Lightning ends the restored epoch and calls iter() once more.
            self._restore(pending["now"])
            pending = None
        return _ExactEpoch(self, pending)


class _ExactEpoch:
    """One epoch of an :class:`ExactLoader` (a resumed one skips what was trained)."""

    def __init__(self, owner: ExactLoader, pending: dict | None) -> None:
        self.owner, self.pending = owner, pending
        self.it = None
        self.restore_at: int | None = None

    def __iter__(self):
        return self

    def _start(self) -> None:
        owner, pending = self.owner, self.pending
        if pending is not None:
            owner._restore(pending["epoch_start"])
        owner._epoch_start = owner._states()
        owner.trained = owner.served = 0
        self.it = iter(owner.loader)
        if pending is None:
            return
        for _ in range(pending["trained"]):
            next(self.it)
        owner.trained = owner.served = pending["trained"]
        self.restore_at = pending["served"]

    def __next__(self):
        if self.it is None:
            self._start()
        if self.restore_at is not None and self.owner.served >= self.restore_at:
            set_rng_state(self.pending["now"]["global"])
            self.restore_at = None
        batch = next(self.it)
        self.owner.served += 1
        return batch
