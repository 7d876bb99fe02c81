"""What a search found: every trial as a :class:`TrialRecord`, the search as an
:class:`LRSearchResult` (the pick, a table, a plot, the config to train with), built from Tune's
results."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lrfuse.lightning.health import OK, TOO_HIGH, TOO_LOW

__all__ = ["LRSearchResult", "TrialRecord", "pick", "records"]


@dataclass
class TrialRecord:
    """One trial of a search.

    Attributes:
        lr: the trial's LR (the peak of the group with the largest LR); under PBT, its last one.
        group_lrs: every parameter group's LR in the trial (ratios as the model configures them).
        value: the last reported validation metric (``inf`` / ``-inf`` if it diverged, NaN if none).
        steps: training steps done.
        seconds: wall time of the trial.
        stop: why it stopped: ``budget``, ``race (behind at step N)``, ``diverged (step N)``, ``failed: ...``.
        verdict, why: ``too_high`` / ``too_low`` / ``ok`` and the reason, from LRHealthMonitor's rules.
        history: ``(step, value, train_loss, lr)`` at every report of the trial's weights: a report
            that a trial resumed from (pause, retry, Ctrl-C) is kept, one made after that checkpoint
            is not; under PBT a trial that copied another's checkpoint carries that trial's reports
            up to the copy.
        init_checksum, data_checksum: checksums of the initial weights and of the first evaluation
            interval's batches (equal across trials of a grid or race).
        reports: every report as a dict: ``step``, the metric, ``train_loss``, ``lr`` (the largest
            group LR then, schedules included), ``trial_lr`` (the trial's LR then; PBT changes it)
            and, with ``search_lr(audit=True)``, ``data_chain`` (a hash chained over every batch
            trained on so far) and ``weights_checksum``.
        starts: how many times the trial started (more than 1: resumed after a failure or PBT exploit).
        node_id: the Ray node of its last report.
    """

    lr: float
    group_lrs: list[float]
    value: float
    steps: int
    seconds: float
    stop: str
    verdict: str
    why: str = ""
    history: list[tuple[int, float, float, float]] = field(default_factory=list)
    reports: list[dict] = field(default_factory=list)
    init_checksum: str | None = None
    data_checksum: str | None = None
    starts: int = 0
    start_step: int = 0
    node_id: str | None = None
    error: str | None = None


@dataclass
class LRSearchResult:
    """What :func:`search_lr` found.

    Attributes:
        lr: the best trial's LR (peak group), or ``None`` if every trial failed or diverged.
        group_lrs: the best trial's per-group LRs.
        method, metric, mode: as searched.
        low, high: the LR range searched.
        trials: every trial, in the order of their LRs.
        finder: the range test's result when it set the range, else ``None``.
        budget_steps: training steps of a full trial.
        path: Tune's experiment folder (checkpoints, per-trial results; ``Tuner.restore`` resumes it).
        seconds: wall time of the whole search (the finder included).
    """

    lr: float | None
    group_lrs: list[float]
    method: str
    metric: str
    mode: str
    low: float
    high: float
    trials: list[TrialRecord]
    budget_steps: int
    finder: Any = None
    path: str | None = None
    seconds: float = 0.0
    lr_attr: str = "lr"

    @property
    def best(self) -> TrialRecord | None:
        return next((t for t in self.trials if t.lr == self.lr and self.lr is not None), None)

    @property
    def total_steps(self) -> int:
        """Training steps of all trials (the finder's excluded; see :attr:`finder`)."""
        return sum(t.steps for t in self.trials)

    def table(self) -> str:
        """Every trial as a Markdown table, the best marked with ``*``."""
        lines = [f"| | lr | group lrs | {self.metric} | steps | wall s | stopped | verdict |",
                 "|---|--:|---|--:|--:|--:|---|---|"]
        for t in self.trials:
            groups = ", ".join(f"{v:.3g}" for v in t.group_lrs)
            verdict = t.verdict.replace("_", " ") + (f" ({t.why})" if t.why else "")
            lines.append(f"| {'*' if t is self.best else ''} | {t.lr:.3g} | {groups} | {t.value:.4g} | {t.steps} | "
                         f"{t.seconds:.1f} | {t.stop} | {verdict} |")
        return "\n".join(lines)

    def summary(self) -> str:
        """One line: the best LR, its metric and what the search cost."""
        if self.lr is None:
            return f"{self.method} search: no trial finished without diverging or failing"
        best = self.best
        return (f"{self.method} search over {self.low:.3g} .. {self.high:.3g}: best lr {self.lr:.3g} "
                f"({self.metric} {best.value:.4g}), {len(self.trials)} trials, {self.total_steps} steps, "
                f"{self.seconds:.1f} s")

    def config(self) -> dict:
        """The config to train with: ``{"model": {"lr": ...}}`` for ``lrfuse fit --config``."""
        return {"model": {self.lr_attr: self.lr}}

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.config(), sort_keys=False)

    def plot(self, path: str | None = None):
        """Each trial's validation curve (left) and the final metric against the LR (right).

        Needs matplotlib. Returns the figure; writes it to ``path`` if given.
        """
        try:
            import matplotlib
            if path is not None:
                matplotlib.use("Agg", force=False)
            import matplotlib.pyplot as plt
        except ImportError as error:
            raise ImportError("LRSearchResult.plot needs matplotlib: pip install matplotlib") from error
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
        logs = [math.log10(t.lr) for t in self.trials] or [0.0]
        lo, hi = min(logs), max(logs)
        cmap = plt.get_cmap("viridis")
        for t in self.trials:
            finite = [(s, v) for s, v, _, _ in t.history if math.isfinite(v)]
            color = cmap(0.5 if hi == lo else (math.log10(t.lr) - lo) / (hi - lo))
            if finite:
                left.plot(*zip(*finite), "-o", ms=3, color=color, lw=2.5 if t is self.best else 1,
                          label=f"{t.lr:.2g}")
        left.set_xlabel("step")
        left.set_ylabel(self.metric)
        left.set_title(f"{self.method}: {len(self.trials)} trials", fontsize=9)
        if len(self.trials) <= 12:
            left.legend(fontsize=7, title="lr", title_fontsize=7)
        markers = {OK: "o", TOO_HIGH: "^", TOO_LOW: "v"}
        for t in self.trials:
            shown = t.value if math.isfinite(t.value) else np.nan
            right.scatter([t.lr], [shown], marker=markers.get(t.verdict, "o"), color="tab:red" if t is self.best else "tab:blue")
        if self.finder is not None and getattr(self.finder, "lr", None):
            right.axvline(self.finder.lr, color="tab:gray", ls="--", label=f"finder {self.finder.lr:.2g}")
        right.axvspan(self.low, self.high, color="tab:green", alpha=0.1, label="range searched")
        right.set_xscale("log")
        right.set_xlabel("learning rate (peak group)")
        right.set_ylabel(f"last {self.metric}")
        right.set_title("^ too high, v too low, o ok; red: best", fontsize=9)
        right.legend(fontsize=7)
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=120)
        return fig


