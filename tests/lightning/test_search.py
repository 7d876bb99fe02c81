"""lrfuse.search_lr on a real Ray Tune with real Trainers on the bundled digits: every method end to end,
identical starts, group ratios, divergence, a retried worker death, two nodes, the CLI.

One local Ray session (2 CPUs) is shared by the module; the two-node test runs last with its own.
"""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if importlib.util.find_spec("ray") is None:  # not imported here: lrfuse must set Ray's environment first
    pytest.skip('Ray Tune is not installed (pip install "lrfuse[search]")', allow_module_level=True)

import lrfuse  # noqa: E402
from lrfuse.groups import layerwise_groups  # noqa: E402
from lrfuse.lightning import _ray  # noqa: E402
from lrfuse.lightning.demo import DigitsClassifier, DigitsDataModule  # noqa: E402
from lrfuse.lightning.search import search_lr  # noqa: E402

import lightning.pytorch as pl  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")

STEPS, EVERY = 40, 10


class GroupedDigits(DigitsClassifier):
    """The demo MLP with three layer-wise groups (LR ratios 1/4, 1/2, 1); FusedAdam or plain SGD."""

    def __init__(self, lr: float = 1e-3, optimizer: str = "adam") -> None:
        super().__init__(lr=lr)
        self.kind = optimizer

    def configure_optimizers(self):
        groups = layerwise_groups(self, lr=self.lr, decay=0.5, layers=["net.0", "net.2", "net.4"])
        if self.kind == "sgd":
            return torch.optim.SGD(groups, lr=self.lr)
        return lrfuse.FusedAdam(groups)


class DieOnce(Callback):
    """Kills the trial's worker process at ``step`` the first time any trial gets there."""

    def __init__(self, marker: str, step: int) -> None:
        self.marker, self.step = marker, step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step and not os.path.exists(self.marker):
            Path(self.marker).touch()
            os._exit(1)  # a dead worker, not an exception: Tune must retry from the checkpoint


def _by_value():
    # Workers import lrfuse, but not this test module: ship its classes by value.
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def ray_session():
    started = _ray.init(num_cpus=2)
    _by_value()
    yield
    if started:
        import ray

        ray.shutdown()


def _search(tmp_path, method, model=None, **kwargs):
    pl.seed_everything(0, verbose=False)
    kwargs = {"trials": 3, "min_lr": 1e-4, "max_lr": 3e-2, "max_steps": STEPS, "eval_every": EVERY, **kwargs}
    return search_lr(model if model is not None else GroupedDigits(), DigitsDataModule(), method=method,
                     storage_path=tmp_path / "ray", **kwargs)


def _same_start(result):
    inits = {t.init_checksum for t in result.trials}
    # the batches of the first evaluation interval, in order (a trial that diverged earlier saw fewer)
    data = {t.data_checksum for t in result.trials if t.steps >= EVERY}
    assert len(inits) == 1 and None not in inits, inits
    assert len(data) == 1 and None not in data, data


def _ratios_kept(result):
    for t in result.trials:
        assert len(t.group_lrs) == 3
        assert t.group_lrs == pytest.approx([t.lr / 4, t.lr / 2, t.lr], rel=1e-9)


def test_grid_end_to_end_with_a_diverging_trial(tmp_path, ray_session):
    # Plain SGD with three layer-wise groups: 0.1 trains, 300 thrashes, 1e6 overflows to a NaN loss
    # within three steps, which must stop that trial and be reported, not end the search.
    result = _search(tmp_path, "grid", model=GroupedDigits(optimizer="sgd"), trials=3, min_lr=0.1, max_lr=1e6)
    assert [t.lr for t in result.trials] == pytest.approx([0.1, math.sqrt(0.1 * 1e6), 1e6])
    _same_start(result)
    _ratios_kept(result)
    low, mid, high = result.trials
    for t in (low, mid):
        assert t.steps == STEPS and t.stop == "budget" and t.error is None and t.seconds > 0
        assert [h[0] for h in t.history] == [10, 20, 30, 40]
    assert high.stop.startswith("diverged") and high.steps < EVERY and math.isinf(high.value)
    assert high.verdict == "too_high" and "non-finite" in high.why
    assert result.lr == low.lr and result.group_lrs == low.group_lrs and low.value < mid.value
    assert f"model:\n  lr: {result.lr}" in result.to_yaml()
    table = result.table()
    assert "| * | 0.1 |" in table and "diverged" in table
    result.plot(tmp_path / "grid.png")
    assert (tmp_path / "grid.png").stat().st_size > 0
    assert Path(result.path).is_dir()


