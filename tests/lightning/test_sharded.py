"""lrfuse's optimizers under Lightning's sharding strategies, against torch.optim trained the same way.

`ModelParallelStrategy` (FSDP2 through `configure_model`: every parameter a DTensor) runs on the
CPU, so it is checked everywhere; `FSDPStrategy` needs CUDA and runs on a GPU machine. Two ranks
and distributed checkpoints are in tests/test_distributed.py; here the point is the real Trainer.
"""

from __future__ import annotations

import pytest
import torch
from conftest import Tiny, TinyData, quiet_trainer
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader

import lightning.pytorch as pl
from parity import ALGORITHMS

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
NAMES = [a.torch.__name__ for a in ALGORITHMS.values()]  # torch's class; lrfuse's is Fused<name>
STEPS = 4


class Sharded(Tiny):
    """Tiny with FSDP2 applied per layer and at the root, as Lightning's docs show."""

    def configure_model(self):
        mesh = self.device_mesh["data_parallel"]
        for layer in (self.body, self.head):
            fully_shard(layer, mesh=mesh)
        fully_shard(self, mesh=mesh)


class InOrder(TinyData):
    """Unshuffled, so both runs see the same batches whatever RNG draws the strategies make (the
    sharded runs also keep Lightning from swapping in a DistributedSampler, which reorders)."""

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=self.batch_size)


def train(tmp_path, cls, optimizer: str, **trainer_kwargs):
    pl.seed_everything(0, verbose=False)
    model = cls(lr=1e-2, groups=True, optimizer=optimizer)
    trainer = quiet_trainer(tmp_path, max_steps=STEPS, use_distributed_sampler=False, **trainer_kwargs)
    trainer.fit(model, datamodule=InOrder())
    return model, trainer.optimizers[0]


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def assert_same_training(model, opt, ref_model, ref_opt):
    assert len(opt.param_groups) > 1
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(full(p).cpu(), q.detach().cpu(), rtol=1e-4, atol=1e-5, msg=name)
        assert opt.state[p].keys() == ref_opt.state[q].keys()
        if "step" in ref_opt.state[q]:  # SGD keeps none
            assert float(opt.state[p]["step"]) == float(ref_opt.state[q]["step"]) == STEPS
        for key, value in ref_opt.state[q].items():
            torch.testing.assert_close(full(opt.state[p][key]).cpu(), value.cpu(), rtol=1e-4, atol=1e-5,
                                       msg=f"{name} {key}")


@pytest.mark.parametrize("name", NAMES)
def test_model_parallel_strategy_fsdp2(tmp_path, name):
    strategy = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1)
    model, opt = train(tmp_path, Sharded, f"Fused{name}", strategy=strategy)
    assert all(isinstance(p, DTensor) for p in model.parameters())
    # State created as torch creates it for DTensor parameters.
    assert all(isinstance(opt.state[p][k], DTensor) for p in model.parameters() for k in opt.state[p] if k != "step")
    ref_model, ref_opt = train(tmp_path, Tiny, name)
    assert_same_training(model, opt, ref_model, ref_opt)


@pytest.mark.cuda
@CUDA
@pytest.mark.parametrize("strategy", ["fsdp", "model_parallel"])
@pytest.mark.parametrize("name", NAMES)
def test_sharded_strategies_on_the_gpu(tmp_path, name, strategy):
    if strategy == "fsdp":
        cls, kwargs = Tiny, {"strategy": FSDPStrategy(use_orig_params=True)}
    else:
        cls, kwargs = Sharded, {"strategy": ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1)}
    model, opt = train(tmp_path, cls, f"Fused{name}", accelerator="gpu", devices=1, **kwargs)
    ref_model, ref_opt = train(tmp_path, Tiny, name, accelerator="gpu", devices=1)
    assert_same_training(model, opt, ref_model, ref_opt)
