"""Resuming a Trainer from a checkpoint continues exactly where an uninterrupted run goes."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from conftest import Tiny, TinyData, quiet_trainer
from torch.utils.data import DataLoader


class InOrder(TinyData):
    """Unshuffled: the resumed run sees the batches the uninterrupted one saw (8 a epoch)."""

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=self.batch_size)


def fit(tmp_path, optimizer: str, epochs: int, ckpt_path=None) -> tuple[Tiny, pl.Trainer]:
    pl.seed_everything(0, verbose=False)
    model = Tiny(lr=1e-2, groups=True, optimizer=optimizer)
    trainer = quiet_trainer(tmp_path, max_epochs=epochs, limit_val_batches=0)
    trainer.fit(model, datamodule=InOrder(), ckpt_path=ckpt_path)
    return model, trainer


@pytest.mark.parametrize("optimizer", ["FusedAdam", "FusedAdamW", "FusedRMSprop"])
def test_resume_is_bit_for_bit(tmp_path, optimizer):
    full, full_trainer = fit(tmp_path / "full", optimizer, 2)
    _, first = fit(tmp_path / "first", optimizer, 1)  # a checkpoint at the epoch's end
    ckpt = tmp_path / "epoch1.ckpt"
    first.save_checkpoint(ckpt)
    resumed, resumed_trainer = fit(tmp_path / "resumed", optimizer, 2, ckpt_path=str(ckpt))
    assert resumed_trainer.global_step == 16
    opt, ref_opt = resumed_trainer.optimizers[0], full_trainer.optimizers[0]
    for (name, p), q in zip(resumed.named_parameters(), full.parameters()):
        assert torch.equal(p, q), name
        assert opt.state[p].keys() == ref_opt.state[q].keys()
        for key, value in ref_opt.state[q].items():
            assert torch.equal(opt.state[p][key], value), f"{name} {key}"
