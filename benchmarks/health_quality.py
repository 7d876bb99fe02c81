"""Are LRHealthMonitor's verdicts right? Runs from far too low to far too high, on the tasks of
``benchmarks/tasks.py`` (a tuning and an evaluation set; issue 19).

For each task and seed, the reference LR ``best`` is the best of a 10-point log grid (1e-5 .. 1)
trained with the task's own optimizer at a constant LR for its budget (``tasks.train``). Then five
runs in a real Lightning ``Trainer`` holding ``lrfuse.LRHealthMonitor`` (``every_n_steps=10``),
for the same budget, with the optimizer in two groups at the same LR (``body``: all but the last
layer, ``head``: the last layer), so every run gives two verdicts:

| LR class | LR | the verdict it should get |
| --- | --- | --- |
| ``far_low`` | best / 1e4 | ``too_low`` |
| ``low10`` | best / 10 | not ``too_high`` |
| ``good`` | best | ``ok`` |
| ``high10`` | best * 10 | not ``too_low`` |
| ``far_high`` | best * 1e3 | ``too_high`` |

Reported: the share of right final verdicts over ``far_low``, ``good`` and ``far_high`` (the
target: >= 95%), and the opposite verdicts at every class (``too_high`` where the LR is low or
good... see ``OPPOSITE``; target: none), final and at any check on the way, per class, per optimizer
and per task; and the steps until the final verdict held.

Every check's inputs (the training loss the monitor judged, each group's update ratio) are kept
in the JSON, so ``--replay`` can judge recorded runs again with other :class:`HealthRules`
settings without training (``--rules '{"high_ratio": 0.2}'``); the tables quote live runs.

    python benchmarks/health_quality.py --split tuning            # 13 tasks x 3 seeds x 5 LRs
    python benchmarks/health_quality.py --split evaluation        # what the READMEs quote
    python benchmarks/health_quality.py --smoke                   # CI: one small task, seed 0, short budget
    python benchmarks/health_quality.py --replay results/health_quality_tuning.json --rules '{"patience": 4}'

CPU, one thread by default, deterministic given the seed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import warnings

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tasks  # noqa: E402

VERDICTS = ("ok", "too_high", "too_low")
CODES = {0.0: "ok", 1.0: "too_high", -1.0: "too_low"}
LR_CLASSES = {"far_low": 1e-4, "low10": 0.1, "good": 1.0, "high10": 10.0, "far_high": 1e3}  # x the grid's best
EXPECTED = {"far_low": "too_low", "good": "ok", "far_high": "too_high"}  # judged right or wrong
OPPOSITE = {"far_low": ("too_high",), "low10": ("too_high",), "good": ("too_high", "too_low"),
            "high10": ("too_low",), "far_high": ("too_low",)}
EVERY = 10
GRID = tasks.log_grid(1e-5, 1.0, 10)
TARGETS = dict(correct=0.95, opposite=0)


def _memory_logger():
    from lightning.pytorch.loggers import Logger

    class MemoryLogger(Logger):
        def __init__(self):
            super().__init__()
            self.rows = []

        @property
        def name(self):
            return "memory"

        @property
        def version(self):
            return 0

        def log_hyperparams(self, params, *args, **kwargs):
            pass

        def log_metrics(self, metrics, step=None):
            self.rows.append((step, dict(metrics)))

    return MemoryLogger()


def reference_lr(case: tasks.Case) -> tuple[float, list[float]]:
    """The best LR of the 10-point grid at a constant LR, and the grid's scores."""
    scores = [tasks.train(case, lr) for lr in GRID]
    return GRID[int(np.argmax(scores))], scores


def run_one(case: tasks.Case, lr_class: str, lr: float, steps: int, every: int, root: str) -> dict:
    """One monitored run; per group its final verdict, the verdict history and the checks' inputs."""
    import lightning.pytorch as pl

    from lrfuse import LRHealthMonitor
    from lrfuse.lightning.runtime import quiet_trainer

    pl.seed_everything(case.seed, verbose=False)
    monitor, logger = LRHealthMonitor(every_n_steps=every, warn=False), _memory_logger()
    trainer = pl.Trainer(**quiet_trainer(logger=logger, limit_val_batches=0, max_steps=steps, max_epochs=-1,
                                         default_root_dir=root, callbacks=[monitor]))
    t0 = time.perf_counter()
    trainer.fit(case.module(lr, groups=True), train_dataloaders=case.loader())
    seconds = time.perf_counter() - t0
    checks = [(int(step), row) for step, row in logger.rows if "lr_health/train_loss" in row]
    groups = {}
    for key in sorted(monitor.status):
        history = [CODES[float(row[f"lr_health/{key}/verdict"])] for _, row in checks]
        final = monitor.status[key]
        assert history and history[-1] == final, (key, history[-1:], final)
        groups[key] = {"verdict": final, "why": monitor.reasons.get(key, ""), "history": history,
                       "ratios": [float(row[f"lr_health/{key}/update_ratio"]) for _, row in checks]}
    return {"task": case.task.name, "optimizer": case.task.optimizer, "seed": case.seed, "lr_class": lr_class,
            "lr": lr, "steps": steps, "every": every, "seconds": seconds, "check_steps": [s for s, _ in checks],
            "losses": [float(row["lr_health/train_loss"]) for _, row in checks], "groups": groups}


