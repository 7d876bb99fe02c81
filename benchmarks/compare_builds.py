"""Step time of two builds of lrfuse, before and after a change, in alternating runs.

Two builds of the extension cannot load into one process (both register torch.ops.lrfuse), so
this interleaves whole benchmark runs instead: A, B, A, B, ... each in its own process
(``lrfuse.benchmark.main`` with the tree first on PYTHONPATH). Within each run torch's own
implementations are timed beside lrfuse's, so every lrfuse time is read as a ratio to torch's best
in the same run; drift of the shared machine between runs cancels in that ratio. Reports, per
workload and optimizer, the median over runs of each build's ratio, and B's over A's; with
``--stats`` (passed on to the benchmark), also each build's median cost of ``track_stats=True``.

    python benchmarks/compare_builds.py /tmp/before /work/main --rounds 2 --optimizers FusedAdam,FusedRMSprop
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def run_once(tree: str, bench_args: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        env = {**os.environ, "PYTHONPATH": tree}
        code = "import sys; from lrfuse.benchmark import main; sys.exit(main(sys.argv[1:]))"
        subprocess.run([sys.executable, "-c", code, *bench_args, "--json", str(out)], env=env, check=True,
                       stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", help="write every run and the summary here")
    args, bench_args = parser.parse_known_args(argv)
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    for r in range(args.rounds):
        for label in ("before", "after") if r % 2 == 0 else ("after", "before"):
            runs[label].append(run_once(getattr(args, label), bench_args))
            print(f"round {r + 1}: {label} done", file=sys.stderr, flush=True)
    summary = []
    keys = [(row["workload"], row["optimizer"]) for row in runs["before"][0]["rows"]]
    stats = "stats_cost" in runs["before"][0]["rows"][0]
    print("| workload | optimizer | before: x torch best | after: x torch best | after / before |"
          + " stats cost before | stats cost after |" * stats)
    print("|---|---|--:|--:|--:|" + "--:|--:|" * stats)
    for k, key in enumerate(keys):
        ratio = {label: statistics.median(run["rows"][k]["ratios"]["best"] for run in runs[label]) for label in runs}
        change = ratio["after"] / ratio["before"]
        entry = {"workload": key[0], "optimizer": key[1], **ratio, "after_over_before": change}
        line = f"| {key[0]} | {key[1]} | {ratio['before']:.2f} | {ratio['after']:.2f} | {change:.2f} |"
        if stats:
            cost = {label: statistics.median(run["rows"][k]["stats_cost"] for run in runs[label]) for label in runs}
            entry["stats_cost"] = cost
            line += f" {100 * cost['before']:+.1f}% | {100 * cost['after']:+.1f}% |"
        summary.append(entry)
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
