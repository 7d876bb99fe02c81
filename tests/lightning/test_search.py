"""lrfuse.search_lr on a real Ray Tune with real Trainers on the bundled digits: every method end to end,
identical starts, group ratios, divergence, a retried worker death, two nodes, the CLI.

One local Ray session (2 CPUs) is shared by the module; the two-node test runs last with its own.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

if importlib.util.find_spec("ray") is None:  # not imported here: lrfuse must set Ray's environment first
    pytest.skip('Ray Tune is not installed (pip install "ray[tune]>=2.60")', allow_module_level=True)

import lrfuse  # noqa: E402
from lrfuse.groups import layerwise_groups  # noqa: E402
from lrfuse.lightning.search import cluster  # noqa: E402
from lrfuse.lightning.demo import DigitsClassifier, DigitsDataModule  # noqa: E402
from lrfuse.lightning.schedule import LRSchedule  # noqa: E402
from lrfuse.lightning.search import search_lr  # noqa: E402
from lrfuse.schedules import make_schedule  # noqa: E402

import lightning.pytorch as pl  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")

STEPS, EVERY = 40, 10


class GroupedDigits(DigitsClassifier):
    """The demo MLP with three layer-wise groups (LR ratios 1/4, 1/2, 1); FusedAdam or plain SGD."""

    def __init__(self, lr: float = 1e-3, optimizer: str = "adam", dropout: float = 0.0) -> None:
        super().__init__(lr=lr)
        self.kind = optimizer
        self.drop = torch.nn.Dropout(dropout)  # draws from the global RNG: a resume must restore it

    def forward(self, x):
        return self.net(self.drop(x))

    def configure_optimizers(self):
        groups = layerwise_groups(self, lr=self.lr, decay=0.5, layers=["net.0", "net.2", "net.4"])
        if self.kind == "sgd":
            return torch.optim.SGD(groups, lr=self.lr)
        return lrfuse.FusedAdam(groups)


def _first(marker: str) -> bool:
    """Whether this call is the first of any process to claim ``marker`` (created atomically: two
    trials at the same step at once must not both act)."""
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return False
    return True


class DieOnce(Callback):
    """Kills the trial's worker process at ``step`` the first time any trial gets there."""

    def __init__(self, marker: str, step: int) -> None:
        self.marker, self.step = marker, step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step and _first(self.marker):
            os._exit(1)  # a dead worker, not an exception: Tune must retry from the checkpoint


class InterruptOnce(Callback):
    """Sends SIGINT to the driver, as Ctrl-C does, the first time any trial gets to ``step``, and
    trains no further: the trial waits there until the interrupted search stops it, so what it
    did is the same however long Tune takes to act on the signal."""

    def __init__(self, marker: str, step: int, pid: int) -> None:
        self.marker, self.step, self.pid = marker, step, pid

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step and _first(self.marker):
            os.kill(self.pid, signal.SIGINT)
            deadline = time.monotonic() + 600  # a safety net only: Tune stops this trial long before
            while time.monotonic() < deadline:
                time.sleep(0.05)
            raise RuntimeError("the search was sent SIGINT 600 s ago and has not stopped this trial")