def replay(run: dict, rules: dict) -> dict[str, list[str]]:
    """The verdict history of each group of a recorded run, judged again by ``HealthRules(**rules)``."""
    from lrfuse.lr_health import HealthRules

    judges = {key: HealthRules(**rules) for key in run["groups"]}
    out = {key: [] for key in run["groups"]}
    for i, loss in enumerate(run["losses"]):
        for key, g in run["groups"].items():
            judges[key].add_loss(loss)
            out[key].append(judges[key].verdict(g["ratios"][: i + 1])[0])
    return out


def judge(runs: list[dict]) -> None:
    """Mark each group's verdict right / opposite (final, and at any check), and when it settled."""
    for r in runs:
        for g in r["groups"].values():
            h = g["history"]
            since = len(h) - 1
            while since > 0 and h[since - 1] == h[-1]:
                since -= 1
            g["verdict"] = h[-1]
            g["steps_to_verdict"] = r["check_steps"][since] if r.get("check_steps") else since * r["every"]
            g["correct"] = (h[-1] == EXPECTED[r["lr_class"]]) if r["lr_class"] in EXPECTED else None
            g["opposite"] = h[-1] in OPPOSITE[r["lr_class"]]
            g["opposite_any"] = any(v in OPPOSITE[r["lr_class"]] for v in h)


def summarize(runs: list[dict]) -> dict:
    def stats(rows):
        verdicts = [g for r in rows for g in r["groups"].values()]
        judged = [g for g in verdicts if g["correct"] is not None]
        reach = [g["steps_to_verdict"] for g in judged if g["correct"]]
        return {"verdicts": len(verdicts), "judged": len(judged), "correct": sum(g["correct"] for g in judged),
                "share_correct": sum(g["correct"] for g in judged) / len(judged) if judged else None,
                "counts": {v: sum(g["verdict"] == v for g in verdicts) for v in VERDICTS},
                "opposite": sum(g["opposite"] for g in verdicts),
                "opposite_any": sum(g["opposite_any"] for g in verdicts),
                "steps_to_verdict_median": float(np.median(reach)) if reach else None,
                "steps_to_verdict_max": int(max(reach)) if reach else None, "runs": len(rows)}

    out = {"pooled": stats(runs),
           "by_lr_class": {c: stats([r for r in runs if r["lr_class"] == c]) for c in LR_CLASSES
                           if any(r["lr_class"] == c for r in runs)},
           "by_optimizer": {o: stats([r for r in runs if r["optimizer"] == o])
                            for o in dict.fromkeys(r["optimizer"] for r in runs)},
           "by_task": {t: stats([r for r in runs if r["task"] == t]) for t in dict.fromkeys(r["task"] for r in runs)}}
    p = out["pooled"]
    out["targets"] = {"correct": (p["share_correct"] or 0) >= TARGETS["correct"], "opposite": p["opposite"] <= TARGETS["opposite"]}
    return out


def table(summary: dict) -> str:
    lines = ["| runs | right (far low, good, far high) | ok / too high / too low | opposite: final / at any check | "
             "steps to verdict (median / max) |", "|---|--:|---|--:|---|"]

    def row(label, s):
        c = s["counts"]
        right = "-" if not s["judged"] else f"{s['correct']}/{s['judged']} ({100 * s['share_correct']:.0f}%)"
        med = "-" if s["steps_to_verdict_median"] is None else f"{s['steps_to_verdict_median']:.0f} / {s['steps_to_verdict_max']}"
        return f"| {label} | {right} | {c['ok']} / {c['too_high']} / {c['too_low']} | {s['opposite']} / {s['opposite_any']} | {med} |"

    for c, s in summary["by_lr_class"].items():
        lines.append(row(f"{c} (x{LR_CLASSES[c]:g})", s))
    for o, s in summary["by_optimizer"].items():
        lines.append(row(o, s))
    lines.append(row("all", summary["pooled"]))
    lines += ["", "| task | right | opposite: final / any | wrong or opposite verdicts (class: group verdicts) |", "|---|--:|--:|---|"]
    for t, s in summary["by_task"].items():
        lines.append(f"| {t} | {s['correct']}/{s['judged']} | {s['opposite']} / {s['opposite_any']} | {{{t}}} |")
    return "\n".join(lines)