def test_race_stops_the_slow_and_starts_all_alike(tmp_path, ray_session):
    result = _search(tmp_path, "race", trials=4, min_lr=1e-5, max_lr=1e-2, grace_period=1, reduction_factor=2)
    _same_start(result)
    _ratios_kept(result)
    stopped = [t for t in result.trials if t.stop.startswith("race")]
    full = [t for t in result.trials if t.steps == STEPS]
    assert stopped and full, result.table()
    assert result.best in full
    assert result.trials[0] in stopped  # 1e-5 falls slowest
    assert {t.steps for t in stopped} <= {EVERY, 2 * EVERY}  # stopped at a rung (reports 1 and 2)
    assert result.total_steps < 4 * STEPS


def test_random_over_the_finders_range(tmp_path, ray_session):
    result = _search(tmp_path, "random", model=DigitsClassifier(), trials=3, seed=3, min_lr=None, max_lr=None,
                     finder_kwargs={"min_lr": 1e-5, "max_lr": 1.0, "num_steps": 40})
    from lrfuse.lightning.search import _initial_lrs

    assert result.finder is not None and result.finder.lr is not None
    assert (result.low, result.high) == (result.finder.low, result.finder.high)
    expected = _initial_lrs("random", 3, result.low, result.high, 3)  # seeded log-uniform draws
    assert [t.lr for t in result.trials] == pytest.approx(sorted(expected))
    assert all(result.low <= t.lr <= result.high and t.steps == STEPS for t in result.trials)
    _same_start(result)
    assert result.lr is not None and result.group_lrs == [result.lr]


def test_pbt_exploits_and_perturbs(tmp_path, ray_session):
    result = _search(tmp_path, "pbt", trials=4, min_lr=1e-5, max_lr=1e-1, perturbation_interval=1)
    from lrfuse.lightning.search import _initial_lrs

    initial = _initial_lrs("pbt", 4, 1e-5, 1e-1, 0)
    assert all(t.steps == STEPS and t.error is None for t in result.trials), result.table()
    # Some trial continued from a checkpoint with an LR it did not start with.
    moved = [t for t in result.trials if t.start_step > 0 and all(abs(t.lr - v) > 1e-12 for v in initial)]
    assert moved, result.table()
    _ratios_kept(result)
    assert result.lr is not None


def test_worker_death_is_retried_from_the_last_checkpoint(tmp_path, ray_session):
    marker = tmp_path / "died"
    result = _search(tmp_path, "grid", model=DigitsClassifier(), trials=1, max_failures=1,
                     trainer_kwargs={"callbacks": [DieOnce(str(marker), step=25)]})
    assert marker.exists()
    (t,) = result.trials
    assert t.error is None and t.stop == "budget" and t.steps == STEPS
    assert t.starts == 2 and t.start_step == 20  # resumed from the step-20 checkpoint, not from scratch
    assert [h[0] for h in t.history][-2:] == [30, 40]


def test_local_ray_listens_on_loopback_only(ray_session):
    import ray

    assert os.environ["RAY_USAGE_STATS_ENABLED"] == "0"
    assert ray.is_initialized()
    listeners = _listening_sockets_of_ray()
    assert listeners, "found no listening socket of Ray's processes"
    assert all(ip in ("127.0.0.1", "::1", "::ffff:127.0.0.1") for ip, _, _ in listeners), listeners


