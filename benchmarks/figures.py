"""The figures the README and benchmarks/README.md quote, generated from the committed results.

    python benchmarks/figures.py           # rewrite every marked table from benchmarks/results/*.json
    python benchmarks/figures.py --check   # exit 1 where a page disagrees with the JSON (CI: tests/test_figures.py)

A generated table sits between ``<!-- figures: NAME -->`` and ``<!-- /figures -->``, NAME being one
of :data:`FIGURES`. Edit the JSON (by running the benchmark again), never the table.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PAGES = (ROOT / "README.md", ROOT / "benchmarks" / "README.md")
BLOCK = re.compile(r"(<!-- figures: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /figures -->)", re.DOTALL)

# The step-time runs the speed table quotes: the latest full run of each optimizer family.
SPEED_RUNS = ("bench_cpu.json", "bench_cpu_sgd_adagrad_adadelta_2threads_checked_plan.json")
FINDERS = {"lrfuse:race": "`lrfuse.LRFinder()` (range test + race)",
           "lrfuse:curve": "`LRFinder(race=False)` (the curve alone)",
           "lightning": "Lightning 2.6 `LearningRateFinder`"}


def _load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def finder_summary() -> str:
    """The finders on the evaluation tasks (finder_quality_evaluation.json), the README's table."""
    pooled = _load("finder_quality_evaluation.json")["summary"]["pooled"]
    lines = ["| finder | median gap (points) | within 1 point | worst gap | spread across seeds (decades) "
             "| cost (x a 10-point grid) |", "| --- | --: | --: | --: | --: | --: |"]
    for key, label in FINDERS.items():
        s = pooled[key]
        lines.append(f"| {label} | {s['median_gap']:.2f} | {s['within1_count']}/{s['cases']} "
                     f"({100 * s['within1']:.0f}%) | {s['worst_gap']:.1f} | {s['spread']:.2f} | {s['cost']:.2f} |")
    return "\n".join(lines)


def finder_evaluation() -> str:
    return _load("finder_quality_evaluation.json")["table"].strip()


def finder_tuning() -> str:
    return _load("finder_quality_tuning.json")["table"].strip()


def health_summary() -> str:
    """The monitor's verdicts on the evaluation tasks, pooled (health_quality_evaluation.json)."""
    p = _load("health_quality_evaluation.json")["summary"]["pooled"]
    return "\n".join([
        "| runs | right at far-low, good and far-high LRs | opposite final verdicts | opposite at any check |",
        "| --: | --: | --: | --: |",
        f"| {p['runs']} | {p['correct']}/{p['judged']} ({100 * p['share_correct']:.0f}%) | {p['opposite']} "
        f"| {p['opposite_any']} |"])


def health_evaluation() -> str:
    return _load("health_quality_evaluation.json")["table"].strip()


def health_tuning() -> str:
    return _load("health_quality_tuning.json")["table"].strip()


def search_summary() -> str:
    return _load("search_quality.json")["summary"].strip()


def search_cases() -> str:
    return _load("search_quality.json")["table"].strip()


def speed_summary() -> str:
    """Per optimizer, the range over workloads of torch's time / lrfuse's, in each run of SPEED_RUNS
    (the latest run of an optimizer wins): against the for-loop and foreach paths, and against
    torch's fused kernel where torch has one."""
    rows: dict[str, tuple[str, list[dict]]] = {}
    for name in SPEED_RUNS:  # an optimizer's first run in this list is the one quoted
        run = _load(name)
        for row in run["rows"]:
            if row["optimizer"] not in rows or rows[row["optimizer"]][0] == name:
                rows.setdefault(row["optimizer"], (name, []))[1].append(row)
    lines = ["| optimizer | workloads | vs for-loop and foreach | vs torch's fused | run (threads, date) |",
             "| --- | --- | --: | --: | --- |"]

    def span(values: list[float]) -> str:
        return f"{min(values):.2f}-{max(values):.2f}x" if values else "- (torch has none)"

    for optimizer, (name, run_rows) in rows.items():
        machine = _load(name)["machine"]
        times = [r["times"] for r in run_rows]
        unfused = [t[k]["median_s"] / t["lrfuse"]["median_s"] for t in times for k in ("forloop", "foreach") if k in t]
        fused = [t["fused"]["median_s"] / t["lrfuse"]["median_s"] for t in times if "fused" in t]
        lines.append(f"| {optimizer} | {', '.join(r['workload'] for r in run_rows)} | {span(unfused)} | {span(fused)} "
                     f"| `{name}` ({machine['threads']}, {machine['time_utc'][:10]}) |")
    return "\n".join(lines)


FIGURES = {f.__name__: f for f in (finder_summary, finder_evaluation, finder_tuning, health_summary,
                                   health_evaluation, health_tuning, search_summary, search_cases, speed_summary)}


def render(text: str) -> str:
    """``text`` with every marked block regenerated; an unknown name raises KeyError."""
    return BLOCK.sub(lambda m: f"{m[1]}{FIGURES[m['name']]()}\n{m[4]}", text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 where a page is out of date")
    args = parser.parse_args(argv)
    stale = []
    for page in PAGES:
        text = page.read_text()
        new = render(text)
        if new != text:
            stale.append(page.relative_to(ROOT))
            if not args.check:
                page.write_text(new)
    if args.check and stale:
        print(f"out of date with benchmarks/results: {', '.join(map(str, stale))} "
              "(run python benchmarks/figures.py)", file=sys.stderr)
        return 1
    print(("rewrote: " + ", ".join(map(str, stale))) if stale else "every figure matches its JSON")
    return 0


if __name__ == "__main__":
    sys.exit(main())
