"""The Lightning side of the LR range test: one training step at a given LR, and a snapshot that
puts everything back afterwards.

The sweep does not run Lightning's fit loop (which would advance ``global_step``, epochs, loop
progress and call every callback); it drives the strategy directly, one batch per step:
``strategy.training_step`` (through the DDP wrapper, so gradients are synchronised),
``strategy.backward`` and ``strategy.optimizer_step`` (precision plugin, gradient clipping and
AMP scaling as in training). Other callbacks are detached while it runs, ``self.log`` is a no-op,
and a :class:`Snapshot` taken before restores weights, buffers, gradients, ``requires_grad``,
optimizer state and groups, LR schedulers, the GradScaler, module train/eval flags, the global RNGs
and the training loaders' own generators afterwards, in memory. The loaders are set up before the
snapshot, where fit would set them up anyway, so whatever their creation draws from the RNG is
drawn once, as in a run without the finder.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

import lightning.pytorch as pl
from lightning.pytorch.utilities import CombinedLoader

from lrfuse.groups import set_group_lr
from lrfuse.lightning.runtime import loader_generators, rng_state, set_rng_state
from lrfuse.lr_range import LRRangeResult, range_test

__all__ = ["Snapshot", "race", "sweep"]


def _clone(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().clone()
    return copy.deepcopy(value)


@dataclass
class Snapshot:
    """Everything an LR sweep can change, copied in memory; :meth:`restore` writes it back."""

    tensors: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    grads: list[tuple[Tensor, Tensor | None]] = field(default_factory=list)
    training: list[tuple[torch.nn.Module, bool]] = field(default_factory=list)
    optimizers: list[tuple[torch.optim.Optimizer, dict, list[dict]]] = field(default_factory=list)
    schedulers: list[tuple[Any, dict]] = field(default_factory=list)
    scaler: tuple[Any, dict] | None = None  # the precision plugin's GradScaler ('16-mixed')
    requires_grad: list[tuple[Tensor, bool]] = field(default_factory=list)
    generators: list[tuple[torch.Generator, Tensor]] = field(default_factory=list)  # the loaders' own
    iterators: list[tuple[torch.utils.data.DataLoader, Any]] = field(default_factory=list)  # kept by loaders
    rng: dict = field(default_factory=dict)

    @classmethod
    def take(cls, trainer: pl.Trainer, model: pl.LightningModule) -> Snapshot:
        snap = cls()
        seen: set[int] = set()
        for t in [*model.parameters(), *model.buffers()]:
            if id(t) not in seen:
                seen.add(id(t))
                snap.tensors.append((t, t.detach().clone()))
        snap.grads = [(p, None if p.grad is None else p.grad.detach().clone()) for p in model.parameters()]
        snap.requires_grad = [(p, p.requires_grad) for p in model.parameters()]
        snap.training = [(m, m.training) for m in model.modules()]
        for opt in trainer.optimizers:
            # Keyed by the parameter objects themselves: the optimizer keeps referring to them.
            state = {p: {k: _clone(v) for k, v in s.items()} for p, s in opt.state.items()}
            groups = [{k: _clone(v) for k, v in g.items() if k != "params"} for g in opt.param_groups]
            snap.optimizers.append((opt, state, groups))
        snap.schedulers = [(cfg.scheduler, copy.deepcopy(cfg.scheduler.state_dict()))
                           for cfg in trainer.lr_scheduler_configs]
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None:
            snap.scaler = (scaler, copy.deepcopy(scaler.state_dict()))
        for loader in _train_loaders(trainer):
            # With persistent_workers a loader keeps its iterator, and fit's (made by setup_data)
            # is that one: set it aside, so that the sweep iterates one of its own.
            snap.iterators.append((loader, loader._iterator))
            loader._iterator = None
            for gen in loader_generators(loader):
                snap.generators.append((gen, gen.get_state()))
        snap.rng = rng_state()
        return snap

    @torch.no_grad()
    def restore(self, detach: bool = False) -> None:
        """Write everything back; ``detach``: for another run of the finder's own (the loaders
        iterate afresh instead of fit's kept iterators)."""
        for t, saved in self.tensors:
            t.copy_(saved)
        for p, g in self.grads:
            p.grad = None if g is None else g.clone()
        for m, flag in self.training:
            m.training = flag
        for opt, state, groups in self.optimizers:
            opt.state.clear()
            for p, s in state.items():
                opt.state[p] = {k: _clone(v) for k, v in s.items()}
            for group, saved in zip(opt.param_groups, groups):
                for k in [k for k in group if k != "params" and k not in saved]:
                    del group[k]
                for k, v in saved.items():
                    if isinstance(v, Tensor) and isinstance(group.get(k), Tensor):
                        group[k].copy_(v)  # keep the tensor object others may hold
                    else:
                        group[k] = _clone(v)
        for p, flag in self.requires_grad:
            p.requires_grad_(flag)
        for scheduler, state in self.schedulers:
            scheduler.load_state_dict(copy.deepcopy(state))
        if self.scaler is not None:
            scaler, state = self.scaler
            scaler.load_state_dict(copy.deepcopy(state))
            scaler._per_optimizer_states.clear()  # a sweep step that raised may have left one unscaled
        for gen, state in self.generators:
            gen.set_state(state)
        for loader, kept in self.iterators:
            iterator, loader._iterator = loader._iterator, None if detach else kept
            if iterator is not kept and hasattr(iterator, "_shutdown_workers"):
                iterator._shutdown_workers()  # the sweep's own workers
        set_rng_state(self.rng)