def _wrong(runs: list[dict], task: str) -> str:
    bad = []
    for r in runs:
        if r["task"] != task:
            continue
        vs = [g["verdict"] for g in r["groups"].values()]
        if any(g["correct"] is False or g["opposite"] for g in r["groups"].values()):
            bad.append(f"s{r['seed']} {r['lr_class']}: {'/'.join(vs)}")
    return "; ".join(bad) or "-"


def render(runs: list[dict]) -> tuple[str, dict]:
    judge(runs)
    summary = summarize(runs)
    text = table(summary)
    for t in summary["by_task"]:
        text = text.replace(f"{{{t}}}", _wrong(runs, t))
    return text, summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--split", default=None, help="tuning, evaluation, or comma-separated task names "
                        "(default: tuning; smoke: moons)")
    parser.add_argument("--smoke", action="store_true", help="one small task, seed 0, 80 steps, every 5 (CI)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2 (smoke: 0)")
    parser.add_argument("--steps", type=int, default=None, help="override every task's budget")
    parser.add_argument("--every", type=int, default=None, help=f"the monitor's every_n_steps (default {EVERY}; smoke 5)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--replay", default=None, metavar="JSON", help="judge the runs of a results file again "
                        "with --rules instead of training")
    parser.add_argument("--rules", default="{}", help="HealthRules keyword arguments as JSON, for --replay")
    parser.add_argument("--json", default=None, help="where to write the results (default: "
                        "results/health_quality_<split>.json; smoke and replay: none)")
    args = parser.parse_args(argv)

    if args.replay:
        with open(args.replay) as f:
            runs = json.load(f)["runs"]
        rules = json.loads(args.rules)
        for r in runs:
            for key, history in replay(r, rules).items():
                r["groups"][key]["history"] = history
        text, _ = render(runs)
        print(text)
        return 0

    split = args.split or ("moons" if args.smoke else "tuning")
    try:
        chosen = tasks.tasks_of(split)
    except ValueError as error:
        parser.error(str(error))
    seeds = args.seeds if args.seeds is not None else ([0] if args.smoke else [0, 1, 2])
    every = args.every or (5 if args.smoke else EVERY)
    out_path = args.json if args.json is not None else (
        None if args.smoke else os.path.join(os.path.dirname(__file__), "results", f"health_quality_{split}.json"))

    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    from lrfuse.lightning.runtime import quiet_logs  # (imports Lightning, which sets its loggers to INFO)

    quiet_logs()

    start = time.perf_counter()
    runs, references = [], []
    try:
        with tempfile.TemporaryDirectory() as root:
            for task in chosen:
                for seed in seeds:
                    case = tasks.Case(task, seed)
                    steps = args.steps or (80 if args.smoke else case.steps)
                    best, scores = reference_lr(case)
                    references.append({"task": task.name, "seed": seed, "best_lr": best, "grid": GRID, "scores": scores})
                    for c, factor in LR_CLASSES.items():
                        r = run_one(case, c, best * factor, steps, every, root)
                        runs.append(r)
                        got = " ".join(f"{k.split('/')[-1]} {g['verdict']}" for k, g in r["groups"].items())
                        print(f"{task.name} seed {seed} {c} lr {r['lr']:.2g}: {got}  {r['seconds']:.1f} s", flush=True)
    finally:
        torch.set_num_threads(threads)
    total = time.perf_counter() - start
    text, summary = render(runs)
    print()
    print(text)
    print(f"\n{len(runs)} runs in {total:.0f} s")
    import lightning

    import lrfuse
    meta = {"date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "seconds": total, "split": split,
            "tasks": [t.name for t in chosen], "argv": sys.argv[1:] if argv is None else argv, "seeds": seeds,
            "lr_classes": LR_CLASSES, "expected": EXPECTED, "opposite": OPPOSITE, "every_n_steps": every,
            "threads": args.threads, "targets": TARGETS,
            "versions": {"torch": torch.__version__, "lightning": lightning.__version__, "lrfuse": lrfuse.__version__,
                         "python": platform.python_version()}}
    if out_path:
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        with open(out_path, "w") as f:
            json.dump({"meta": meta, "summary": summary, "table": text, "references": references, "runs": runs}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
