"""LRFinder on a real Trainer: everything restored, the suggestion applied, ratios kept."""

from __future__ import annotations

import os
import random

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from conftest import Tiny, TinyData, quiet_trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.precision import MixedPrecision

import lrfuse
from lrfuse.lightning import LRFinder, find_lr
from lrfuse.lr_range import LRRangeResult, race_pick


def rng_state():
    return random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state().clone()


def same_rng(a, b):
    return a[0] == b[0] and np.array_equal(a[1], b[1]) and torch.equal(a[2], b[2])


class Probe(Callback):
    """Before the finder: make optimizer state exist and record everything. After it: compare."""

    def __init__(self, before: Probe | None = None):
        self.before = before
        self.seen = {}

    def on_fit_start(self, trainer, pl_module):
        if self.before is None:
            # The finder sets the loaders up before its snapshot (their creation may draw from the
            # RNG, as it does in fit without the finder): do it here so the RNG compared is the same.
            trainer.fit_loop.setup_data()
            opt = trainer.optimizers[0]
            for p in pl_module.parameters():
                p.grad = torch.full_like(p, 0.01)
            opt.step()  # state that the sweep must not keep
            for p in pl_module.parameters():
                p.grad = None
            self.seen = dict(
                weights={k: v.clone() for k, v in pl_module.state_dict().items()},
                opt_state={id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()},
                lrs=[g["lr"] for g in opt.param_groups],
                sched=[c.scheduler.state_dict() for c in trainer.lr_scheduler_configs],
                rng=rng_state(), global_step=trainer.global_step, epoch=trainer.current_epoch,
                loop=trainer.fit_loop.state_dict(), training=pl_module.training, callbacks=list(trainer.callbacks))
        else:
            opt = trainer.optimizers[0]
            self.seen = dict(weights={k: v.clone() for k, v in pl_module.state_dict().items()},
                             opt_state={id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()},
                             lrs=[g["lr"] for g in opt.param_groups], sched=[c.scheduler.state_dict() for c in trainer.lr_scheduler_configs],
                             rng=rng_state(), loop=trainer.fit_loop.state_dict(), global_step=trainer.global_step,
                             epoch=trainer.current_epoch, training=pl_module.training, callbacks=list(trainer.callbacks))


def run_with_probes(tmp_path, model, finder, **trainer_kwargs):
    before = Probe()
    after = Probe(before)
    trainer = quiet_trainer(tmp_path, max_steps=1, callbacks=[before, finder, after], **trainer_kwargs)
    trainer.fit(model, datamodule=TinyData())
    return trainer, before.seen, after.seen


def assert_restored(before, after):
    for k, v in before["weights"].items():
        assert torch.equal(v, after["weights"][k]), k  # bit for bit
    assert set(before["opt_state"]) == set(after["opt_state"])
    for p, s in after["opt_state"].items():
        for k, v in s.items():
            assert torch.equal(v, before["opt_state"][p][k]), k
    # The schedulers' counters are untouched; only their LRs follow the applied suggestion.
    strip = lambda states: [{k: v for k, v in st.items() if k not in ("base_lrs", "_last_lr")} for st in states]  # noqa: E731
    assert strip(before["sched"]) == strip(after["sched"])
    assert same_rng(before["rng"], after["rng"])
    assert before["loop"] == after["loop"]
    assert (before["global_step"], before["epoch"]) == (after["global_step"], after["epoch"]) == (0, 0)
    assert before["callbacks"] == after["callbacks"]
    assert before["training"] == after["training"]


def test_callback_restores_everything_and_applies_the_suggestion(tmp_path):
    pl.seed_everything(0)
    model = Tiny(lr=1e-3)
    finder = LRFinder(min_lr=1e-5, max_lr=10.0, num_steps=60)
    trainer, before, after = run_with_probes(tmp_path, model, finder)
    assert_restored(before, after)
    result = finder.result
    assert isinstance(result, LRRangeResult) and result.ok, result.reason
    assert len(result.lrs) <= 60 and result.low <= result.lr <= result.high
    # Applied to the optimizer (then trained with it) and to model.lr and hparams.lr.
    assert after["lrs"][0] == pytest.approx(result.lr)
    assert model.lr == model.hparams.lr == pytest.approx(result.lr)
    assert trainer.global_step == 1  # the fit itself went on
    assert not os.listdir(tmp_path)  # no checkpoint (or anything) left behind
    assert "log" not in vars(model)  # self.log is Lightning's again


