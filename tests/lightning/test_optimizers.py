"""Every fused optimizer in a real Trainer with the LR tools, chosen from LightningCLI flags
(`--optimizer lrfuse.FusedSGD`), as users pick torch's."""

from __future__ import annotations

import json
import sys

import pytest
import torch

import lrfuse
from lrfuse.lightning import LRFinder, LRHealthMonitor, LRSchedule
from parity import ALGORITHMS

pytest.importorskip("jsonargparse", reason="LightningCLI needs jsonargparse (pip install 'lrfuse[lightning]')")
from lrfuse.lightning.cli import build_cli  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*will be overridden by `LightningCLI.configure_optimizers`")


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_cli_optimizer_with_finder_schedule_and_monitor(algorithm, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lrfuse"])
    fused_cls, torch_cls = ALGORITHMS[algorithm].fused, ALGORITHMS[algorithm].torch
    name = fused_cls.__name__
    # The settings that keep every state of the algorithm (SGD keeps none without momentum).
    settings = ALGORITHMS[algorithm].low_precision
    cli = build_cli(run=False, args=[
        "--optimizer", f"lrfuse.{name}", *(f"--optimizer.{k}={json.dumps(v)}" for k, v in settings.items()),
        "--trainer.callbacks+=lrfuse.LRFinder", "--trainer.callbacks.num_steps=40",
        "--trainer.callbacks.min_lr=1e-5", "--trainer.callbacks.max_lr=10",
        "--trainer.callbacks+=lrfuse.LRSchedule", "--trainer.callbacks.schedule=cosine",
        "--trainer.callbacks.warmup_steps=2",
        "--trainer.callbacks+=lrfuse.LRHealthMonitor", "--trainer.callbacks.every_n_steps=2",
        "--seed_everything=0", f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false",
        "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", "--trainer.accelerator=cpu", "--trainer.max_steps=12",
        "--trainer.num_sanity_val_steps=0"])
    before = [p.detach().clone() for p in cli.model.parameters()]
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    opt = cli.trainer.optimizers[0]
    assert type(opt) is fused_cls is getattr(lrfuse, name)
    assert all(opt.param_groups[0][k] == v for k, v in settings.items())
    finder = next(cb for cb in cli.trainer.callbacks if isinstance(cb, LRFinder))
    assert finder.result is not None and finder.result.lr is not None
    assert cli.trainer.global_step == 12
    # The state is torch's for this optimizer, and training moved every parameter.
    ref = torch_cls([torch.nn.Parameter(torch.zeros(2))], **settings)
    ref.param_groups[0]["params"][0].grad = torch.ones(2)
    ref.step()
    expected_keys = set(next(iter(ref.state.values())))
    for p, b in zip(cli.model.parameters(), before):
        assert set(opt.state[p]) == expected_keys
        assert not torch.equal(p.detach(), b)
    health = next(cb for cb in cli.trainer.callbacks if isinstance(cb, LRHealthMonitor))
    assert len(health.status) == len(opt.param_groups)
    assert any(isinstance(cb, LRSchedule) for cb in cli.trainer.callbacks)
