"""How good are the LR finders' suggestions? lrfuse's finder and Lightning's against a grid, on the
tasks of ``benchmarks/tasks.py`` (a tuning and an evaluation set; issue 19).

For each task and seed, and each protocol (a constant LR; linear warm-up over 10% of the run then
cosine to 0, the LR being the peak), one ``lrfuse.find_lr`` in a trainer set up as the run will be
(the protocol's ``LRSchedule`` callback, the task's budget, its validation set), sweeping 1e-5 .. 1
in 100 steps from the weights and batch order every run of the case starts from:

- ``lrfuse:race`` is what ``LRFinder`` does by default: the sweep, then a race of four candidates
  around the curve's edge, each trained for a fifth of the run under the protocol's schedule
  compressed, judged on validation loss (:func:`lrfuse.lr_range.race_pick`);
- ``lrfuse:curve`` is the curve's own suggestion from the same sweep (``LRFinder(race=False)``:
  method ``auto``, as the schedule's peak under a schedule);
- ``lrfuse:valley``, ``lrfuse:steepest``, ``lrfuse:min10``: the other curve methods, read from the
  same curve for a constant LR;
- ``lightning``: Lightning's ``Tuner(trainer).lr_find`` (its steepest-gradient suggestion) over
  the same range, once, used for both protocols.

Each suggestion is trained at the task's budget under the protocol (``tasks.train``, the task's own
optimizer), as is every point of a 10-point log grid (1e-5 .. 1), the reference: the grid's best
validation score. Scores are points (accuracy in percent, or ``100 * max(R^2, 0)``). Reported per
method, per split, per task and protocol: the median and worst gap to the grid's best, the share of
(seed, protocol) cases within 1 point, the spread of the suggestion across seeds (std of log10 lr,
decades, the worst task and protocol), its bias against the grid's best LR, the cost (finder steps
plus the one training run, over the grid's steps) and silent failures (no suggestion: the model's
1e-3 is trained and counted as a failure; or a suggestion within a decade of the sweep's minimum).

    python benchmarks/finder_quality.py --split tuning        # rules are chosen looking at this
    python benchmarks/finder_quality.py --split evaluation    # what the READMEs quote
    python benchmarks/finder_quality.py --smoke               # CI: one small task, seed 0, short budget
    python benchmarks/finder_quality.py --merge a.json b.json --json all.json   # runs made side by side

CPU, one thread by default, deterministic given the seed.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
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

CURVE_METHODS = ("valley", "steepest", "min10")
METHODS = ("lrfuse:race", "lrfuse:curve") + tuple(f"lrfuse:{m}" for m in CURVE_METHODS) + ("lightning",)
PROTOCOLS = ("constant", "warmup_cosine")
GRID_RANGE = (1e-5, 1.0)
FALLBACK_LR = 1e-3  # the model's LR, kept when a finder makes no suggestion
TARGETS = dict(median_gap=0.5, within1=0.85, worst_gap=3.0, spread=0.15, cost=0.2)


def protocol_schedule(protocol: str, steps: int):
    """``(LRSchedule callback or None, factor function)`` of a protocol."""
    from lrfuse.lightning import LRSchedule
    from lrfuse.schedules import make_schedule

    if protocol == "constant":
        return None, make_schedule("constant")
    if protocol != "warmup_cosine":
        raise ValueError(f"unknown protocol {protocol!r}")
    kwargs = dict(total_steps=steps, warmup_steps=max(1, steps // 10))
    return LRSchedule("cosine", **kwargs), make_schedule("cosine", **kwargs)


def _trainer(root: str, **kwargs):
    import lightning.pytorch as pl

    from lrfuse.lightning.runtime import quiet_trainer

    return pl.Trainer(**quiet_trainer(default_root_dir=root, **kwargs))


def run_lrfuse(case: tasks.Case, protocol: str, finder: dict, root: str) -> tuple[dict, dict]:
    """One lrfuse finder for ``protocol``: every method's suggestion, and the steps each took."""
    import lightning.pytorch as pl

    from lrfuse import find_lr

    pl.seed_everything(case.seed, verbose=False)
    callback, _ = protocol_schedule(protocol, case.steps)
    trainer = _trainer(root, max_steps=case.steps, callbacks=[] if callback is None else [callback])
    result = find_lr(trainer, case.module(FALLBACK_LR), train_dataloaders=case.loader(),
                     val_dataloaders=case.val_loader(), **finder)
    sweep = len(result.lrs)
    if result.race is None:  # no suggestion, so no race
        suggested = {m: None for m in METHODS if m != "lightning"}
        return suggested, {m: sweep for m in suggested}
    suggested = {"lrfuse:race": result.lr if result.method == "race" else None, "lrfuse:curve": result.race["curve_lr"]}
    suggested.update({f"lrfuse:{m}": result.suggest(m, schedule_mean=1.0).lr for m in CURVE_METHODS})
    steps = {m: sweep for m in suggested}
    steps["lrfuse:race"] = sweep + len(result.race["lrs"]) * result.race["steps"]
    return suggested, steps