def test_multi_group_ratios_and_schedulers(tmp_path):
    pl.seed_everything(0)
    model = Tiny(lr=1e-2, groups=True, scheduler=True)
    finder = LRFinder(min_lr=1e-5, max_lr=10.0, num_steps=60)
    trainer, before, after = run_with_probes(tmp_path, model, finder)
    assert_restored(before, after)
    lrs = after["lrs"]
    base = before["lrs"]
    assert lrs[-1] == pytest.approx(finder.result.lr)  # the head: the reference group
    assert [lr / lrs[-1] for lr in lrs] == pytest.approx([b / base[-1] for b in base])  # ratios survive
    sched = trainer.lr_scheduler_configs[0].scheduler
    assert sched.base_lrs == pytest.approx(lrs)  # the scheduler continues from the new LRs
    assert sched.last_epoch == 0


def test_restored_when_training_raises(tmp_path):
    pl.seed_everything(0)
    model = Tiny(lr=1e-3, fail_at=6)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = quiet_trainer(tmp_path, max_steps=1)
    state = rng_state()
    with pytest.raises(RuntimeError, match="boom"):
        find_lr(trainer, model, datamodule=TinyData(), min_lr=1e-5, max_lr=1.0, num_steps=30)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
    assert same_rng(state, rng_state())
    assert trainer.global_step == 0 and not os.listdir(tmp_path)
    assert "log" not in vars(model) and model.lr == 1e-3
    assert not any(isinstance(cb, LRFinder) for cb in trainer.callbacks)


def test_find_lr_on_demand_then_fit_uses_it(tmp_path):
    pl.seed_everything(0)
    model = Tiny(lr=1e-3)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    state = rng_state()
    trainer = quiet_trainer(tmp_path, max_steps=2)
    result = lrfuse.find_lr(trainer, model, datamodule=TinyData(), min_lr=1e-5, max_lr=10.0, num_steps=60,
                            plot_path=str(tmp_path / "lr.png"))
    assert result.ok and model.lr == pytest.approx(result.lr)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
    assert same_rng(state, rng_state())
    assert trainer.global_step == 0 and trainer.current_epoch == 0
    assert os.listdir(tmp_path) == ["lr.png"]
    trainer.fit(model, datamodule=TinyData())
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(result.lr)
    assert trainer.global_step == 2


def test_no_suggestion_leaves_the_lr(tmp_path):
    pl.seed_everything(0)
    model = Tiny(lr=1e-3)
    trainer = quiet_trainer(tmp_path, max_steps=1)
    with pytest.warns(UserWarning, match="left unchanged"):
        result = find_lr(trainer, model, datamodule=TinyData(), min_lr=1e-9, max_lr=1e-8, num_steps=20)
    assert result.lr is None and result.reason and model.lr == 1e-3


def test_works_with_torch_optimizers_and_named_attribute(tmp_path):
    pl.seed_everything(0)
    model = Tiny(lr=1e-2, optimizer="SGD")
    result = find_lr(quiet_trainer(tmp_path, max_steps=1), model, datamodule=TinyData(), min_lr=1e-4, max_lr=100.0,
                     num_steps=40, attr_name="lr")
    assert result.ok and model.lr == pytest.approx(result.lr)


def test_argument_errors():
    with pytest.raises(ValueError, match="min_lr < max_lr"):
        LRFinder(min_lr=1.0, max_lr=0.1)
    with pytest.raises(ValueError, match="method must be one of"):
        LRFinder(method="magic")


def test_manual_optimization_is_refused(tmp_path):
    class Manual(Tiny):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

    with pytest.raises(ValueError, match="automatic optimization"):
        find_lr(quiet_trainer(tmp_path, max_steps=1), Manual(), datamodule=TinyData(), num_steps=10)