class TrainOnly(pl.LightningModule):
    """A model that trains but never validates (no validation_step), as the README's search example."""

    def __init__(self, lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.lr = lr
        self.net = torch.nn.Linear(64, 10)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return lrfuse.FusedAdam(self.parameters(), lr=self.lr)


def _by_value():
    # Workers import lrfuse, but not this test module: ship its classes by value.
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module", autouse=True)
def private_temp(tmp_path_factory):
    """Ray's session folders (RAY_TMPDIR) and every other temporary file of this process and of
    the Ray processes started from it (TMPDIR) under the test's tmp path, in two folders: the
    second holds nothing else, so a test can count what a search left in the temp dir."""
    base = tmp_path_factory.getbasetemp()
    ray_tmp, own = base / "ray", None
    # Ray's sockets live in <RAY_TMPDIR>/ray/session_<date>_<time>_<us>_<pid>/sockets/<name>, at most
    # 107 bytes: with a long base path, a short folder of the system temp dir, removed afterwards.
    if len(str(ray_tmp)) + 72 > 107:
        ray_tmp = own = Path(tempfile.mkdtemp(prefix="lrfuse-ray-", dir="/tmp" if os.path.isdir("/tmp") else None))
    temp = base / "tmp"
    ray_tmp.mkdir(exist_ok=True)
    temp.mkdir(exist_ok=True)
    patch = pytest.MonkeyPatch()
    patch.setenv("RAY_TMPDIR", str(ray_tmp))
    patch.setenv("TMPDIR", str(temp))
    patch.setattr(tempfile, "tempdir", str(temp))
    yield temp
    patch.undo()
    if own is not None:
        shutil.rmtree(own, ignore_errors=True)


def _temp_entries() -> set[str]:
    return set(os.listdir(tempfile.gettempdir()))


@pytest.fixture(scope="module")
def ray_session():
    started = cluster.init(num_cpus=2)
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
    # within three steps, which must stop that trial and be reported, not end the search. The model
    # comes from a factory, called in each trial; the search leaves nothing in the temp dir.
    before = _temp_entries()
    result = _search(tmp_path, "grid", model=functools.partial(GroupedDigits, optimizer="sgd"), trials=3,
                     min_lr=0.1, max_lr=1e6)
    assert _temp_entries() == before
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
    assert result.lr_attr == "lr" and f"model:\n  lr: {result.lr}" in result.to_yaml()
    table = result.table()
    assert "| * | 0.1 |" in table and "diverged" in table
    result.plot(tmp_path / "grid.png")
    assert (tmp_path / "grid.png").stat().st_size > 0
    assert Path(result.path).is_dir()


def test_random_over_the_finders_range(tmp_path, ray_session):
    # The model's class as the factory: the finder and every trial call it (after seeding).
    result = _search(tmp_path, "random", model=DigitsClassifier, trials=3, seed=3, min_lr=None, max_lr=None,
                     finder_kwargs={"min_lr": 1e-5, "max_lr": 1.0, "num_steps": 40})
    from lrfuse.lightning.search.api import _initial_lrs

    assert result.finder is not None and result.finder.lr is not None
    assert (result.low, result.high) == (result.finder.low, result.finder.high)
    expected = _initial_lrs("random", 3, result.low, result.high, 3)  # seeded log-uniform draws
    assert [t.lr for t in result.trials] == pytest.approx(sorted(expected))
    assert all(result.low <= t.lr <= result.high and t.steps == STEPS for t in result.trials)
    _same_start(result)
    assert result.lr is not None and result.group_lrs == [result.lr] and result.lr_attr == "lr"


def test_pbt_exploits_and_perturbs_through_an_lr_schedule(tmp_path, ray_session):
    # Every trial under a cosine LRSchedule: a trial that copies another's checkpoint with a new LR
    # must run the schedule from its own LR, not from the base LRs saved in the donor's checkpoint.
    result = _search(tmp_path, "pbt", trials=4, min_lr=1e-5, max_lr=1e-1, perturbation_interval=1,
                     trainer_kwargs={"callbacks": [LRSchedule("cosine")]})
    from lrfuse.lightning.search.api import _initial_lrs

    initial = _initial_lrs("pbt", 4, 1e-5, 1e-1, 0)
    assert all(t.steps == STEPS and t.error is None for t in result.trials), result.table()
    # Some trial continued from a checkpoint with an LR it did not start with.
    moved = [t for t in result.trials if t.start_step > 0 and all(abs(t.lr - v) > 1e-12 for v in initial)]
    assert moved, result.table()
    _ratios_kept(result)
    assert result.lr is not None
    # A moved trial's reports are those of its weights: the donor's up to the copy (at the donor's
    # LR), then its own at the new LR; every report's LR is the cosine from the trial LR of that report.
    assert any(r["step"] > t.start_step for t in moved for r in t.reports), result.table()
    assert any(len({r["trial_lr"] for r in t.reports}) > 1 for t in moved), [t.reports for t in moved]
    assert all([r["step"] for r in t.reports] == [10, 20, 30, 40] for t in result.trials), result.table()
    cosine = make_schedule("cosine", total_steps=STEPS)
    for t in result.trials:
        for r in t.reports:  # the LR of the report's last step: set at step - 1
            assert r["lr"] == pytest.approx(r["trial_lr"] * cosine(r["step"] - 1), rel=1e-9), (t.lr, t.reports)


@contextlib.contextmanager
def _core_busy():
    """A process spinning on one core for the duration, at the Ray workers' priority (they run
    niced, so one at the default priority would all but stop them): trials then report in another
    order and at other times than on a quiet machine."""
    import ray

    niceness = ray.get(ray.remote(lambda: os.nice(0)).remote())
    spinner = subprocess.Popen([sys.executable, "-c", f"import os\nos.nice({niceness})\nwhile True: pass"])
    try:
        yield
    finally:
        spinner.kill()
        spinner.wait()


def _answer(result) -> str:
    """Everything a search answers, wall times aside: the pick and every trial's LRs, value, stop,
    verdict and reports (repr: bit for bit, NaN included)."""
    return repr((result.lr, result.group_lrs, [(t.lr, t.group_lrs, t.value, t.steps, t.stop, t.verdict, t.why, t.history,
                                                t.reports) for t in result.trials]))


# PBT: three random LRs (seed 1) of plain SGD, 383 (thrashes), 4.5e5 (diverges at step 3) and 1.02;
# at step 20 the worst live trial copies the best one's weights at a perturbed LR.
# Grid and random: two trials each, every one to its budget (their answer depends on no scheduling,
# which the run under load checks).
SAME_ANSWER = {"pbt": dict(optimizer="sgd", trials=3, seed=1, min_lr=0.1, max_lr=1e6, perturbation_interval=2),
               "race": dict(optimizer="adam", trials=3),
               "grid": dict(optimizer="adam", trials=2, max_steps=2 * EVERY),
               "random": dict(optimizer="adam", trials=2, seed=2, max_steps=2 * EVERY)}


@pytest.mark.parametrize("method", list(SAME_ANSWER))
def test_same_call_same_answer_with_a_core_busy(tmp_path, ray_session, method):
    kwargs = dict(SAME_ANSWER[method])
    optimizer = kwargs.pop("optimizer")

    def search(folder):  # a model factory: called in each trial after seeding
        return _search(folder, method, model=functools.partial(GroupedDigits, optimizer=optimizer), **kwargs)

    quiet = search(tmp_path / "quiet")
    with _core_busy():
        busy = search(tmp_path / "busy")
    assert _answer(busy) == _answer(quiet), f"quiet:\n{quiet.table()}\nbusy:\n{busy.table()}"
    if method == "pbt":
        from lrfuse.lightning.search.api import _initial_lrs

        initial = _initial_lrs("pbt", 3, 0.1, 1e6, 1)
        assert [t.stop for t in quiet.trials].count("diverged (step 3)") == 1, quiet.table()
        assert any(t.lr not in initial for t in quiet.trials), quiet.table()  # an exploit happened
    elif method == "race":
        assert sum(t.stop == "budget" for t in quiet.trials) == 1, quiet.table()
    else:
        assert [t.stop for t in quiet.trials] == ["budget", "budget"], quiet.table()


# Exact resume: 10 batches an epoch (1,257 training images, batches of 125) and a report every 5
# steps, so the race's rungs fall in the middle of an epoch (step 5) and at its end (step 10).
EXACT = dict(trials=3, min_lr=1e-4, max_lr=1e-2, max_steps=20, eval_every=5, audit=True)


def _exact_search(tmp_path, method, **kwargs):
    pl.seed_everything(0, verbose=False)
    return search_lr(GroupedDigits(dropout=0.2), DigitsDataModule(batch_size=125), method=method,
                     storage_path=tmp_path / "ray", **{**EXACT, **kwargs})


@pytest.fixture(scope="module")
def uninterrupted_grid(tmp_path_factory, ray_session):
    """The race's LRs, each trained in one go: the reference every race trial must match."""
    return _exact_search(tmp_path_factory.mktemp("grid"), "grid")


def _matches_uninterrupted(race, grid):
    """Every report of every race trial: the same batches so far (chained checksum) and the same
    weights (bit for bit) as the uninterrupted run at the same LR and step; a trial resumed from a
    checkpoint (rung, Ctrl-C) has exactly the reports of that checkpoint's run, so all of them."""
    assert [t.lr for t in race.trials] == [t.lr for t in grid.trials]
    for r, g in zip(race.trials, grid.trials):
        reference = {rep["step"]: rep for rep in g.reports}
        steps = [rep["step"] for rep in r.reports]
        assert steps and steps[-1] == r.steps, (r.lr, steps)
        assert steps == [5, 10, 15, 20][:len(steps)], (r.lr, steps)
        for rep in r.reports:
            assert rep["data_chain"] == reference[rep["step"]]["data_chain"], (r.lr, rep["step"])
            assert rep["weights_checksum"] == reference[rep["step"]]["weights_checksum"], (r.lr, rep["step"])


def test_grid_trials_see_one_data_order_for_the_whole_run(uninterrupted_grid):
    grid = uninterrupted_grid
    assert all(t.starts == 1 and t.steps == 20 for t in grid.trials), grid.table()
    for step in (5, 10, 15, 20):  # every batch of the run, not only the first interval's
        chains = {rep["data_chain"] for t in grid.trials for rep in t.reports if rep["step"] == step}
        assert len(chains) == 1, (step, chains)
    assert len({t.init_checksum for t in grid.trials}) == 1
    assert len({t.reports[-1]["weights_checksum"] for t in grid.trials}) == 3  # three LRs, three results


def test_race_stops_the_slow_and_resumed_trials_train_as_if_never_paused(tmp_path, uninterrupted_grid):
    race = _exact_search(tmp_path, "race")
    _same_start(race)
    _ratios_kept(race)
    resumed = [t for t in race.trials if t.starts > 1]
    assert resumed, race.table()  # at a rung, all but the last to report wait (paused, checkpointed)
    assert {t.start_step for t in resumed} <= {5, 10}
    full = [t for t in race.trials if t.steps == 20]
    stopped = [t for t in race.trials if t.stop.startswith("race")]
    assert len(full) == 1 and race.best is full[0] and len(stopped) == 2, race.table()
    assert race.trials[0] in stopped  # 1e-4 falls slowest
    assert {t.steps for t in stopped} <= {5, 10}  # stopped at a rung (reports 1 and 2)
    assert race.total_steps < 3 * 20
    _matches_uninterrupted(race, uninterrupted_grid)


def test_an_interrupted_race_resumes_where_it_stopped(tmp_path, uninterrupted_grid):
    # Ctrl-C (SIGINT to this process) while a trial is at step 7, between the rungs at 5 and 10.
    interrupt = InterruptOnce(str(tmp_path / "interrupted"), step=7, pid=os.getpid())
    kwargs = dict(name="interrupted", trainer_kwargs={"callbacks": [interrupt]})
    before = _temp_entries()
    with pytest.raises(KeyboardInterrupt, match="resume=True"):
        _exact_search(tmp_path, "race", **kwargs)
    assert (tmp_path / "interrupted").exists()
    assert _temp_entries() == before  # an interrupted search leaves nothing either
    with pytest.raises(ValueError, match="method='race'"):
        _exact_search(tmp_path, "grid", resume=True, **kwargs)
    race = _exact_search(tmp_path, "race", resume=True, **kwargs)
    assert len(race.trials) == 3 and all(t.error is None for t in race.trials), race.table()
    assert [t.steps for t in race.trials].count(20) == 1, race.table()
    assert all(t.stop in ("budget", "race (behind at step 5)", "race (behind at step 10)") for t in race.trials)
    assert any(t.starts > 1 for t in race.trials)
    _matches_uninterrupted(race, uninterrupted_grid)


def test_resume_needs_a_saved_search(tmp_path, ray_session):
    with pytest.raises(ValueError, match="needs name="):
        _exact_search(tmp_path, "race", resume=True)
    with pytest.raises(ValueError, match="holds no lrfuse search"):
        _exact_search(tmp_path, "race", resume=True, name="never-ran")


def test_worker_death_is_retried_from_the_last_checkpoint(tmp_path, uninterrupted_grid):
    # The first worker to reach step 12 dies. Tune retries its trial from the last checkpoint it had
    # registered (step 10, or 5 if the death came first: either way not from scratch), and the
    # retried trial trains exactly as the uninterrupted one, batch for batch and bit for bit.
    marker = tmp_path / "died"
    before = _temp_entries()
    result = _exact_search(tmp_path, "grid", max_failures=1, trainer_kwargs={"callbacks": [DieOnce(str(marker), step=12)]})
    assert marker.exists()
    assert _temp_entries() == before  # not even the dead worker's files
    retried = [t for t in result.trials if t.starts > 1]
    assert len(retried) == 1 and retried[0].starts == 2 and retried[0].start_step in (5, 10), result.table()
    assert all(t.error is None and t.stop == "budget" and t.steps == 20 for t in result.trials), result.table()
    _matches_uninterrupted(result, uninterrupted_grid)


def test_a_metric_never_logged_ends_the_search_at_the_first_report(tmp_path, ray_session):
    before = _temp_entries()
    # The README's example: a model without validation_step. Before: every trial trained to the end
    # and the search returned lr=None with every value NaN, without a word.
    with pytest.raises(ValueError, match=r"metric='val_loss'\): no validation ran at step 10 .*logged: train_loss\. "):
        _search(tmp_path, "grid", model=TrainOnly(), trials=3)
    # A name the model does not log (before: a KeyError in every trial, retried, then lr=None).
    with pytest.raises(ValueError, match=r"metric='val_accuracy'\): the validation at step 10 logged no "
                                         r"'val_accuracy'; the model logged: train_loss, val_acc, val_loss\."):
        _search(tmp_path, "race", model=DigitsClassifier(), trials=3, metric="val_accuracy", mode="max")
    assert _temp_entries() == before  # a search that failed leaves nothing either


def test_local_ray_listens_on_loopback_only(ray_session):
    import ray

    assert os.environ["RAY_USAGE_STATS_ENABLED"] == "0"
    assert ray.is_initialized()
    processes = _processes_of_this_ray()
    # The Ray of this session is among them (its GCS and raylet at least).
    assert any("gcs_server" in cmd for cmd in processes.values()), processes
    assert any("raylet" in cmd for cmd in processes.values()), processes
    listeners = _listening_sockets_of_ray()
    assert listeners, "found no listening socket of Ray's processes"
    assert all(ip in ("127.0.0.1", "::1", "::ffff:127.0.0.1") for ip, _, _ in listeners), listeners


def test_bad_arguments_are_named():
    model, dm = DigitsClassifier(), DigitsDataModule()
    cases = [(dict(method="bayes"), "unknown method 'bayes'"), (dict(trials=0), "trials must be"),
             (dict(min_lr=1e-2, max_lr=1e-3), "min_lr < max_lr"), (dict(min_lr=1e-3), "give both min_lr and max_lr"),
             (dict(max_steps=0), "max_steps"), (dict(mode="up"), "mode must be"),
             (dict(cpus_per_trial=0), "cpus_per_trial"), (dict(max_failures=-1), "max_failures"),
             (dict(method="pbt", trials=4, max_concurrent=2), "all 4 trials at the same step"),
             (dict(max_concurrent=0), "max_concurrent must be >= 1"),
             (dict(trainer_kwargs={"max_steps": 5, "logger": True}), "logger, max_steps are the search's to set")]
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
            "except ImportError as e:\n    assert 'pip install \"ray[tune]>=2.60\"' in str(e), e\n"
            "else:\n    raise SystemExit('no ImportError')\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_search_with_a_yaml_config(tmp_path, ray_session, capsys, monkeypatch):
    from lrfuse.lightning import cli as cli_module
    from lrfuse.lightning.cli import main
    from lrfuse.lightning.search.exact import checksum

    monkeypatch.setattr(sys, "argv", ["lrfuse"])
    searches = []

    def recorded(model, *args, **kwargs):  # the real search, and what the CLI passed to it
        searches.append((model, search_lr(model, *args, **kwargs)))
        return searches[-1][1]

    monkeypatch.setattr("lrfuse.lightning.search.search_lr", recorded)  # the CLI imports it when it runs
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
    # Each trial built its own model from the config (a factory: no weights shipped through Ray),
    # the same model `lrfuse fit --config` builds, weights included.
    ((factory, result),) = searches
    assert isinstance(factory, cli_module.ModelFromConfig)
    assert {t.init_checksum for t in result.trials} == {checksum(list(cli.model.parameters()))}


def test_two_nodes_on_one_machine(tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()  # the module's session, if any: this test brings its own cluster
    cluster.ensure_token()  # as search_lr does: else Ray's head writes one to ~/.ray/auth_token
    two = Cluster()
    try:
        # Not Ray's default 30 s wait for each node (a loaded machine can take longer to start two):
        # the nodes are started, then waited for as long as they take (600 s: a safety net only).
        two.add_node(num_cpus=1, wait=False)
        two.add_node(num_cpus=1, wait=False)
        two.wait_for_nodes(timeout=600)
        ray.init(address=two.address)
        _by_value()
        nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        assert len(nodes) == 2
        result = _search(tmp_path, "grid", model=DigitsClassifier(), trials=2, max_concurrent=2, address=two.address)
        # Each trial ran on a node of this cluster. Ray does not promise to spread them: when the
        # first trial ends before the second is placed, both may run on one node (seen in CI).
        assert {t.node_id for t in result.trials} <= nodes and all(t.node_id for t in result.trials)
        _same_start(result)
        assert all(t.steps == STEPS for t in result.trials)
    finally:
        ray.shutdown()
        two.shutdown()


def _processes_of_this_ray() -> dict[int, str]:
    """pid -> command line of this process, of its descendants (the local Ray's GCS, raylet and
    agents are started from it, its workers from the raylet) and of any process whose command line
    names this Ray session's folder; not every process that happens to have "ray" in its command
    line (another user's Ray, an unrelated program)."""
    import ray

    session = os.path.basename(ray._private.worker.global_worker.node.get_session_dir_path())
    parents, cmdlines = {}, {}
    for pid in map(int, filter(str.isdigit, os.listdir("/proc"))):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmdlines[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (PermissionError, FileNotFoundError, ProcessLookupError):
            continue
        parents[pid] = int(stat.rsplit(")", 1)[1].split()[1])
    ours, grew = {os.getpid()} | {pid for pid, cmd in cmdlines.items() if session in cmd}, True
    while grew:
        more = {pid for pid, parent in parents.items() if parent in ours} - ours
        ours |= more
        grew = bool(more)
    return {pid: cmdlines[pid] for pid in ours if pid in cmdlines}


def _listening_sockets_of_ray() -> list[tuple[str, int, int]]:
    """(ip, port, pid) of every TCP socket in LISTEN state held by this process or its Ray's."""
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
    for pid in _processes_of_this_ray():
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:[") and target[8:-1] in inodes:
                    found.append((*inodes[target[8:-1]], int(pid)))
        except (PermissionError, FileNotFoundError, ProcessLookupError):
            continue
    return found


@pytest.mark.parametrize("mode", [None, "token", "TOKEN", "disabled"])
def test_a_local_start_gets_a_token_in_the_environment_unless_auth_is_off(mode, tmp_path, monkeypatch):
    # RAY_AUTH_MODE=token is what Ray's own local start leaves in the process (and its children)
    # after the first search: a later start must still get a token, or Ray writes ~/.ray/auth_token.
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    if mode is not None:
        monkeypatch.setenv("RAY_AUTH_MODE", mode)
    monkeypatch.setattr(cluster, "_TOKEN_FILE", str(tmp_path / "no_token_here"))
    cluster.ensure_token()
    token = os.environ.get("RAY_AUTH_TOKEN")
    assert (token is not None) == (mode != "disabled")
    cluster.ensure_token()  # once given, the token stays: Ray keeps the first it reads
    assert os.environ.get("RAY_AUTH_TOKEN") == token


def test_a_search_that_starts_ray_keeps_rays_folders_in_its_own(tmp_path, monkeypatch):
    # Last in this module: it ends the module's Ray session. Ray would put its session folders (logs,
    # sockets) in <TMPDIR>/ray and leave them there; the search keeps them in its scratch folder,
    # removed at the end. A short temp dir: Ray's socket paths must fit in 107 bytes.
    import ray

    ray.shutdown()
    home_ray = Path.home() / ".ray" / "auth_token"
    had_token = home_ray.exists()
    short = tempfile.mkdtemp(dir="/tmp")
    try:
        monkeypatch.delenv("RAY_TMPDIR", raising=False)
        monkeypatch.setenv("TMPDIR", short)
        monkeypatch.setattr(tempfile, "tempdir", short)
        result = _search(tmp_path, "grid", model=DigitsClassifier(), trials=1, max_steps=EVERY, num_cpus=1)
        assert not ray.is_initialized()  # the search started Ray, and shut it down
        assert result.trials[0].steps == EVERY and result.lr is not None
        assert os.listdir(short) == []
        # Nor Ray's authentication token in the home folder (Ray 2.60's local start writes one
        # to ~/.ray/auth_token when it finds none): the search hands Ray a token of its own.
        assert home_ray.exists() == had_token, "the search left ~/.ray/auth_token behind"
    finally:
        shutil.rmtree(short, ignore_errors=True)