def run_lightning(case: tasks.Case, finder: dict, root: str) -> tuple[float | None, int]:
    """Lightning's own range test (``Tuner.lr_find``); its suggestion and the steps it took."""
    import lightning.pytorch as pl
    from lightning.pytorch.tuner import Tuner

    pl.seed_everything(case.seed, verbose=False)
    trainer = _trainer(root, max_epochs=-1)
    lf = Tuner(trainer).lr_find(case.module(FALLBACK_LR), train_dataloaders=case.loader(), min_lr=finder["min_lr"],
                                max_lr=finder["max_lr"], num_training=finder["num_steps"], update_attr=False)
    return lf.suggestion(), len(lf.results["lr"])


def run_case(task: tasks.Task, seed: int, grid: list[float], finder: dict, root: str, protocols=PROTOCOLS,
             steps: int | None = None) -> dict:
    case = tasks.Case(task, seed)
    if steps is not None:
        case.steps = steps
    cache: dict[tuple[str, float], float] = {}

    def trained(lr: float, protocol: str) -> float:
        key = (protocol, float(lr))
        if key not in cache:
            cache[key] = tasks.train(case, float(lr), protocol_schedule(protocol, case.steps)[1])
        return cache[key]

    t0 = time.perf_counter()
    light, light_steps = run_lightning(case, finder, root)
    suggestions, finder_steps = {}, {}
    for protocol in protocols:
        suggestions[protocol], finder_steps[protocol] = run_lrfuse(case, protocol, finder, root)
        suggestions[protocol]["lightning"] = light
        finder_steps[protocol]["lightning"] = light_steps
    t1 = time.perf_counter()
    out = {"task": task.name, "optimizer": task.optimizer, "seed": seed, "steps": case.steps,
           "suggested": suggestions, "finder_steps": finder_steps, "grid_steps": len(grid) * case.steps,
           "protocols": {}}
    for protocol in protocols:
        grid_scores = [trained(lr, protocol) for lr in grid]
        best_i = int(np.argmax(grid_scores))
        methods = {}
        for m in METHODS:
            lr = suggestions[protocol][m]
            failure = "none" if lr is None else ("collapse" if lr < 10 * finder["min_lr"] else None)
            used = FALLBACK_LR if lr is None else lr
            s = trained(used, protocol)
            methods[m] = {"lr": lr, "trained_lr": used, "score": s, "gap": grid_scores[best_i] - s, "failure": failure}
        out["protocols"][protocol] = {"grid": [[lr, s] for lr, s in zip(grid, grid_scores)], "best_lr": grid[best_i],
                                      "best_score": grid_scores[best_i], "methods": methods}
    out["seconds"] = {"finders": t1 - t0, "training": time.perf_counter() - t1}
    return out


# ----------------------------------------------------------------------------- the report