def test_bad_arguments_are_named():
    model, dm = DigitsClassifier(), DigitsDataModule()
    cases = [(dict(method="bayes"), "unknown method 'bayes'"), (dict(trials=0), "trials must be"),
             (dict(min_lr=1e-2, max_lr=1e-3), "min_lr < max_lr"), (dict(min_lr=1e-3), "give both min_lr and max_lr"),
             (dict(max_steps=0), "max_steps"), (dict(mode="up"), "mode must be"),
             (dict(cpus_per_trial=0), "cpus_per_trial"), (dict(max_failures=-1), "max_failures")]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            search_lr(model, dm, **kwargs)
    with pytest.raises(TypeError, match="LightningModule"):
        search_lr(3, dm)


def test_without_ray_the_error_says_what_to_install():
    code = ("import sys, lrfuse, lrfuse.lightning.demo as d\n"
            "lrfuse.search_lr\n"
            "assert 'ray' not in sys.modules, 'importing lrfuse.search_lr imported ray'\n"
            "sys.modules['ray'] = None  # as if not installed\n"
            "try:\n    lrfuse.search_lr(d.DigitsClassifier(), d.DigitsDataModule(), min_lr=1e-3, max_lr=1e-2)\n"
            "except ImportError as e:\n    assert 'pip install \"lrfuse[search]\"' in str(e), e\n"
            "else:\n    raise SystemExit('no ImportError')\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_search_with_a_yaml_config(tmp_path, ray_session, capsys, monkeypatch):
    from lrfuse.lightning.cli import main

    monkeypatch.setattr(sys, "argv", ["lrfuse"])
    config = tmp_path / "config.yaml"
    config.write_text("model:\n  hidden: 32\ndata:\n  batch_size: 32\ntrainer:\n  accelerator: cpu\n")
    plot, out_yaml = tmp_path / "search.png", tmp_path / "best.yaml"
    assert main(["search", "--method", "grid", "--trials", "2", "--min-lr", "1e-3", "--max-lr", "1e-2",
                 "--max-steps", "20", "--eval-every", "10", f"--storage-path={tmp_path / 'ray'}", f"--plot={plot}",
                 f"--save-config={out_yaml}", "--config", str(config), "--seed_everything=0"]) == 0
    out = capsys.readouterr().out
    assert "best lr" in out and "| * |" in out and "lrfuse fit" in out
    assert plot.exists()
    import yaml

    saved = yaml.safe_load(out_yaml.read_text())
    assert saved["model"]["init_args"]["hidden"] == 32 and saved["data"]["init_args"]["batch_size"] == 32
    assert saved["model"]["init_args"]["lr"] in (pytest.approx(1e-3), pytest.approx(1e-2))
    # ... and `lrfuse fit --config` takes it as it is
    from lrfuse.lightning.cli import build_cli

    cli = build_cli(run=False, args=["--config", str(out_yaml)])
    assert cli.model.hparams.hidden == 32 and cli.model.lr == saved["model"]["init_args"]["lr"]


def test_two_nodes_on_one_machine(tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()  # the module's session, if any: this test brings its own cluster
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)
        _by_value()
        nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        assert len(nodes) == 2
        result = _search(tmp_path, "grid", model=DigitsClassifier(), trials=2, max_concurrent=2, address=cluster.address)
        assert {t.node_id for t in result.trials} == nodes  # one trial per node (1 CPU each)
        _same_start(result)
        assert all(t.steps == STEPS for t in result.trials)
    finally:
        ray.shutdown()
        cluster.shutdown()


def _listening_sockets_of_ray() -> list[tuple[str, int, int]]:
    """(ip, port, pid) of every TCP socket in LISTEN state held by this process or a Ray process."""
    import socket
    import struct

    inodes = {}
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A":  # LISTEN
                continue
            hex_ip, hex_port = fields[1].split(":")
            raw = bytes.fromhex(hex_ip)
            raw = b"".join(struct.pack("<I", *struct.unpack(">I", raw[i:i + 4])) for i in range(0, len(raw), 4))
            inodes[fields[9]] = (socket.inet_ntop(family, raw), int(hex_port, 16))
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if int(pid) != os.getpid() and "ray" not in cmd:
                continue
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:[") and target[8:-1] in inodes:
                    found.append((*inodes[target[8:-1]], int(pid)))
        except (PermissionError, FileNotFoundError, ProcessLookupError):
            continue
    return found