def _flat(iterables: Any) -> list:
    """The iterables of a trainer's loaders: one, a list of them, or those a CombinedLoader holds."""
    if iterables is None:
        return []
    if isinstance(iterables, CombinedLoader):
        return list(iterables.flattened)
    return list(iterables) if isinstance(iterables, (list, tuple)) else [iterables]


def _train_loaders(trainer: pl.Trainer) -> list[torch.utils.data.DataLoader]:
    """The DataLoaders behind ``trainer.train_dataloader``."""
    return [it for it in _flat(trainer.train_dataloader) if isinstance(it, torch.utils.data.DataLoader)]


def _batches(trainer: pl.Trainer) -> Iterator[tuple[Any, int]]:
    """Training batches, cycling when the loader runs out before the sweep does."""
    iterables = trainer.train_dataloader
    if iterables is None:
        raise RuntimeError("LRFinder found no training dataloader; pass train_dataloaders or a datamodule to fit")
    loader = iterables if isinstance(iterables, torch.utils.data.DataLoader) else CombinedLoader(iterables, "max_size_cycle")
    idx = 0
    while True:
        empty = True
        iterator = iter(loader)
        for batch in iterator:
            if isinstance(loader, CombinedLoader):
                batch = batch[0]
            empty = False
            yield batch, idx
            idx += 1
        if empty:
            raise RuntimeError("LRFinder: the training dataloader is empty")


def _loss_of(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, dict) and isinstance(output.get("loss"), Tensor):
        return output["loss"]
    raise ValueError(
        "LRFinder needs training_step to return the loss (a tensor, or a dict with a 'loss' tensor); "
        f"it returned {type(output).__name__}")


class _Driver:
    """Training steps and held-out losses on the trainer's strategy, outside the fit loop.

    Every group's LR is ``lr * base[g] / reference`` at a step, where ``base`` are the groups' LRs
    before the finder and ``reference = max(base)``, so the ratios between groups survive.
    """

    def __init__(self, trainer: pl.Trainer, model: pl.LightningModule, optimizer: torch.optim.Optimizer,
                 base: list[float], val_loaders: list) -> None:
        self.trainer, self.model, self.optimizer, self.val_loaders = trainer, model, optimizer, val_loaders
        self.base, self.reference = base, max(base)
        self.batches = _batches(trainer)

    def step(self, lr: float) -> float:
        """One training step at ``lr`` (the reference group's); the loss, averaged over ranks."""
        strategy, optimizer = self.trainer.strategy, self.optimizer
        for group, b in zip(optimizer.param_groups, self.base):
            set_group_lr(group, lr * b / self.reference)
        batch, idx = next(self.batches)
        batch = strategy.batch_to_device(batch)
        losses: list[Tensor] = []

        def closure() -> Tensor:
            optimizer.zero_grad(set_to_none=True)
            loss = _loss_of(strategy.training_step(batch, idx))
            strategy.backward(loss, optimizer)
            losses.append(loss.detach())
            return loss

        with torch.enable_grad():
            strategy.optimizer_step(optimizer, closure, self.model)
        # Every rank decides on the same number: the mean loss over ranks.
        return float(strategy.reduce(losses[-1].float(), reduce_op="mean"))

    @torch.no_grad()
    def held_out_loss(self, max_batches: int) -> float:
        """The mean of ``training_step``'s loss in eval mode over up to ``max_batches`` batches of the
        validation loaders, or, without any, of the next training batches (averaged over ranks).

        Non-finite when any batch's loss is."""
        strategy = self.trainer.strategy
        self.model.eval()
        total, count = torch.zeros((), dtype=torch.float64, device=strategy.root_device), 0
        try:
            batches = ((b, i) for loader in self.val_loaders for i, b in enumerate(loader)) if self.val_loaders \
                else self.batches
            for batch, idx in batches:
                if count == max_batches:
                    break
                loss = _loss_of(strategy.training_step(strategy.batch_to_device(batch), idx))
                total += loss.detach().double()
                count += 1
        finally:
            self.model.train()
        return float(strategy.reduce(total / max(count, 1), reduce_op="mean"))


def _val_loaders(trainer: pl.Trainer) -> list:
    """The validation loaders fit will use (set up now, as fit would), or ``[]`` without any."""
    trainer.fit_loop.epoch_loop.val_loop.setup_data()
    return _flat(trainer.val_dataloaders)