def summarize(cases: list[dict], methods=METHODS) -> dict:
    """Per method: the statistics over ``cases`` (any subset: a task, a protocol)."""
    out = {}
    for m in methods:
        gaps, bias, fails, cost = [], [], 0, []
        spreads = {}
        for c in cases:
            for protocol, p in c["protocols"].items():
                r = p["methods"][m]
                gaps.append(r["gap"])
                fails += r["failure"] is not None
                if r["lr"] is not None:
                    bias.append(math.log10(r["lr"] / p["best_lr"]))
                cost.append((c["finder_steps"][protocol][m] + c["steps"]) / c["grid_steps"])
        for t in dict.fromkeys(c["task"] for c in cases):
            for protocol in PROTOCOLS:
                logs = [math.log10(c["suggested"][protocol][m]) for c in cases
                        if c["task"] == t and protocol in c["protocols"] and c["suggested"][protocol][m]]
                spreads[f"{t}/{protocol}"] = float(np.std(logs)) if len(logs) > 1 else 0.0
        gaps = np.asarray(gaps)
        s = out[m] = {"cases": len(gaps), "median_gap": float(np.median(gaps)), "worst_gap": float(gaps.max()),
                      "mean_gap": float(gaps.mean()), "within1": float(np.mean(gaps <= 1.0)),
                      "within1_count": int(np.sum(gaps <= 1.0)), "spread": max(spreads.values()),
                      "spread_median": float(np.median(list(spreads.values()))), "spread_by_task": spreads,
                      "bias": float(np.median(bias)) if bias else None, "cost": float(np.median(cost)),
                      "cost_max": float(np.max(cost)), "failures": fails}
        s["targets"] = {"median_gap": s["median_gap"] <= TARGETS["median_gap"],
                        "within1": s["within1"] >= TARGETS["within1"], "worst_gap": s["worst_gap"] <= TARGETS["worst_gap"],
                        "spread": s["spread"] <= TARGETS["spread"], "cost": s["cost"] <= TARGETS["cost"]}
    return out


HEADER = ("| cases | method | median gap | worst gap | within 1 pt | spread, worst / median (dec) | bias (dec) | "
          "cost (median / max) | failures | targets met |\n|---|---|--:|--:|--:|--:|--:|--:|--:|--:|")


def _row(label: str, m: str, s: dict) -> str:
    bias = "-" if s["bias"] is None else f"{s['bias']:+.2f}"
    return (f"| {label} | {m} | {s['median_gap']:.2f} | {s['worst_gap']:.1f} | {s['within1_count']}/{s['cases']} "
            f"({100 * s['within1']:.0f}%) | {s['spread']:.2f} / {s['spread_median']:.2f} | {bias} | "
            f"{s['cost']:.2f} / {s['cost_max']:.2f} | {s['failures']} | {sum(s['targets'].values())}/5 |")


def _only(case: dict, protocol: str) -> dict:
    return {**case, "protocols": {protocol: case["protocols"][protocol]}}


def report(cases: list[dict]) -> tuple[str, dict]:
    protocols = [p for p in PROTOCOLS if all(p in c["protocols"] for c in cases)]
    summary = {"pooled": summarize(cases), "by_protocol": {p: summarize([_only(c, p) for c in cases]) for p in protocols},
               "by_task": {}, "grid_best_spread": {}}
    lines = [HEADER] + [_row("all", m, summary["pooled"][m]) for m in METHODS]
    for p in protocols:
        lines += [_row(p, m, summary["by_protocol"][p][m]) for m in METHODS]
    lines += ["", "| task | optimizer | protocol | grid best LR per seed | best score (median) | "
              + " | ".join(f"{m} gap" for m in METHODS) + " |", "|---|---|---|---|--:|" + "--:|" * len(METHODS)]
    for t in dict.fromkeys(c["task"] for c in cases):
        sub = [c for c in cases if c["task"] == t]
        summary["by_task"][t] = {p: summarize([_only(c, p) for c in sub]) for p in protocols}
        for p in protocols:
            best = " ".join(f"{c['protocols'][p]['best_lr']:.0e}" for c in sub)
            med = float(np.median([c["protocols"][p]["best_score"] for c in sub]))
            gaps = " | ".join(f"{summary['by_task'][t][p][m]['median_gap']:.2f}" for m in METHODS)
            lines.append(f"| {t} | {sub[0]['optimizer']} | {p} | {best} | {med:.1f} | {gaps} |")
            logs = [math.log10(c["protocols"][p]["best_lr"]) for c in sub]
            summary["grid_best_spread"][f"{t}/{p}"] = float(np.std(logs)) if len(logs) > 1 else 0.0
    return "\n".join(lines), summary


