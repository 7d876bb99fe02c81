"""lrfuse's optimizers in a real Trainer under Lightning's precision plugins, against torch.optim
trained the same way: every algorithm of parity.ALGORITHMS with every state in use, layer-wise
groups with their own LRs, mixed precision, on the CPU and (where present) the GPU. '16-mixed' runs
GradScaler, which hands its scale and inf flag to the kernel."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from conftest import Tiny, TinyData, quiet_trainer

from lrfuse.groups import layerwise_groups
from parity import ALGORITHMS

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
SETTINGS = [
    ("cpu", "32-true"),
    ("cpu", "bf16-mixed"),
    pytest.param("gpu", "32-true", marks=[pytest.mark.cuda, CUDA]),
    pytest.param("gpu", "bf16-mixed", marks=[pytest.mark.cuda, CUDA]),
    pytest.param("gpu", "16-mixed", marks=[pytest.mark.cuda, CUDA]),
]


class EveryState(Tiny):
    """Tiny's layer-wise groups under ``algorithm``'s fused class (or torch's), at its suite lr and
    with its settings that keep every state."""

    def __init__(self, algorithm: str, fused: bool):
        a = ALGORITHMS[algorithm]
        cls = a.fused if fused else a.torch
        super().__init__(lr=a.lr, groups=True, optimizer=cls.__name__)
        self.optimizer_cls, self.settings = cls, a.low_precision

    def configure_optimizers(self):
        return self.optimizer_cls(layerwise_groups(self, lr=self.lr, decay=0.5), lr=self.lr, **self.settings)


def train(tmp_path, algorithm: str, fused: bool, accelerator: str, precision: str, steps: int) -> pl.LightningModule:
    pl.seed_everything(0, verbose=False)
    model = EveryState(algorithm, fused)
    trainer = quiet_trainer(tmp_path, accelerator=accelerator, precision=precision, max_steps=steps)
    trainer.fit(model, datamodule=TinyData())
    model.optimizer = trainer.optimizers[0]
    return model


@pytest.mark.parametrize("accelerator, precision", SETTINGS)
@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_trainer_steps_match_torch(tmp_path, accelerator, precision, name):
    # A few steps: identical inputs, so the runs differ only by the optimizers' rounding (and
    # what a low-precision forward makes of a one-ulp difference in a weight).
    steps = 4
    fused = train(tmp_path, name, True, accelerator, precision, steps)
    ref = train(tmp_path, name, False, accelerator, precision, steps)
    assert type(fused.optimizer) is ALGORITHMS[name].fused and type(ref.optimizer) is ALGORITHMS[name].torch
    assert len(fused.optimizer.param_groups) > 1
    for p, q in zip(fused.parameters(), ref.parameters()):
        assert p.dtype == torch.float32 and p.device.type == ("cuda" if accelerator == "gpu" else "cpu")
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
        assert fused.optimizer.state[p].keys() == ref.optimizer.state[q].keys()
        # GradScaler may skip a step that overflowed: both then skip the same ones (SGD counts none).
        if "step" in ref.optimizer.state[q]:
            assert float(fused.optimizer.state[p]["step"]) == float(ref.optimizer.state[q]["step"]) > 0
