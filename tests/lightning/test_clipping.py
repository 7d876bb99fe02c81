"""Gradient clipping in a real Trainer: lrfuse's optimizers against torch.optim trained the same way
(seed, data, layer-wise groups), under '32-true', 'bf16-mixed' and '16-mixed' with a real GradScaler
on the CPU. Lightning unscales before `on_before_optimizer_step` and before clipping, so hooks see
and clip the true gradients; a step whose gradients hold an inf is still skipped by both."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from conftest import Tiny, TinyData, quiet_trainer
from lightning.pytorch.plugins.precision import MixedPrecision

import lrfuse

# The class under test is f"{PREFIX}{name}"; set PREFIX = "" to run the harness with torch.optim on both sides.
PREFIX = "Fused"
NAMES = ["Adam", "AdamW", "RMSprop"]
PRECISIONS = ["32-true", "bf16-mixed", "16-mixed"]
# Total gradient norm of Tiny is ~0.5-1.5 and its largest entries ~0.2-0.6 over these steps: both clip.
CLIP = {"norm": 0.05, "value": 0.01}
STEPS = 4


class GradRecorder(pl.Callback):
    """Total norm and largest magnitude of the gradients as `on_before_optimizer_step` sees them."""

    def __init__(self):
        self.norms, self.maxabs = [], []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad.detach().float() for p in pl_module.parameters() if p.grad is not None]
        self.norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
        self.maxabs.append(max(float(g.abs().max()) for g in grads))


class InfAt(Tiny):
    """Tiny whose gradient gets an inf in one entry after the backward of step `inf_at`."""

    def __init__(self, inf_at: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.inf_at = inf_at

    def on_after_backward(self):
        if self.inf_at is not None and self.trainer.global_step == self.inf_at:
            with torch.no_grad():
                self.head.weight.grad[0, 0] = math.inf


def precision_kwargs(precision: str) -> dict:
    if precision == "16-mixed":
        # Trainer(precision="16-mixed") on the CPU falls back to bf16; the plugin keeps fp16 and a GradScaler.
        return dict(plugins=[MixedPrecision("16-mixed", "cpu")])
    return dict(precision=precision)


def train(tmp_path, optimizer: str, precision: str, steps: int = STEPS, clip: str | None = None,
          inf_at: int | None = None):
    pl.seed_everything(0, verbose=False)
    model = InfAt(inf_at=inf_at, lr=1e-2, groups=True, optimizer=optimizer)
    recorder = GradRecorder()
    clipping = dict(gradient_clip_val=CLIP[clip], gradient_clip_algorithm=clip) if clip else {}
    trainer = quiet_trainer(tmp_path, max_steps=steps, callbacks=[recorder], **clipping, **precision_kwargs(precision))
    if precision == "16-mixed":
        assert isinstance(trainer.precision_plugin, MixedPrecision)
        assert isinstance(trainer.precision_plugin.scaler, torch.amp.GradScaler)
        assert trainer.precision_plugin.scaler.is_enabled()
    trainer.fit(model, datamodule=TinyData())
    model.optimizer = trainer.optimizers[0]
    model.recorder = recorder
    model.scale = trainer.precision_plugin.scaler.get_scale() if precision == "16-mixed" else None
    assert trainer.global_step == steps
    return model


def check_optimizer(model, name: str):
    assert isinstance(model.optimizer, getattr(lrfuse, PREFIX + name, None) or getattr(torch.optim, name))
    assert len(model.optimizer.param_groups) > 1


def assert_same_training(fused, ref, expected_steps: int):
    for p, q in zip(fused.parameters(), ref.parameters()):
        assert p.dtype == torch.float32
        assert torch.isfinite(p).all()
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
        assert float(fused.optimizer.state[p]["step"]) == float(ref.optimizer.state[q]["step"]) == expected_steps
    assert fused.scale == ref.scale


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("clip", ["norm", "value"])
@pytest.mark.parametrize("name", NAMES)
def test_clipped_training_matches_torch(tmp_path, name, clip, precision):
    fused = train(tmp_path, PREFIX + name, precision, clip=clip)
    ref = train(tmp_path, name, precision, clip=clip)
    check_optimizer(fused, name)
    # Clipping bites on every step: the gradients seen before clipping exceed the clip value.
    seen = ref.recorder.norms if clip == "norm" else ref.recorder.maxabs
    assert len(seen) == STEPS and min(seen) > 2 * CLIP[clip]
    # Hooks see the same (unscaled, unclipped) gradients with both optimizers.
    torch.testing.assert_close(fused.recorder.norms, ref.recorder.norms, rtol=1e-3, atol=1e-6)
    assert_same_training(fused, ref, STEPS)


@pytest.mark.parametrize("name", NAMES)
def test_hooks_see_unscaled_gradients_under_16_mixed(tmp_path, name):
    # Lightning documents `on_before_optimizer_step` as seeing unscaled gradients; with the scale at
    # 65536 a scaled gradient would show up as a norm 65536 times torch.optim.Adam's.
    fused = train(tmp_path, PREFIX + name, "16-mixed")
    adam = train(tmp_path, "Adam", "16-mixed")
    check_optimizer(fused, name)
    assert fused.scale == adam.scale == 65536.0
    # The first step's gradients come from identical weights whatever the optimizer.
    assert fused.recorder.norms[0] == pytest.approx(adam.recorder.norms[0], rel=1e-5)
    assert fused.recorder.norms[0] < 100  # not multiplied by the scale
    if name == "Adam":
        torch.testing.assert_close(fused.recorder.norms, adam.recorder.norms, rtol=1e-3, atol=1e-6)
        assert_same_training(fused, adam, STEPS)


@pytest.mark.parametrize("clip", [None, "norm", "value"])
@pytest.mark.parametrize("name", NAMES)
def test_inf_gradient_step_is_skipped(tmp_path, name, clip):
    # An inf in one gradient at step 2: GradScaler skips that step and halves the scale. Clipping by
    # value would turn the inf into a finite number, by norm into NaNs; neither may hide the skip.
    fused = train(tmp_path, PREFIX + name, "16-mixed", clip=clip, inf_at=2)
    ref = train(tmp_path, name, "16-mixed", clip=clip, inf_at=2)
    check_optimizer(fused, name)
    assert math.isinf(ref.recorder.norms[2]) and math.isinf(fused.recorder.norms[2])
    assert ref.scale == 32768.0
    assert_same_training(fused, ref, STEPS - 1)