def merge(paths: list[str], out: str | None) -> int:
    """Report the cases of several runs (same grid and finder) as one."""
    runs = [json.load(open(p)) for p in paths]
    for run in runs[1:]:
        if any(run["meta"][k] != runs[0]["meta"][k] for k in ("grid", "finder", "threads")):
            raise SystemExit("--merge: the runs differ in their grid, finder or threads")
    cases = [c for run in runs for c in run["cases"]]
    table, summary = report(cases)
    print(table)
    meta = {**runs[0]["meta"], "merged": [r["meta"]["argv"] for r in runs],
            "seconds": sum(r["meta"]["seconds"] for r in runs),
            "tasks": list(dict.fromkeys(t for r in runs for t in r["meta"]["tasks"]))}
    if out:
        with open(out, "w") as f:
            json.dump({"meta": meta, "summary": summary, "table": table, "cases": cases}, f, indent=1)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--split", default=None, help="tuning, evaluation, or comma-separated task names "
                        "(default: tuning; smoke: iris)")
    parser.add_argument("--smoke", action="store_true", help="one small task, seed 0, 100 steps, 4 grid points (CI)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2 (smoke: 0)")
    parser.add_argument("--steps", type=int, default=None, help="override every task's training budget")
    parser.add_argument("--grid", type=int, default=None, help="grid points over 1e-5 .. 1 (default 10)")
    parser.add_argument("--finder-steps", type=int, default=None, help="range-test steps (default 100)")
    parser.add_argument("--protocols", default=None, help=f"comma-separated, of {','.join(PROTOCOLS)} (default all)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None, help="where to write the results (default: "
                        "results/finder_quality_<split>.json; smoke: none)")
    parser.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                        help="report the cases of earlier runs' JSON files together instead of running")
    args = parser.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.json)

    split = args.split or ("iris" if args.smoke else "tuning")
    try:
        chosen = tasks.tasks_of(split)
    except ValueError as error:
        parser.error(str(error))
    protocols = args.protocols.split(",") if args.protocols else list(PROTOCOLS)
    if set(protocols) - set(PROTOCOLS):
        parser.error(f"--protocols: choose from {', '.join(PROTOCOLS)}")
    seeds = args.seeds if args.seeds is not None else ([0] if args.smoke else [0, 1, 2])
    steps = args.steps or (100 if args.smoke else None)
    grid = tasks.log_grid(*GRID_RANGE, args.grid or (4 if args.smoke else 10))
    finder = dict(min_lr=GRID_RANGE[0], max_lr=GRID_RANGE[1], num_steps=args.finder_steps or (40 if args.smoke else 100))
    out_path = args.json if args.json is not None else (
        None if args.smoke else os.path.join(os.path.dirname(__file__), "results", f"finder_quality_{split}.json"))

    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    import lightning.pytorch.tuner.lr_finder as lightning_lr_finder  # then quiet Lightning: importing it

    # sets its loggers to INFO, and its lr_find always shows a progress bar
    tqdm = lightning_lr_finder.tqdm
    lightning_lr_finder.tqdm = functools.partial(tqdm, disable=True)
    from lrfuse.lightning.runtime import quiet_logs

    warnings.filterwarnings("ignore")
    quiet_logs()

    start = time.perf_counter()
    cases = []
    try:
        with tempfile.TemporaryDirectory() as root:  # Lightning's finder writes a checkpoint there
            for task in chosen:
                for seed in seeds:
                    c = run_case(task, seed, grid, finder, root, protocols, steps)
                    cases.append(c)
                    line = " | ".join(
                        f"{p}: grid {c['protocols'][p]['best_lr']:.0e} ({c['protocols'][p]['best_score']:.1f}) "
                        + " ".join(f"{m.split(':')[-1]} {r['trained_lr']:.1e}:{r['gap']:+.1f}"
                                   for m, r in c["protocols"][p]["methods"].items()) for p in protocols)
                    print(f"{task.name} seed {seed}: {line} | {c['seconds']['finders']:.0f}+{c['seconds']['training']:.0f} s",
                          flush=True)
    finally:
        torch.set_num_threads(threads)
        lightning_lr_finder.tqdm = tqdm
    total = time.perf_counter() - start
    table, summary = report(cases)
    print()
    print(table)
    print(f"\n{len(cases)} (task, seed) cases x {len(protocols)} protocols in {total:.0f} s")
    import lightning
    import sklearn

    import lrfuse
    meta = {"date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "seconds": total, "split": split,
            "tasks": [t.name for t in chosen], "argv": sys.argv[1:] if argv is None else argv, "seeds": seeds,
            "protocols": protocols, "grid": grid, "finder": finder, "fallback_lr": FALLBACK_LR, "targets": TARGETS,
            "threads": args.threads,
            "versions": {"torch": torch.__version__, "lightning": lightning.__version__, "sklearn": sklearn.__version__,
                         "lrfuse": lrfuse.__version__, "python": platform.python_version()}}
    if out_path:
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        with open(out_path, "w") as f:
            json.dump({"meta": meta, "summary": summary, "table": table, "cases": cases}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