@contextmanager
def _isolated(trainer: pl.Trainer, model: pl.LightningModule, optimizer_idx: int, held_out: bool = False):
    """Drive training steps outside the fit loop, then put everything back (see the module docstring).

    Yields ``(driver, rewind)``: ``rewind()`` restores the state from before, so that the next
    steps start from the same weights, optimizer state, RNGs and batch order.

    Raises:
        ValueError: for manual optimization, a missing optimizer or groups whose LRs are all 0.
    """
    if not model.automatic_optimization:
        raise ValueError("LRFinder needs automatic optimization (the sweep steps the optimizer itself); "
                         "set self.automatic_optimization = True or run the range test by hand with "
                         "lrfuse.lr_range.range_test")
    if not trainer.optimizers or optimizer_idx >= len(trainer.optimizers):
        raise ValueError(f"LRFinder: optimizer_idx={optimizer_idx} but configure_optimizers returned "
                         f"{len(trainer.optimizers)} optimizer(s)")
    optimizer = trainer.optimizers[optimizer_idx]
    base = [float(g["lr"]) for g in optimizer.param_groups]
    if max(base) <= 0:
        raise ValueError(f"LRFinder: every parameter group has lr <= 0 ({base}); give the optimizer a positive "
                         "lr (its value only sets the ratios between groups)")
    # Set up here, before the snapshot, not inside it: fit reuses these loaders, and whatever their
    # creation draws from the RNG must stay drawn, as in a run without the finder.
    trainer.fit_loop.setup_data()
    val_loaders = _val_loaders(trainer) if held_out else []
    snapshot = Snapshot.take(trainer, model)
    callbacks = trainer.callbacks
    patched = {name: model.__dict__.get(name) for name in ("log", "log_dict")}
    try:
        trainer.callbacks = []  # no other callback sees the finder's steps
        model.log = lambda *args, **kwargs: None  # the finder's metrics must not reach the trainer
        model.log_dict = lambda *args, **kwargs: None
        model.train()
        driver = _Driver(trainer, model, optimizer, base, val_loaders)

        def rewind() -> None:
            snapshot.restore(detach=True)
            driver.batches = _batches(trainer)

        yield driver, rewind
    finally:
        trainer.callbacks = callbacks
        for name, value in patched.items():
            if value is None:
                model.__dict__.pop(name, None)
            else:
                model.__dict__[name] = value
        snapshot.restore()


def sweep(trainer: pl.Trainer, model: pl.LightningModule, *, optimizer_idx: int = 0, min_lr: float, max_lr: float,
          num_steps: int, mode: str, diverge_factor: float, method: str, bandwidth: float,
          schedule_mean: float = 1.0, progress: Callable[[int, float, float], None] | None = None) -> LRRangeResult:
    """Run the range test on the trainer's optimizer ``optimizer_idx`` and restore everything.

    Returns:
        The range test's result (the LRs of the reference group, the one with the largest base LR).

    Raises:
        ValueError: for manual optimization, a missing optimizer or groups whose LRs are all 0.
    """
    strategy = trainer.strategy
    with _isolated(trainer, model, optimizer_idx) as (driver, _):
        result = range_test(driver.step, min_lr=min_lr, max_lr=max_lr, num_steps=num_steps, mode=mode,
                            diverge_factor=diverge_factor, method=method, bandwidth=bandwidth,
                            schedule_mean=schedule_mean, should_stop=lambda stop: strategy.reduce_boolean_decision(stop, all=False),
                            progress=progress)
        return strategy.broadcast(result)  # identical on every rank, whatever happened


def race(trainer: pl.Trainer, model: pl.LightningModule, lrs: Sequence[float], *, steps: int, optimizer_idx: int = 0,
         factor: Callable[[int], float] = lambda t: 1.0, held_out_batches: int = 32,
         progress: Callable[[int, float, float], None] | None = None) -> list[float]:
    """Train each of ``lrs`` for ``steps`` steps from the same start (weights, optimizer state, RNGs
    and batch order), at ``lr * factor(t)`` in step ``t``, and return each one's held-out loss
    (:meth:`_Driver.held_out_loss`), then restore everything. A run whose training loss turns
    non-finite stops there and scores ``inf``.

    Raises:
        ValueError: as :func:`sweep`.
    """
    strategy = trainer.strategy
    out: list[float] = []
    with _isolated(trainer, model, optimizer_idx, held_out=True) as (driver, rewind):
        for i, lr in enumerate(lrs):
            if i:
                rewind()
            finite = True
            for t in range(steps):
                finite = math.isfinite(driver.step(float(lr) * factor(t)))
                if strategy.reduce_boolean_decision(not finite, all=False):
                    finite = False
                    break
            loss = driver.held_out_loss(held_out_batches) if finite else math.inf
            out.append(loss if math.isfinite(loss) else math.inf)
            if progress is not None:
                progress(i, float(lr), out[-1])
    return out