def test_plot_goes_to_file_and_to_loggers_that_take_images(tmp_path):
    pytest.importorskip("matplotlib")
    from lightning.pytorch.loggers import CSVLogger

    class ImageLogger(CSVLogger):
        images = []

        def log_image(self, key, images, step=None, **kwargs):
            self.images.append((key, images))

    pl.seed_everything(0)
    plot = tmp_path / "plots" / "lr.png"
    plot.parent.mkdir()
    finder = LRFinder(min_lr=1e-5, max_lr=10.0, num_steps=60, plot_path=str(plot))
    trainer = quiet_trainer(tmp_path, max_steps=1, callbacks=[finder], logger=ImageLogger(str(tmp_path / "logs")))
    trainer.fit(Tiny(lr=1e-3), datamodule=TinyData())
    assert plot.stat().st_size > 1000
    assert ImageLogger.images == [("lr_finder", [str(plot)])]


def test_skipped_under_fast_dev_run(tmp_path):
    finder = LRFinder()
    quiet_trainer(tmp_path, fast_dev_run=True, callbacks=[finder]).fit(Tiny(), datamodule=TinyData())
    assert finder.result is None


class GivenLRs(Tiny):
    """Tiny whose optimizer starts at the given group LRs (those a finder left)."""

    def __init__(self, group_lrs: list[float] | None = None, **kwargs):
        super().__init__(**kwargs)
        self.group_lrs = group_lrs

    def configure_optimizers(self):
        opt = super().configure_optimizers()
        for group, lr in zip(opt.param_groups, self.group_lrs or []):
            group["lr"] = lr
        return opt


class Shuffled(TinyData):
    """Shuffled batches from the global RNG, from the loader's own generator, or in a persistent worker."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def train_dataloader(self):
        own = torch.Generator().manual_seed(1) if self.kind == "own generator" else None
        workers = 1 if self.kind == "persistent worker" else 0
        return torch.utils.data.DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, generator=own,
                                           num_workers=workers, persistent_workers=workers > 0)


class TrainStart(Callback):
    def on_train_start(self, trainer, pl_module):
        self.lrs = [float(g["lr"]) for g in trainer.optimizers[0].param_groups]


def fit_for(tmp_path, kind: str, precision: str, finder=None, group_lrs=None):
    pl.seed_everything(0, verbose=False)
    model = GivenLRs(group_lrs=group_lrs, lr=1e-3, groups=True)
    start = TrainStart()
    amp = {"plugins": [MixedPrecision("16-mixed", "cpu")]} if precision == "16-mixed" else {}
    trainer = quiet_trainer(tmp_path, max_steps=12, callbacks=[*filter(None, [finder]), start], **amp)
    trainer.fit(model, datamodule=Shuffled(kind))  # 8 batches an epoch: a second shuffle too
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return model, start.lrs, None if scaler is None else scaler.state_dict()


@pytest.mark.parametrize("kind, precision", [("global rng", "32-true"), ("own generator", "32-true"),
                                             ("persistent worker", "32-true"), ("global rng", "16-mixed")])
def test_fit_with_the_finder_equals_a_plain_fit_at_its_lrs(tmp_path, kind, precision):
    """The finder leaves no trace: data order, RNG, GradScaler and weights continue as if training
    had started at the LRs it applied."""
    finder = LRFinder(min_lr=1e-4, max_lr=1.0, num_steps=20)
    found, lrs, scaler = fit_for(tmp_path / "finder", kind, precision, finder=finder)
    assert finder.result.lr is not None and lrs[-1] == pytest.approx(finder.result.lr) and lrs[-1] != 1e-3
    plain, plain_lrs, plain_scaler = fit_for(tmp_path / "plain", kind, precision, group_lrs=lrs)
    assert plain_lrs == lrs
    for (name, p), q in zip(found.named_parameters(), plain.parameters()):
        assert torch.equal(p, q), name
    for (name, b), c in zip(found.named_buffers(), plain.buffers()):
        assert torch.equal(b, c), name
    assert scaler == plain_scaler


class OneCycle(Tiny):
    """Layer-wise groups under OneCycleLR stepped per batch, peaking at ``max_lrs`` (default: the groups' LRs)."""

    def __init__(self, max_lrs: list[float] | None = None, **kwargs):
        super().__init__(**kwargs)
        self.max_lrs = max_lrs

    def configure_optimizers(self):
        opt = super().configure_optimizers()
        peaks = self.max_lrs or [g["lr"] for g in opt.param_groups]
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=peaks, total_steps=30)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class LRTrace(Callback):
    def on_train_start(self, trainer, pl_module):
        self.peaks = [g["max_lr"] for g in trainer.optimizers[0].param_groups]
        self.lrs = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append([float(g["lr"]) for g in trainer.optimizers[0].param_groups])


