"""LRSchedule("plateau") under DDP: the ranks decide together even when only one logs the metric.

Each rank used to check on its own whether the monitored metric was there before entering a
collective reduce; ranks that disagreed hung (or paired the reduce with DDP's gradient all-reduce).
The run goes in a subprocess with a timeout, so a hang fails the test instead of the suite.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch.distributed
from conftest import Tiny, TinyData
from lightning.pytorch.callbacks import Callback

from lrfuse.lightning import LRSchedule

HERE = Path(__file__).resolve().parent


@pytest.mark.skipif(not torch.distributed.is_available() or sys.platform == "win32", reason="needs torch.distributed")
def test_plateau_metric_logged_by_one_rank_only(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    # A session of its own, so that a hang is ended with the ranks it spawned, not only their parent.
    proc = subprocess.Popen([sys.executable, __file__, str(tmp_path)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("the 2-rank plateau run hung (killed after 600 s)")
    assert proc.returncode == 0, output[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world"] == 2
    assert ranks[0] == ranks[1]  # the same plateau state and the same LRs on both ranks
    # Rank 0 logs a constant metric from step 3 on: patience 2 -> reductions, judged on rank 0's value.
    assert ranks[0]["plateau"]["num_reductions"] >= 2 and ranks[0]["plateau"]["best"] == 1.0
    assert ranks[0]["lrs"][-1] < ranks[0]["lrs"][0]


class RankZeroMetric(Tiny):
    def training_step(self, batch, batch_idx):
        if self.global_rank == 0 and self.global_step >= 3:
            self.log("only_rank0", 1.0)  # a constant: no improvement after the first
        return super().training_step(batch, batch_idx)


def _destroy_process_group() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


class Report(Callback):
    def __init__(self, schedule: LRSchedule, out: str):
        self.schedule, self.out, self.lrs = schedule, out, []

    def setup(self, trainer, pl_module, stage):
        atexit.register(_destroy_process_group)  # see test_ddp.py: gloo's exit otherwise aborts at times

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.lrs.append(float(optimizer.param_groups[0]["lr"]))

    def on_train_end(self, trainer, pl_module):
        with open(f"{self.out}/rank{trainer.global_rank}.json", "w") as f:
            json.dump({"world": trainer.world_size, "plateau": self.schedule.plateau.state_dict(), "lrs": self.lrs}, f)


def _main(out: str) -> None:
    pl.seed_everything(0)
    schedule = LRSchedule("plateau", interval="step", monitor="only_rank0", patience=2, factor=0.5)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=12, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=out,
                         callbacks=[schedule, Report(schedule, out)])
    trainer.fit(RankZeroMetric(lr=0.1), datamodule=TinyData())


if __name__ == "__main__":
    _main(sys.argv[1])
