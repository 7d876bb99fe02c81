"""Resuming a Trainer from a checkpoint continues exactly where an uninterrupted run goes: every
algorithm of parity.ALGORITHMS, with every state in use."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from conftest import Tiny, TinyData, quiet_trainer
from torch.utils.data import DataLoader

from lrfuse.groups import layerwise_groups
from parity import ALGORITHMS


class InOrder(TinyData):
    """Unshuffled: the resumed run sees the batches the uninterrupted one saw (8 a epoch)."""

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=self.batch_size)


class EveryState(Tiny):
    """Tiny's layer-wise groups under ``algorithm``'s fused class, at its suite lr and with its
    settings that keep every state."""

    def __init__(self, algorithm: str):
        a = ALGORITHMS[algorithm]
        super().__init__(lr=a.lr, groups=True, optimizer=a.fused.__name__)
        self.optimizer_cls, self.settings = a.fused, a.low_precision

    def configure_optimizers(self):
        return self.optimizer_cls(layerwise_groups(self, lr=self.lr, decay=0.5), lr=self.lr, **self.settings)


def fit(tmp_path, algorithm: str, epochs: int, ckpt_path=None) -> tuple[Tiny, pl.Trainer]:
    pl.seed_everything(0, verbose=False)
    model = EveryState(algorithm)
    trainer = quiet_trainer(tmp_path, max_epochs=epochs, limit_val_batches=0)
    trainer.fit(model, datamodule=InOrder(), ckpt_path=ckpt_path)
    return model, trainer


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_resume_is_bit_for_bit(tmp_path, algorithm):
    full, full_trainer = fit(tmp_path / "full", algorithm, 2)
    _, first = fit(tmp_path / "first", algorithm, 1)  # a checkpoint at the epoch's end
    ckpt = tmp_path / "epoch1.ckpt"
    first.save_checkpoint(ckpt)
    resumed, resumed_trainer = fit(tmp_path / "resumed", algorithm, 2, ckpt_path=str(ckpt))
    assert resumed_trainer.global_step == 16
    opt, ref_opt = resumed_trainer.optimizers[0], full_trainer.optimizers[0]
    assert type(opt) is ALGORITHMS[algorithm].fused and len(opt.param_groups) > 1
    for (name, p), q in zip(resumed.named_parameters(), full.parameters()):
        assert torch.equal(p, q), name
        assert opt.state[p].keys() == ref_opt.state[q].keys() and opt.state[p], name
        for key, value in ref_opt.state[q].items():
            assert torch.equal(opt.state[p][key], value), f"{name} {key}"
