"""LightningCLI flags and YAML with lrfuse's optimizers and callbacks; the `lrfuse` command."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import lrfuse
from lrfuse.lightning import LRFinder, LRHealthMonitor, LRSchedule
from lrfuse.lightning.cli import build_cli, main


@pytest.fixture(autouse=True)
def _clean_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lrfuse"])  # pytest's own flags are not the CLI's


pytestmark = pytest.mark.filterwarnings("ignore:.*will be overridden by `LightningCLI.configure_optimizers`")


def quiet(tmp_path, steps=4):
    return ["--seed_everything=0", f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false", "--trainer.enable_checkpointing=false",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
            "--trainer.accelerator=cpu", f"--trainer.max_steps={steps}", "--trainer.num_sanity_val_steps=0"]


def test_flags_optimizer_and_callbacks(tmp_path):
    cli = build_cli(run=False, args=[
        "--optimizer", "lrfuse.FusedAdam", "--optimizer.lr", "3e-4", "--optimizer.track_stats", "true",
        "--trainer.callbacks+=lrfuse.LRFinder", "--trainer.callbacks.num_steps=30",
        "--trainer.callbacks.min_lr=1e-5",
        "--trainer.callbacks+=lrfuse.LRSchedule", "--trainer.callbacks.schedule=cosine",
        "--trainer.callbacks.warmup_steps=2",
        "--trainer.callbacks+=lrfuse.LRHealthMonitor", "--trainer.callbacks.every_n_steps=1", *quiet(tmp_path)])
    finder, schedule = [cb for cb in cli.trainer.callbacks if isinstance(cb, (LRFinder, LRSchedule))]
    assert finder.num_steps == 30 and finder.min_lr == 1e-5
    assert schedule.schedule == "cosine" and schedule._kwargs["warmup_steps"] == 2
    opt = cli.model.configure_optimizers()
    opt = opt[0] if isinstance(opt, (list, tuple)) else opt
    opt = opt["optimizer"] if isinstance(opt, dict) else opt
    assert isinstance(opt, lrfuse.FusedAdam) and opt.param_groups[0]["lr"] == 3e-4 and opt.track_stats is True
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 4
    assert isinstance(cli.trainer.optimizers[0], lrfuse.FusedAdam)
    assert cli.trainer.optimizers[0].group_stats()[0]["update_norm"] > 0  # measured the last step
    assert finder.result is not None
    health = next(cb for cb in cli.trainer.callbacks if isinstance(cb, LRHealthMonitor))
    assert health.every_n_steps == 1 and len(health.status) == 1  # one group: one verdict


def test_yaml_class_path_init_args_and_torch_lr_scheduler(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("""
trainer:
  callbacks:
    - class_path: lrfuse.LRSchedule
      init_args:
        schedule: multistep
        milestones: [2]
        gamma: 0.5
optimizer:
  class_path: lrfuse.FusedAdamW
  init_args:
    lr: 0.002
    weight_decay: 0.01
""")
    cli = build_cli(run=False, args=["--config", str(config), *quiet(tmp_path)])
    schedule = next(cb for cb in cli.trainer.callbacks if isinstance(cb, LRSchedule))
    assert schedule.schedule == "multistep" and schedule._kwargs["milestones"] == [2]
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    opt = cli.trainer.optimizers[0]
    assert isinstance(opt, lrfuse.FusedAdamW) and opt.param_groups[0]["weight_decay"] == 0.01
    assert opt.param_groups[0]["lr"] == pytest.approx(0.001)

    cli = build_cli(run=False, args=["--optimizer=lrfuse.FusedRMSprop", "--optimizer.lr=0.01",
                                     "--lr_scheduler=torch.optim.lr_scheduler.StepLR",
                                     "--lr_scheduler.step_size=1", "--lr_scheduler.gamma=0.5", *quiet(tmp_path, 3)])
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert isinstance(cli.trainer.optimizers[0], lrfuse.FusedRMSprop)
    assert isinstance(cli.trainer.lr_scheduler_configs[0].scheduler, torch.optim.lr_scheduler.StepLR)


def test_lrfuse_fit_subcommand(tmp_path, capsys):
    flags = [flag for flag in quiet(tmp_path, 3) if "progress_bar" not in flag]
    assert main(["fit", "--optimizer=lrfuse.FusedAdam", "--optimizer.lr=0.003", *flags]) == 0
    # stdout is not a terminal here (captured), as in a CI log: no progress bar redrawn with "\r"
    assert "enable_progress_bar: false" in (tmp_path / "config.yaml").read_text()
    assert "\r" not in "".join(capsys.readouterr())


def test_lrfuse_find_and_demo(tmp_path, capsys):
    plot = tmp_path / "lr.png"
    with pytest.raises(SystemExit) as exit_info:  # the race needs the run's length (not Lightning's 1,000 epochs)
        main(["find", "--no-progress", "--num-steps=40", f"--plot={plot}"])
    assert exit_info.value.code == 2 and "--trainer.max_epochs" in capsys.readouterr().err
    assert main(["find", "--no-progress", "--num-steps=40", f"--plot={plot}", "--trainer.max_epochs=3"]) == 0
    out = capsys.readouterr().out
    assert "suggested lr" in out and plot.exists()
    assert "train with: lrfuse fit --seed_everything=0 --trainer.max_epochs=3 --model.lr=" in out
    # fit's flags and YAML: the model and data they configure are the ones swept
    config = tmp_path / "find.yaml"
    config.write_text("model:\n  hidden: 16\ndata:\n  batch_size: 32\n")
    assert main(["find", "--num-steps=30", "--plot=", "--config", str(config), "--trainer.max_epochs=2",
                 "--optimizer=lrfuse.FusedAdamW", "--optimizer.weight_decay=0.01"]) == 0
    out, err = capsys.readouterr()
    assert "\r" not in out + err  # not a terminal: no progress bar without --no-progress
    assert "[30 steps" in out and f"--config {config}" in out and "--optimizer.lr=" in out
    torch.set_num_threads(3)  # the caller's count: the demo runs on --threads (default 1), then restores it
    assert main(["demo", "--epochs=1", "--plot="]) == 0
    assert torch.get_num_threads() == 3
    out, err = capsys.readouterr()
    assert "\r" not in out + err  # stdout is not a terminal: clean lines, no progress bars
    assert "final validation accuracy" in out and "lrfuse.FusedAdam" in out and "torch.optim.Adam" in out
    assert "(median, 1 thread)" in out


def test_usage_and_dispatch(capsys):
    assert main([]) == 2 and "usage: lrfuse" in capsys.readouterr().out
    assert main(["nope"]) == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--help"])
    assert exit_info.value.code == 0


def test_import_lrfuse_does_not_import_lightning():
    code = ("import sys, lrfuse; assert 'lightning' not in sys.modules, 'lightning imported';"
            "lrfuse.layerwise_groups; assert 'lightning' not in sys.modules;"
            "assert lrfuse.LRFinder.__name__ == 'LRFinder' and 'lightning' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_version_names_lrfuse_torch_and_the_kernels(capsys):
    from importlib.metadata import version

    from lrfuse import ops

    assert main(["--version"]) == 0
    out = capsys.readouterr().out.strip()
    # One version, written once (lrfuse.__version__, which the package metadata reads).
    assert out.startswith(f"lrfuse {lrfuse.__version__} (torch {torch.__version__};") and version("lrfuse") == lrfuse.__version__
    assert f"cpu {ops.backend('cpu')}" in out and f"cuda {ops.backend('cuda')}" in out
