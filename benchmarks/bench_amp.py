"""What each GradScaler path costs: one fp16-AMP optimizer step of FusedAdam and torch's Adam.

    python benchmarks/bench_amp.py                  # CPU; JSON in benchmarks/results/bench_amp_cpu.json
    python benchmarks/bench_amp.py --device cuda
    python benchmarks/bench_amp.py --quick          # small sizes: a smoke test, not a measurement

Paths, each timed as `scaler.step(opt); scaler.update()` after the gradients are restored to their
scaled values (the `restore` row is that copy alone, to subtract):

- `lrfuse in-kernel`: GradScaler hands the kernel its scale and inf flag (a plain torch loop);
- `lrfuse unscale_`: `scaler.unscale_(opt)` first, as Lightning does for its hooks and clipping;
  GradScaler then passes only the inf flag;
- `torch foreach` / `torch fused`: torch.optim.Adam under the same GradScaler.

Every path is timed in alternating blocks in one run (lrfuse.benchmark.time_interleaved).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import logging

import torch

# torch.utils.benchmark imports torch.utils.cpp_extension, whose CUDA_HOME notice is noise here.
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)

import lrfuse  # noqa: E402
from lrfuse.benchmark import _fresh_groups, machine_info, make_workload, time_interleaved  # noqa: E402

WORKLOADS = ("large", "many_small", "tiny")


def _amp_step(opt: torch.optim.Optimizer, device: torch.device, unscale_first: bool):
    # A constant scale (no growth, finite gradients): every timed step does the same work.
    scaler = torch.amp.GradScaler(device.type, init_scale=1024.0, growth_interval=10**9)
    scaler.scale(torch.ones((), device=device))  # the scale tensor is made at the first scale()
    params = [p for g in opt.param_groups for p in g["params"]]
    scaled = [p.grad.mul(1024.0) for p in params]
    grads = [p.grad for p in params]

    def restore():
        torch._foreach_copy_(grads, scaled)

    def step():
        restore()
        if unscale_first:
            scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()

    for _ in range(3):  # the first step creates the state
        step()
    return step, restore


def run(device: str, workloads, quick: bool, min_run_time: float) -> dict:
    dev = torch.device(device)
    rows = {}
    for name in workloads:
        work = make_workload(name, quick=quick)
        fns = {}
        fns["lrfuse in-kernel"], restore = _amp_step(lrfuse.FusedAdam(_fresh_groups(work, dev, 0)), dev, False)
        fns["lrfuse unscale_"], _ = _amp_step(lrfuse.FusedAdam(_fresh_groups(work, dev, 0)), dev, True)
        fns["torch foreach"], _ = _amp_step(torch.optim.Adam(_fresh_groups(work, dev, 0), foreach=True), dev, False)
        fns["torch fused"], _ = _amp_step(torch.optim.Adam(_fresh_groups(work, dev, 0), fused=True), dev, False)
        fns["restore"] = restore
        timed = time_interleaved(fns, dev, min_run_time)
        base = timed["restore"]["median_s"]
        ref = timed["lrfuse in-kernel"]["median_s"] - base
        rows[name] = {k: {**v, "step_ms": (v["median_s"] - base) * 1e3,
                          "vs_in_kernel": (v["median_s"] - base) / ref if k != "restore" else None}
                      for k, v in timed.items()}
        del fns
    return {"machine": machine_info(dev, torch.get_num_threads()), "torch": torch.__version__, "rows": rows}


def format_table(result: dict) -> str:
    names = ["lrfuse in-kernel", "lrfuse unscale_", "torch foreach", "torch fused"]
    lines = [f"{'workload':12s} " + " ".join(f"{n:>18s}" for n in names) + f" {'restore ms':>11s}"]
    for workload, row in result["rows"].items():
        cells = [f"{row[n]['step_ms']:8.3f} ms {row[n]['vs_in_kernel']:5.2f}x" for n in names]
        lines.append(f"{workload:12s} " + " ".join(f"{c:>18s}" for c in cells)
                     + f" {row['restore']['median_s'] * 1e3:11.3f}")
    lines.append("step ms: median block minus the gradient restore; x: time over lrfuse in-kernel's")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--min-run-time", type=float, default=1.5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    result = run(args.device, args.workloads.split(","), args.quick, 0.05 if args.quick else args.min_run_time)
    print(format_table(result))
    if not args.quick or args.json:
        path = Path(args.json or Path(__file__).parent / "results" / f"bench_amp_{args.device}.json")
        path.write_text(json.dumps(result, indent=1))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