def records(results, metric: str, mode: str, budget: int, method: str) -> list[TrialRecord]:
    """A :class:`TrialRecord` per Tune result, in the order of their LRs."""
    out = []
    for result in results:
        m = result.metrics or {}
        reports = json.loads(m["reports"]) if m.get("reports") else []
        history = [(int(r["step"]), float(r[metric]), float(r["train_loss"]), float(r["lr"])) for r in reports]
        steps = int(m.get("step", 0))
        if result.error is not None:
            stop = f"failed: {type(result.error).__name__}"
        elif m.get("diverged"):
            stop = f"diverged (step {steps})"
        elif steps >= budget:
            stop = "budget"
        elif method == "race":
            stop = f"race (behind at step {steps})"
        else:
            stop = f"stopped at step {steps}"
        worst = math.inf if mode == "min" else -math.inf
        value = float(m.get(metric, math.nan)) if m else math.nan
        out.append(TrialRecord(
            lr=float(result.config["lr"]),  # under PBT the trial's last (Tune updates it on exploit)
            group_lrs=list(m.get("group_lrs", [])), value=worst if m.get("diverged") else value, steps=steps,
            seconds=float(m.get("time_total_s", 0.0)), stop=stop, verdict=m.get("verdict", TOO_HIGH if m.get("diverged") else ""),
            why=m.get("why", ""), history=history, reports=reports, init_checksum=m.get("init_checksum"),
            data_checksum=m.get("data_checksum"), starts=int(m.get("starts", 0)), start_step=int(m.get("start_step", 0)),
            node_id=m.get("node_id"), error=None if result.error is None else str(result.error)))
    out.sort(key=lambda t: t.lr)
    return out


def pick(trials: list[TrialRecord], mode: str, budget: int) -> TrialRecord | None:
    """The best trial by its last metric, among those that used the whole budget where any did."""
    usable = [t for t in trials if t.error is None and math.isfinite(t.value)]
    full = [t for t in usable if t.steps >= budget]
    pool = full or usable
    if not pool:
        return None
    return (min if mode == "min" else max)(pool, key=lambda t: t.value)
