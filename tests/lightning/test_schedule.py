"""LRSchedule on a real Trainer: factors at known steps, group ratios, plateau, resume."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
from conftest import Tiny, TinyData, quiet_trainer
from lightning.pytorch.callbacks import Callback

from lrfuse import schedules
from lrfuse.lightning import LRSchedule


class Recorder(Callback):
    """The LR of every group at each optimizer step (after LRSchedule has set it)."""

    def __init__(self):
        self.lrs: list[list[float]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.lrs.append([float(g["lr"]) for g in optimizer.param_groups])


def fit(tmp_path, schedule: LRSchedule, model=None, ckpt_path=None, **kwargs):
    rec = Recorder()
    model = model or Tiny(lr=0.1)
    trainer = quiet_trainer(tmp_path, callbacks=[schedule, rec], **kwargs)
    trainer.fit(model, datamodule=TinyData(), ckpt_path=ckpt_path)
    return trainer, rec.lrs


def test_cosine_with_warmup_per_step(tmp_path):
    _, lrs = fit(tmp_path, LRSchedule("cosine", warmup_steps=4), max_steps=20)
    expected = schedules.Warmup(schedules.Cosine(16), 4)
    assert [row[0] for row in lrs] == pytest.approx([0.1 * expected(t) for t in range(20)])


def test_total_steps_default_to_estimated_stepping_batches(tmp_path):
    trainer, lrs = fit(tmp_path, LRSchedule("onecycle"), max_epochs=2)  # 8 batches per epoch
    assert trainer.estimated_stepping_batches == 16
    assert [row[0] for row in lrs] == pytest.approx([0.1 * schedules.OneCycle(16)(t) for t in range(16)])


def test_multistep_per_epoch_keeps_group_ratios(tmp_path):
    model = Tiny(lr=0.1, groups=True)  # head 0.1, body 0.05
    _, lrs = fit(tmp_path, LRSchedule("multistep", interval="epoch", milestones=[1, 2], gamma=0.1), model=model,
                 max_epochs=3)
    per_epoch = [lrs[0], lrs[8], lrs[16]]
    assert per_epoch == [pytest.approx([0.05, 0.1]), pytest.approx([0.005, 0.01]), pytest.approx([0.0005, 0.001])]


def test_min_lr_floor(tmp_path):
    _, lrs = fit(tmp_path, LRSchedule("exponential", gamma=0.5, min_lr=0.01), max_steps=8)
    assert [row[0] for row in lrs] == pytest.approx([max(0.1 * 0.5 ** t, 0.01) for t in range(8)])


class Scripted(Tiny):
    """Logs a scripted `val_metric` each epoch."""

    def __init__(self, values):
        super().__init__(lr=0.1)
        self.values = values

    def on_validation_epoch_end(self):
        self.log("val_metric", float(self.values[self.current_epoch]))


def test_plateau_patience_and_min_delta(tmp_path):
    values = [1.0, 0.95, 0.93, 0.92, 0.5, 0.5, 0.5]
    schedule = LRSchedule("plateau", monitor="val_metric", patience=1, factor=0.5, min_delta=0.1,
                          threshold_mode="abs")
    _, lrs = fit(tmp_path, schedule, model=Scripted(values), max_epochs=7, limit_train_batches=1)
    # epoch 0: best=1.0; 1, 2: not 0.1 better -> reduce after epoch 2; 3: bad; 4: 0.5 better;
    # 5, 6: bad -> reduce after epoch 6 (no step follows).
    assert [row[0] for row in lrs] == pytest.approx([0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.05])
    assert schedule.plateau.num_reductions == 2


def test_plateau_missing_metric_says_what_exists(tmp_path):
    with pytest.raises(ValueError, match="'nope', which is not available.*val_loss"):
        fit(tmp_path, LRSchedule("plateau", monitor="nope"), max_epochs=1, limit_train_batches=2)


@pytest.mark.filterwarnings("ignore:.*dataloader is not resumable")  # the LRs, not the batches, are compared
def test_resume_mid_schedule_equals_uninterrupted(tmp_path):
    make = lambda: LRSchedule("cosine", warmup_steps=3, total_steps=16)  # noqa: E731
    pl.seed_everything(0)
    _, full = fit(tmp_path / "a", make(), model=Tiny(lr=0.1, groups=True), max_steps=16)
    pl.seed_everything(0)
    trainer, first = fit(tmp_path / "b", make(), model=Tiny(lr=0.1, groups=True), max_steps=7)
    ckpt = tmp_path / "mid.ckpt"
    trainer.save_checkpoint(ckpt)
    _, rest = fit(tmp_path / "c", make(), model=Tiny(lr=0.1, groups=True), max_steps=16, ckpt_path=str(ckpt))
    assert first + rest == [pytest.approx(row) for row in full]


def test_plateau_state_resumes(tmp_path):
    values = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    make = lambda: LRSchedule("plateau", monitor="val_metric", patience=2, factor=0.5)  # noqa: E731
    _, full = fit(tmp_path / "a", make(), model=Scripted(values), max_epochs=6, limit_train_batches=1)
    trainer, first = fit(tmp_path / "b", make(), model=Scripted(values), max_epochs=2, limit_train_batches=1)
    trainer.save_checkpoint(tmp_path / "mid.ckpt")
    _, rest = fit(tmp_path / "c", make(), model=Scripted(values), max_epochs=6, limit_train_batches=1,
                  ckpt_path=str(tmp_path / "mid.ckpt"))
    assert first + rest == [pytest.approx(row) for row in full]
    assert full[-1][0] == pytest.approx(0.05)


@pytest.mark.parametrize("kwargs, match", [
    (dict(schedule="sawtooth"), "unknown schedule"),
    (dict(interval="batch"), "interval must be"),
    (dict(schedule="step"), "needs step_size"),
    (dict(schedule="multistep"), "needs milestones"),
    (dict(schedule="onecycle", warmup_steps=5), "warms up by itself"),
])
def test_errors_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LRSchedule(**kwargs)


def test_cosine_needs_a_length(tmp_path):
    with pytest.raises(ValueError, match="pass total_steps"):
        fit(tmp_path, LRSchedule("cosine"), max_steps=-1, max_epochs=-1, max_time="00:00:00:01")


def test_nan_total_steps_is_refused_at_construction():
    with pytest.raises(ValueError, match="total_steps must be a whole number of steps >= 1, got nan; pass an int"):
        LRSchedule("cosine", total_steps=float("nan"))