def test_suggestion_survives_one_cycle_lr(tmp_path):
    """OneCycleLR computes every LR from each group's max_lr: the finder scales those too, so the
    schedule runs at the suggestion, as one configured with it from the start."""
    trace, plain = LRTrace(), LRTrace()
    pl.seed_everything(0, verbose=False)
    finder = LRFinder(min_lr=1e-4, max_lr=1.0, num_steps=20)
    quiet_trainer(tmp_path / "a", max_steps=10, callbacks=[finder, trace]).fit(
        OneCycle(lr=1e-3, groups=True), datamodule=TinyData())
    assert trace.peaks[-1] == pytest.approx(finder.result.lr) and finder.result.lr != pytest.approx(1e-3)
    pl.seed_everything(0, verbose=False)
    quiet_trainer(tmp_path / "b", max_steps=10, callbacks=[plain]).fit(
        OneCycle(lr=1e-3, groups=True, max_lrs=trace.peaks), datamodule=TinyData())
    assert len(trace.lrs) == len(plain.lrs) == 10
    for mine, theirs in zip(trace.lrs, plain.lrs):
        assert mine == pytest.approx(theirs, rel=1e-12)


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_lr=float("inf")), "LRFinder: max_lr must be a finite number > 0, got inf; pass e.g. max_lr=1.0"),
    (dict(bandwidth=-1), r"LRFinder: bandwidth must be in \(0, 0.5\]"),
    (dict(bandwidth=5), r"LRFinder: bandwidth must be in \(0, 0.5\]"),
    (dict(diverge_factor=1.0), "LRFinder: diverge_factor must be a finite number > 1"),
    (dict(schedule="cosine"), "LRFinder: schedule must be 'auto', None, an LRSchedule"),
])
def test_bad_arguments_name_the_argument_and_the_fix(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LRFinder(**kwargs)


class LRs(Callback):
    def __init__(self):
        self.lrs = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.lrs.append(float(optimizer.param_groups[0]["lr"]))


def test_suggestion_is_the_peak_of_the_trainers_schedule(tmp_path):
    from lrfuse.lightning import LRSchedule
    from lrfuse.schedules import make_schedule, mean_factor

    sweep = dict(min_lr=1e-4, max_lr=10.0, num_steps=40, race=False)  # the curve's schedule-aware pick
    pl.seed_everything(0)
    blind = find_lr(quiet_trainer(tmp_path, max_steps=40), Tiny(), datamodule=TinyData(), **sweep)
    pl.seed_everything(0)
    trainer = quiet_trainer(tmp_path, max_steps=40, callbacks=[LRSchedule("cosine", warmup_steps=4)])
    aware = find_lr(trainer, Tiny(), datamodule=TinyData(), **sweep)
    mean = mean_factor(make_schedule("cosine", total_steps=40, warmup_steps=4), 40)
    assert aware.lrs == blind.lrs and aware.losses == blind.losses  # the same sweep, read for the schedule
    assert aware.schedule_mean == pytest.approx(mean) and blind.schedule_mean == 1.0
    assert aware.constant_lr == blind.lr and blind.lr < aware.lr <= blind.lr / mean
    pl.seed_everything(0)
    off = find_lr(quiet_trainer(tmp_path, max_steps=40, callbacks=[LRSchedule("cosine", warmup_steps=4)]), Tiny(),
                  datamodule=TinyData(), schedule=None, **sweep)
    assert off.lr == blind.lr  # schedule=None: a constant LR whatever the trainer holds

    # In fit: the LRSchedule callback starts from the applied suggestion, which becomes its peak.
    pl.seed_everything(0)
    finder, lrs = LRFinder(**sweep), LRs()
    fit_trainer = quiet_trainer(tmp_path, max_steps=40, callbacks=[finder, LRSchedule("cosine", warmup_steps=4), lrs])
    fit_trainer.fit(Tiny(), datamodule=TinyData())
    assert finder.result.lr == pytest.approx(aware.lr) and max(lrs.lrs) == pytest.approx(aware.lr)


class TorchScheduled(Tiny):
    """Tiny with a per-step torch LR scheduler from configure_optimizers."""

    def __init__(self, kind: str, steps: int, **kwargs):
        super().__init__(**kwargs)
        self.kind, self.steps = kind, steps

    def configure_optimizers(self):
        opt = lrfuse.FusedAdam(self.parameters(), lr=self.lr)
        sched = torch.optim.lr_scheduler
        if self.kind == "cosine":
            scheduler = sched.CosineAnnealingLR(opt, T_max=self.steps)
        else:
            scheduler = sched.OneCycleLR(opt, max_lr=self.lr, total_steps=self.steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


@pytest.mark.parametrize("kind", ["cosine", "onecycle"])
def test_suggestion_is_the_peak_of_a_torch_scheduler(kind, tmp_path):
    """schedule="auto" reads the scheduler configure_optimizers returns: the sweep is the same, the
    suggestion is that schedule's peak, and in fit the scheduler peaks at it."""
    steps = 40
    sweep = dict(min_lr=1e-4, max_lr=10.0, num_steps=40, race=False)  # the curve's schedule-aware pick
    pl.seed_everything(0)
    blind = find_lr(quiet_trainer(tmp_path, max_steps=steps), TorchScheduled(kind, steps), datamodule=TinyData(),
                    schedule=None, **sweep)
    pl.seed_everything(0)
    aware = find_lr(quiet_trainer(tmp_path, max_steps=steps), TorchScheduled(kind, steps), datamodule=TinyData(), **sweep)
    # The factors torch's scheduler gives over the run, from a scheduler of its own.
    probe = lrfuse.FusedAdam([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(probe, T_max=steps) if kind == "cosine"
                 else torch.optim.lr_scheduler.OneCycleLR(probe, max_lr=1.0, total_steps=steps))
    factors = []
    for _ in range(steps):
        factors.append(probe.param_groups[0]["lr"])
        probe.step()
        scheduler.step()
    assert aware.lrs == blind.lrs and aware.losses == blind.losses
    assert blind.schedule_mean == 1.0 and aware.schedule_mean == pytest.approx(sum(factors) / steps / max(factors))
    assert aware.constant_lr == blind.lr and blind.lr < aware.lr <= blind.lr / aware.schedule_mean * (1 + 1e-12)

    pl.seed_everything(0)
    finder, lrs = LRFinder(**sweep), LRs()
    trainer = quiet_trainer(tmp_path, max_steps=steps, callbacks=[finder, lrs])
    trainer.fit(TorchScheduled(kind, steps), datamodule=TinyData())
    assert finder.result.lr == pytest.approx(aware.lr)
    assert max(lrs.lrs) == pytest.approx(aware.lr)  # the scheduler peaks at the suggestion


# The race (issue 19): candidates around the curve's edge, trained from one start, judged on held-out loss.

class Recorder(pl.Callback):
    """What the race's isolation must hide: any hook call during find_lr."""

    def __init__(self):
        self.calls = 0

    def on_train_batch_start(self, *args):
        self.calls += 1


def test_race_trains_each_candidate_from_the_same_start_on_held_out_data(tmp_path):
    from lrfuse.lightning._sweep import race

    pl.seed_everything(0)
    # The race, run inside fit at its start (as LRFinder does), with a repeated LR and LR 0.
    out = {}

    class Race(pl.Callback):
        def on_fit_start(self, trainer, pl_module):
            before = [p.detach().clone() for p in pl_module.parameters()]
            out["losses"] = race(trainer, pl_module, [1e-2, 0.0, 1e-2, 5e-2], steps=6)
            out["again"] = race(trainer, pl_module, [5e-2], steps=6)
            out["zero"] = race(trainer, pl_module, [1e-2], steps=6, factor=lambda t: 0.0)
            out["same_weights"] = all(torch.equal(a, b) for a, b in zip(before, pl_module.parameters()))
            raise SystemExit  # stop fit here

    trainer = quiet_trainer(tmp_path, max_steps=50, callbacks=[Race()])
    with pytest.raises(SystemExit):
        trainer.fit(Tiny(lr=1e-2), datamodule=TinyData())
    lr_a, untrained, lr_a_again, lr_b = out["losses"]
    assert lr_a == lr_a_again and out["again"] == [lr_b]  # one start, one batch order, every time
    assert out["zero"] == [untrained] and lr_a < untrained  # LR 0 (or factor 0) trains nothing
    assert out["same_weights"]


def test_race_picks_from_held_out_losses_and_restores_everything(tmp_path):
    sweep = dict(min_lr=1e-5, max_lr=10.0, num_steps=40)
    pl.seed_everything(0)
    recorder = Recorder()
    trainer = quiet_trainer(tmp_path, max_steps=50, callbacks=[recorder])
    raced = find_lr(trainer, Tiny(), datamodule=TinyData(), **sweep)
    assert recorder.calls == 0  # no other callback saw the sweep's or the race's steps
    assert raced.method == "race" and raced.race["steps"] == 10  # a fifth of the 50-step run
    assert raced.race["lrs"] == pytest.approx([raced.edge * 10 ** d for d in (0.5, 0.0, -0.5, -1.0)])
    assert raced.lr == pytest.approx(race_pick(raced.race["lrs"], raced.race["losses"]))
    pl.seed_everything(0)
    curve = find_lr(quiet_trainer(tmp_path, max_steps=50), Tiny(), datamodule=TinyData(), race=False, **sweep)
    assert curve.lrs == raced.lrs and curve.losses == raced.losses and curve.race is None
    assert raced.race["curve_lr"] == curve.lr
    pl.seed_everything(0)
    fixed = find_lr(quiet_trainer(tmp_path, max_steps=50), Tiny(), datamodule=TinyData(), race_steps=3, **sweep)
    assert fixed.race["steps"] == 3
    # Without validation data the held-out loss is the next training batches'.
    pl.seed_everything(0)
    no_val = find_lr(quiet_trainer(tmp_path, max_steps=50, limit_val_batches=0), Tiny(), datamodule=TinyData(), **sweep)
    assert no_val.method == "race" and no_val.race["losses"] != raced.race["losses"]


def test_race_needs_a_known_run_length(tmp_path):
    pl.seed_everything(0)
    result = find_lr(quiet_trainer(tmp_path, max_epochs=-1), Tiny(), datamodule=TinyData(), min_lr=1e-5, max_lr=10.0,
                     num_steps=40)
    assert result.race is None and result.method == "auto"


def test_race_follows_the_runs_schedule_compressed(tmp_path):
    """Under a warm-up + cosine schedule every candidate trains under that shape, squeezed into the race."""
    from lrfuse.lightning import LRSchedule

    seen = []

    class Spy(Tiny):
        def on_before_optimizer_step(self, optimizer):
            seen.append(float(optimizer.param_groups[0]["lr"]))

    pl.seed_everything(0)
    trainer = quiet_trainer(tmp_path, max_steps=50, callbacks=[LRSchedule("cosine", warmup_steps=5)])
    result = find_lr(trainer, Spy(), datamodule=TinyData(), min_lr=1e-5, max_lr=10.0, num_steps=40)
    first = result.race["lrs"][0]
    raced = seen[len(result.lrs): len(result.lrs) + 10]  # the first candidate's 10 steps
    assert raced[0] == 0.0 and max(raced) == pytest.approx(first) and raced[-1] < 0.1 * first


def test_race_steps_is_checked():
    with pytest.raises(ValueError, match="race_steps must be an integer >= 1"):
        LRFinder(race_steps=0)
