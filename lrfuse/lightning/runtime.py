"""What the finder, the search, the CLI, the demo and the benchmarks share about running Lightning
for the user: a quiet Trainer, quiet logs, the global RNGs and a loader's own generators, and the
names a model gives its learning rate. Each is written here once.
"""

from __future__ import annotations

import logging
import random
import warnings
from typing import Any

import numpy as np
import torch

__all__ = ["LR_ATTRS", "QUIET_TRAINER", "loader_generators", "lr_attr", "quiet_logs", "quiet_trainer", "rng_state",
           "set_rng_state"]

# The attribute or hyper-parameter that holds a LightningModule's LR, in the order they are tried.
LR_ATTRS = ("lr", "learning_rate")

# A Trainer that writes and prints nothing of its own: no logger, checkpoints, progress bar, model
# summary or sanity validation. A range test, a trial or a benchmark run decides what it keeps.
QUIET_TRAINER = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     num_sanity_val_steps=0)


def quiet_trainer(**overrides: Any) -> dict:
    """``pl.Trainer`` keyword arguments: :data:`QUIET_TRAINER` on one CPU device, then ``overrides``."""
    return {"accelerator": "cpu", "devices": 1, **QUIET_TRAINER, **overrides}


def quiet_logs(*loggers: str) -> None:
    """Lightning's info lines and warnings off (and the lines of ``loggers`` and their children,
    e.g. ``"ray"``).

    Call it after Lightning is imported: importing it sets its loggers to INFO (some of its modules,
    such as the tuner's, set their own too).
    """
    roots = ("lightning", *loggers)
    existing = [n for n in logging.root.manager.loggerDict if any(n.startswith(r + ".") for r in roots)]
    for name in (*roots, "lightning.pytorch", "lightning.fabric", *existing):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")
    warnings.filterwarnings("ignore", message=".*treespec.*")


def rng_state() -> dict:
    """The global RNGs' states (torch, CUDA where initialised, numpy, Python), in types that a
    checkpoint saves and loads with ``weights_only=True``."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
             "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Put back what :func:`rng_state` read (also after a checkpoint turned its tuples into lists)."""
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def loader_generators(loader: Any) -> list[torch.Generator]:
    """The torch generators a loader draws its order from besides the global RNG (its own, its
    sampler's, its batch sampler's and that one's sampler), each once, in that order."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    owners = (loader, getattr(loader, "sampler", None), batch_sampler, getattr(batch_sampler, "sampler", None))
    found: list[torch.Generator] = []
    for owner in owners:
        gen = getattr(owner, "generator", None)
        if isinstance(gen, torch.Generator) and all(gen is not g for g in found):
            found.append(gen)
    return found


def lr_attr(model: Any) -> str | None:
    """The name of ``model``'s LR (an attribute or hyper-parameter of :data:`LR_ATTRS`), or ``None``."""
    hparams = getattr(model, "hparams", None) or {}
    attrs = getattr(model, "__dict__", {})
    return next((name for name in LR_ATTRS if name in hparams or name in attrs), None)
