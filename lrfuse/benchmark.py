"""Benchmark of one optimizer step: lrfuse's fused optimizers against every ``torch.optim`` path.

For each standard workload of the design (``large``, ``many_small``, ``many_groups``, ``llrd``,
``resnet_like``, ``tiny``) and each optimizer (FusedAdam, FusedAdamW, FusedRMSprop, FusedSGD with
momentum, FusedAdagrad, FusedAdadelta), one run times a step of lrfuse and of ``torch.optim``
for-loop (``foreach=False``), ``foreach=True`` and ``fused=True`` (where torch has it), each on fresh random parameters with random gradients set
once, with :mod:`torch.utils.benchmark` (median after warm-up). The same run measures the memory
bandwidth with an in-place read+write update over a buffer far larger than the caches, so achieved
GB/s and the fraction of that bandwidth come from the same machine state as the step times.

Bytes per parameter per step (fp32), at the settings benchmarked (``BENCHED``): Adam 28 (read p, g,
m, v; write p, m, v), RMSprop 20, SGD with momentum 20, Adagrad 20, Adadelta 28.

Entry points: :func:`main` (the ``lrfuse bench`` command and ``benchmarks/bench_step.py``) and
:func:`compare_step_time` (FusedAdam against torch's Adam on a given set of parameters).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch.utils import benchmark as tbench

from lrfuse.threads import torch_threads

__all__ = ["BENCHED", "OPTIMIZERS", "WORKLOADS", "compare_step_time", "main", "measure_bandwidth", "run"]

WORKLOADS = ("large", "many_small", "many_groups", "llrd", "resnet_like", "tiny")


@dataclass(frozen=True)
class Benched:
    """How one optimizer is benchmarked."""

    torch_class: str
    kwargs: dict            # settings of both sides (SGD: momentum, as it is trained)
    bytes_per_param: int    # fp32 bytes one step reads and writes per parameter at those settings
    fused_on: tuple = ()    # devices where torch has fused=True


BENCHED = {
    "FusedAdam": Benched("Adam", {}, 28, ("cpu", "cuda")),
    "FusedAdamW": Benched("AdamW", {}, 28, ("cpu", "cuda")),
    "FusedRMSprop": Benched("RMSprop", {}, 20),
    "FusedSGD": Benched("SGD", {"momentum": 0.9}, 20, ("cpu", "cuda")),
    "FusedAdagrad": Benched("Adagrad", {}, 20, ("cpu",)),
    "FusedAdadelta": Benched("Adadelta", {}, 28),
}
OPTIMIZERS = tuple(BENCHED)

# The torch implementations compared, as constructor flags.
STATS = "lrfuse_stats"  # with --stats: plain lrfuse's optimizer stepping with track_stats=True
_TORCH_IMPLS: dict[str, dict] = {
    "forloop": {"foreach": False},
    "foreach": {"foreach": True},
    "fused": {"fused": True},
}

_BASE_LR = 1e-3
_LLRD_DECAY = 0.8


# ---------------------------------------------------------------------------------------------
# Workloads: a list of groups, each (lr, list of shapes).


@dataclass
class Workload:
    name: str
    groups: list[tuple[float, list[tuple[int, ...]]]]

    @property
    def num_params(self) -> int:
        return sum(math.prod(s) for _, shapes in self.groups for s in shapes)

    @property
    def num_tensors(self) -> int:
        return sum(len(shapes) for _, shapes in self.groups)


def _llrd_groups(d: int, vocab: int, blocks: int) -> list[tuple[float, list[tuple[int, ...]]]]:
    """BERT-base-like: embeddings, then per block q/k/v/o projections and the feed-forward pair,
    each weight with its bias (12 tensors). LR decays from the last block down to the embeddings."""
    block = [(d, d), (d,)] * 4 + [(4 * d, d), (4 * d,), (d, 4 * d), (d,)]
    groups = [(_BASE_LR * _LLRD_DECAY ** blocks, [(vocab, d), (512, d)])]
    for b in range(blocks):
        groups.append((_BASE_LR * _LLRD_DECAY ** (blocks - 1 - b), list(block)))
    return groups


def _logspaced(count: int, lo: float, hi: float) -> list[tuple[int, ...]]:
    return [(int(round(lo * (hi / lo) ** (i / (count - 1)))),) for i in range(count)]


def make_workload(name: str, quick: bool = False, large_params: int | None = None) -> Workload:
    """The shapes and groups of a standard workload; ``quick`` shrinks it for a smoke test."""
    if name == "large":
        n = large_params or (1 << 16 if quick else 16_777_216)
        return Workload(name, [(_BASE_LR, [(n,)])])
    if name in ("many_small", "many_groups"):
        count, size = (40, 256) if quick else (2000, 4096)
        if name == "many_small":
            return Workload(name, [(_BASE_LR, [(size,)] * count)])
        per = 10
        return Workload(name, [(_BASE_LR * (1 + g / 10), [(size,)] * per) for g in range(count // per)])
    if name == "llrd":
        return Workload(name, _llrd_groups(*((32, 1000, 2) if quick else (768, 30522, 12))))
    if name == "resnet_like":
        return Workload(name, [(_BASE_LR, _logspaced(*((20, 10, 2e4) if quick else (161, 1e2, 2e6))))])
    if name == "tiny":
        dims = [784, 256, 128, 10]
        shapes: list[tuple[int, ...]] = []
        for i, o in zip(dims, dims[1:]):
            shapes += [(o, i), (o,)]
        return Workload(name, [(_BASE_LR, shapes)])
    raise ValueError(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")


# ---------------------------------------------------------------------------------------------
# Timing.


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_time(fn: Callable[[], object], device: torch.device, min_run_time: float, threads: int) -> dict:
    """Median seconds of one call of ``fn`` (torch.utils.benchmark synchronizes CUDA)."""
    timer = tbench.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
    m = timer.blocked_autorange(min_run_time=min_run_time)
    return {"median_s": m.median, "min_s": min(m.times), "iqr_s": m.iqr, "runs": len(m.times),
            "per_run": m.number_per_run, "times": list(m.times)}


def _fresh_groups(work: Workload, device: torch.device, seed: int) -> list[dict]:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    groups = []
    for lr, shapes in work.groups:
        params = []
        for shape in shapes:
            p = torch.randn(shape, generator=gen).to(device).requires_grad_()
            p.grad = torch.randn(shape, generator=gen).to(device)
            params.append(p)
        groups.append({"params": params, "lr": lr})
    return groups


def _build(optimizer: str, impl: str, groups: list[dict]) -> torch.optim.Optimizer:
    if impl == "lrfuse":
        import lrfuse

        return getattr(lrfuse, optimizer)(groups, lr=_BASE_LR, **BENCHED[optimizer].kwargs)
    cls = getattr(torch.optim, BENCHED[optimizer].torch_class)
    return cls(groups, lr=_BASE_LR, **BENCHED[optimizer].kwargs, **_TORCH_IMPLS[impl])


def _impls_for(optimizer: str, device: torch.device) -> list[str]:
    impls = ["forloop", "foreach"] if device.type == "cpu" else ["foreach"]
    if device.type in BENCHED[optimizer].fused_on:
        impls.append("fused")
    return ["lrfuse"] + impls


def _block(fn: Callable[[], object], number: int, device: torch.device) -> float:
    """Seconds per call of ``number`` back-to-back calls of ``fn``."""
    _sync(device)
    start = time.perf_counter()
    for _ in range(number):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / number


def time_interleaved(fns: dict[str, Callable[[], object]], device: torch.device, min_run_time: float,
                     block_s: float = 0.05, min_passes: int = 5) -> dict[str, dict]:
    """Seconds per call of each of ``fns``, timed in short blocks taken in turn.

    A shared machine's speed drifts over seconds (neighbours' load, the memory bus), by more than
    the differences being measured. Blocks of about ``block_s`` seconds, one per function per
    pass and the order reversed every other pass, put every function under the same drift, so
    the ratios of their medians hold even while the absolute times move. Passes continue until
    each function has had about ``min_run_time`` seconds, and at least ``min_passes``. Each
    function's ``per_block_s`` lists its seconds per call block by block, in pass order, so two
    functions can be compared pass by pass.
    """
    per_call = {name: _block(fn, 1, device) for name, fn in fns.items()}
    number = {name: max(1, int(block_s / t)) for name, t in per_call.items()}
    pass_s = sum(number[name] * per_call[name] for name in fns)
    passes = max(min_passes, math.ceil(min_run_time * len(fns) / pass_s))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns)
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collection inside one block would land on one function only
    try:
        for k in range(passes):
            for name in order if k % 2 == 0 else reversed(order):
                samples[name].append(_block(fns[name], number[name], device))
    finally:
        if gc_was_enabled:
            gc.enable()
    out = {}
    for name, times in samples.items():
        q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
        out[name] = {"median_s": statistics.median(times), "min_s": min(times), "iqr_s": q[2] - q[0],
                     "blocks": len(times), "calls_per_block": number[name], "per_block_s": times}
    return out


def _ready_steps(optimizer: str, impl: str, work: Workload, device: torch.device, stats: bool = False,
                 warmup: int = 3, seed: int = 0) -> dict[str, Callable[[], object]]:
    """``step`` of an optimizer on fresh random parameters with random gradients, its state
    created; with ``stats`` (lrfuse only), also a step of the same optimizer with
    ``track_stats=True``. The two share the tensors, so the flag is the only difference between
    them (a second copy of 2,000 small tensors sits at other addresses)."""
    opt = _build(optimizer, impl, _fresh_groups(work, device, seed))
    for _ in range(warmup):  # the first step creates the state
        opt.step()
    if not stats:
        return {impl: opt.step}

    def step(measured: bool) -> Callable[[], object]:
        def run():
            opt.track_stats = measured
            return opt.step()
        return run

    step(True)()  # the stats table
    return {impl: step(False), STATS: step(True)}


class BandwidthProbe:
    """Memory bandwidth in GB/s of a streaming update far larger than the caches.

    CPU: ``x.add_(y)`` reads x and y and writes x (12 bytes per element, no write-allocate
    traffic since x is read first), like the optimizer's in-place read+write of its state. It runs
    with one thread and with the run's thread count; the higher is the machine's bandwidth (on a
    small or shared machine one thread can already saturate memory, and a second one only
    contends). CUDA: a device-to-device copy (8 bytes per element).

    The buffers stay allocated, so the probe can run beside every row: on a shared machine (or a
    VM whose neighbours share the memory bus) the bandwidth drifts within minutes.
    """

    def __init__(self, device: torch.device, numel: int, threads: int) -> None:
        self.device, self.numel, self.threads = device, numel, threads
        self.x = torch.randn(numel, device=device)
        self.y = torch.randn(numel, device=device)
        if device.type == "cuda":
            self.fn, self.nbytes = (lambda: self.x.copy_(self.y)), 8 * numel
            self.how, self.counts = "x.copy_(y) device-to-device, 8 B/elem", [threads]
        else:
            self.fn, self.nbytes = (lambda: self.x.add_(self.y)), 12 * numel
            self.how, self.counts = "x.add_(y), read x,y write x, 12 B/elem", sorted({1, threads})
        for _ in range(3):
            self.fn()
        _sync(device)

    def measure(self, min_run_time: float) -> dict:
        per_threads = {}
        for n in self.counts:
            t = _median_time(self.fn, self.device, min_run_time, n)
            t.pop("times")
            per_threads[str(n)] = {"gbps": self.nbytes / t["median_s"] / 1e9, **t}
        best = max(per_threads, key=lambda n: per_threads[n]["gbps"])
        return {"gbps": per_threads[best]["gbps"], "threads": int(best), "how": self.how,
                "buffer_mb": 4 * self.numel / 2**20, "per_threads": per_threads}

    def close(self) -> None:
        del self.x, self.y, self.fn
        gc.collect()


def measure_bandwidth(device: torch.device, numel: int, min_run_time: float, threads: int) -> dict:
    """One measurement of :class:`BandwidthProbe`."""
    probe = BandwidthProbe(device, numel, threads)
    try:
        return probe.measure(min_run_time)
    finally:
        probe.close()


# ---------------------------------------------------------------------------------------------
# The machine.


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device, threads: int) -> dict:
    from lrfuse import ops

    info = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "cpu_isa": ops.cpu_isa(),
        "lrfuse_backend": ops.backend(device),
        "device": str(device),
        "loadavg_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# ---------------------------------------------------------------------------------------------
# The run.


@dataclass
class Row:
    workload: str
    optimizer: str
    num_params: int
    num_tensors: int
    num_groups: int
    bytes_per_param: int
    times: dict[str, dict] = field(default_factory=dict)  # impl -> {"median_s", "iqr_s", ...}
    bandwidth_gbps: float = 0.0  # the probe's median, timed in the row's own blocks

    def median(self, impl: str) -> float:
        return self.times[impl]["median_s"]

    def gbps(self, impl: str = "lrfuse") -> float:
        return self.num_params * self.bytes_per_param / self.median(impl) / 1e9

    def ratios(self) -> dict[str, float]:
        """torch time / lrfuse time for each torch impl, and against the fastest ("best")."""
        mine = self.median("lrfuse")
        out = {impl: t["median_s"] / mine for impl, t in self.times.items() if impl not in ("lrfuse", STATS)}
        out["best"] = min(out.values())
        return out

    def stats_cost(self) -> float | None:
        """How much longer a step with ``track_stats=True`` takes (0.03: 3%), if timed: the median
        over passes of its block's time over plain lrfuse's, timed next to it in the same pass
        (a pair shares the machine's state of the moment; medians taken apart do not)."""
        if STATS not in self.times:
            return None
        pairs = zip(self.times[STATS]["per_block_s"], self.times["lrfuse"]["per_block_s"])
        return statistics.median(mine / plain for mine, plain in pairs) - 1


def run(device: str = "cpu", workloads: Sequence[str] = WORKLOADS, optimizers: Sequence[str] = OPTIMIZERS,
        threads: int | None = None, min_run_time: float = 1.5, quick: bool = False,
        large_params: int | None = None, bandwidth_numel: int | None = None,
        log: Callable[[str], None] = print, stats: bool = False) -> dict:
    """Runs the benchmark; returns the JSON-able result (machine, bandwidth, rows).

    The implementations of a row (and the bandwidth probe) live side by side, each on its own
    copy of the same random parameters, and are timed by :func:`time_interleaved`: about
    ``min_run_time`` seconds each, in short alternating blocks, so drift on a shared machine hits
    them alike. The row's bandwidth is the probe's median from the same blocks. ``stats`` adds
    plain lrfuse's optimizer stepping with ``track_stats=True`` (the same tensors) to the row (its
    cost: ``stats_cost`` in each row).
    """
    with torch_threads(threads) as threads:  # the caller's thread count comes back afterwards
        return _run(torch.device(device), workloads, optimizers, threads, min_run_time, quick, large_params,
                    bandwidth_numel, log, stats)


def _run(dev: torch.device, workloads: Sequence[str], optimizers: Sequence[str], threads: int, min_run_time: float,
         quick: bool, large_params: int | None, bandwidth_numel: int | None, log: Callable[[str], None],
         stats: bool = False) -> dict:
    info = machine_info(dev, threads)
    log(f"# {info['cpu_model']}, {info['cpu_count']} CPUs, {threads} threads, isa {info['cpu_isa']}, "
        f"torch {info['torch']}, device {dev}" + (f" ({info['gpu']})" if "gpu" in info else ""))
    numel = bandwidth_numel or ((1 << 22) if quick else (1 << 28 if dev.type == "cuda" else 1 << 26))
    probe = BandwidthProbe(dev, numel, threads)
    bw_before = probe.measure(min_run_time / 3)
    log(f"# bandwidth (before): {bw_before['gbps']:.1f} GB/s with {bw_before['threads']} thread(s)  "
        f"[{bw_before['how']}, {bw_before['buffer_mb']:.0f} MB buffers; by threads: "
        + ", ".join(f"{n}: {v['gbps']:.1f}" for n, v in bw_before["per_threads"].items()) + "]")

    rows: list[Row] = []
    for wname in workloads:
        work = make_workload(wname, quick, large_params if wname == "large" else None)
        for oname in optimizers:
            if oname not in OPTIMIZERS:
                raise ValueError(f"unknown optimizer {oname!r}; choose from {', '.join(OPTIMIZERS)}")
            row = Row(wname, oname, work.num_params, work.num_tensors, len(work.groups),
                      BENCHED[oname].bytes_per_param)
            fns = {name: fn for impl in _impls_for(oname, dev)
                   for name, fn in _ready_steps(oname, impl, work, dev, stats and impl == "lrfuse").items()}
            timed = time_interleaved({**fns, "bandwidth": probe.fn}, dev, min_run_time)
            row.bandwidth_gbps = probe.nbytes / timed.pop("bandwidth")["median_s"] / 1e9
            row.times = timed
            del fns
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            rows.append(row)
            log(_format_row(row))

    bw_after = probe.measure(min_run_time / 3)
    probe.close()
    log(f"# bandwidth (after): {bw_after['gbps']:.1f} GB/s with {bw_after['threads']} thread(s)")
    bw = max([bw_before["gbps"], bw_after["gbps"]] + [row.bandwidth_gbps for row in rows])
    info["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    result = {
        "machine": info,
        "settings": {"min_run_time": min_run_time, "quick": quick,
                     "large_params": large_params, "stats": stats},
        "bandwidth": {"gbps": bw, "before": bw_before, "after": bw_after},
        "rows": [],
    }
    for row in rows:
        entry = asdict(row)
        entry["gbps"] = {impl: row.gbps(impl) for impl in row.times}
        # Against the bandwidth measured beside this row: the fraction compares like with like.
        entry["bandwidth_fraction"] = {impl: row.gbps(impl) / row.bandwidth_gbps for impl in row.times}
        entry["ratios"] = row.ratios()
        if stats:
            entry["stats_cost"] = row.stats_cost()
        result["rows"].append(entry)
    return result


# ---------------------------------------------------------------------------------------------
# Output.


def _fmt_time(s: float) -> str:
    return f"{s * 1e3:9.3f}" if s >= 1e-4 else f"{s * 1e6:7.1f}us"


def _format_row(row: Row) -> str:
    parts = [f"{row.workload:12s} {row.optimizer:13s}"]
    for impl in ("lrfuse", "forloop", "foreach", "fused"):
        parts.append(_fmt_time(row.median(impl)) if impl in row.times else f"{'-':>9s}")
    r = row.ratios()
    parts.append(f"{row.gbps():7.1f} {row.bandwidth_gbps:6.1f} {100 * row.gbps() / row.bandwidth_gbps:4.0f}%")
    for impl in ("forloop", "foreach", "fused", "best"):
        parts.append(f"{r[impl]:6.2f}x" if impl in r else f"{'-':>7s}")
    if row.stats_cost() is not None:
        parts.append(f"  stats {100 * row.stats_cost():+.1f}%")
    return " ".join(parts)


HEADER = (f"{'workload':12s} {'optimizer':13s} {'lrfuse ms':>9s} {'forloop':>9s} {'foreach':>9s} {'fused':>9s} "
          f"{'GB/s':>7s} {'BW':>6s} {'%BW':>5s} {'xloop':>7s} {'xforech':>7s} {'xfused':>7s} {'xbest':>7s}")


def format_table(result: dict) -> str:
    """A markdown table of a result (times in ms, ratios = torch time / lrfuse time)."""
    m, bw = result["machine"], result["bandwidth"]["gbps"]
    lines = [
        f"Machine: {m['cpu_model']} ({m['cpu_count']} CPUs, {m['threads']} threads, kernel variant {m['cpu_isa']}), "
        f"torch {m['torch']}, device {m['device']}" + (f" ({m['gpu']})" if "gpu" in m else "") +
        f"; best measured bandwidth {bw:.1f} GB/s ({result['bandwidth']['before']['how']}; `BW` is the "
        f"probe's median in the row's own alternating blocks, `% of BW` is against it); "
        f"load average at start {m.get('loadavg_start')}, at end {m.get('loadavg_end')}.",
        "",
        "| workload | optimizer | lrfuse ms | for-loop ms | foreach ms | fused ms | lrfuse GB/s | BW GB/s "
        "| % of BW | vs for-loop | vs foreach | vs fused | vs best |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for e in result["rows"]:
        t = {k: v["median_s"] * 1e3 for k, v in e["times"].items()}
        r = e["ratios"]
        cell = lambda d, k, f: (f % d[k]) if k in d else "-"  # noqa: E731
        lines.append(
            f"| {e['workload']} | {e['optimizer']} | {t['lrfuse']:.3f} | {cell(t, 'forloop', '%.3f')} | "
            f"{cell(t, 'foreach', '%.3f')} | {cell(t, 'fused', '%.3f')} | {e['gbps']['lrfuse']:.1f} | "
            f"{e['bandwidth_gbps']:.1f} | "
            f"{100 * e['bandwidth_fraction']['lrfuse']:.0f}% | {cell(r, 'forloop', '%.2fx')} | "
            f"{cell(r, 'foreach', '%.2fx')} | {cell(r, 'fused', '%.2fx')} | {r['best']:.2f}x |")
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    """Bar chart of torch time / lrfuse time per workload, one panel per optimizer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    optimizers = list(dict.fromkeys(e["optimizer"] for e in result["rows"]))
    fig, axes = plt.subplots(1, len(optimizers), figsize=(5 * len(optimizers), 4), squeeze=False)
    for ax, oname in zip(axes[0], optimizers):
        rows = [e for e in result["rows"] if e["optimizer"] == oname]
        impls = [i for i in ("forloop", "foreach", "fused") if any(i in e["ratios"] for e in rows)]
        width = 0.8 / max(1, len(impls))
        for k, impl in enumerate(impls):
            xs = [i + k * width for i in range(len(rows))]
            ax.bar(xs, [e["ratios"].get(impl, 0.0) for e in rows], width, label=f"vs torch {impl}")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks([i + width * (len(impls) - 1) / 2 for i in range(len(rows))])
        ax.set_xticklabels([e["workload"] for e in rows], rotation=30, ha="right")
        ax.set_yscale("log")
        ax.set_ylabel("speed-up (torch time / lrfuse time)")
        ax.set_title(oname)
        ax.legend(fontsize=8)
    m = result["machine"]
    fig.suptitle(f"{m['cpu_model']}, {m['threads']} threads, {m['device']}, torch {m['torch']}", fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Programmatic comparison.


def compare_step_time(params: list[torch.Tensor], steps: int = 20, warmup: int = 3, lr: float = _BASE_LR,
                      ) -> dict[str, float]:
    """Median seconds per step of FusedAdam and torch's Adam paths on copies of ``params``.

    Each implementation gets its own copies of the parameters with the same random gradients;
    ``params`` themselves are not touched. Keys: ``"lrfuse.FusedAdam"``,
    ``"torch.optim.Adam(foreach=False)"``, ``"torch.optim.Adam(foreach=True)"`` and, where torch
    supports it for these tensors, ``"torch.optim.Adam(fused=True)"``.

    Examples:
        >>> times = compare_step_time(list(model.parameters()))
        >>> times["torch.optim.Adam(fused=True)"] / times["lrfuse.FusedAdam"]  # speed-up
    """
    import lrfuse

    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    sources = [p.detach() for p in params]
    gen = torch.Generator(device="cpu").manual_seed(0)
    grads = [torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.device, p.dtype) for p in sources]
    candidates: dict[str, Callable[[list], torch.optim.Optimizer]] = {
        "lrfuse.FusedAdam": lambda ps: lrfuse.FusedAdam(ps, lr=lr),
        "torch.optim.Adam(foreach=False)": lambda ps: torch.optim.Adam(ps, lr=lr, foreach=False),
        "torch.optim.Adam(foreach=True)": lambda ps: torch.optim.Adam(ps, lr=lr, foreach=True),
        "torch.optim.Adam(fused=True)": lambda ps: torch.optim.Adam(ps, lr=lr, fused=True),
    }
    out: dict[str, float] = {}
    for name, build in candidates.items():
        copies = []
        for p, g in zip(sources, grads):
            c = p.clone().requires_grad_()
            c.grad = g.clone()
            copies.append(c)
        try:
            opt = build(copies)
        except (RuntimeError, ValueError):  # torch's fused Adam refuses some devices/dtypes
            continue
        for _ in range(warmup):
            opt.step()
        devices = {c.device for c in copies}
        times = []
        for _ in range(steps):
            for d in devices:
                _sync(d)
            start = time.perf_counter()
            opt.step()
            for d in devices:
                _sync(d)
            times.append(time.perf_counter() - start)
        out[name] = statistics.median(times)
        del opt, copies
    return out


# ---------------------------------------------------------------------------------------------
# Command line.


def _list(value: str, allowed: Sequence[str], what: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(bad)}; choose from {', '.join(allowed)}")
    return items


def build_parser(prog: str = "lrfuse bench") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--workloads", type=lambda v: _list(v, WORKLOADS, "workload"), default=list(WORKLOADS),
                   help=f"comma-separated, from {','.join(WORKLOADS)} (default: all)")
    p.add_argument("--optimizers", type=lambda v: _list(v, OPTIMIZERS, "optimizer"), default=list(OPTIMIZERS),
                   help=f"comma-separated, from {','.join(OPTIMIZERS)} (default: all)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--min-run-time", type=float, default=None,
                   help="seconds of timing per implementation and row, in alternating blocks "
                        "(default 1.5, 0.02 with --quick)")
    p.add_argument("--large-params", type=lambda v: int(float(v)), default=None,
                   help="parameters of the `large` workload (default 16,777,216; e.g. 1e9 on a GPU)")
    p.add_argument("--bandwidth-numel", type=lambda v: int(float(v)), default=None,
                   help="elements of each bandwidth buffer (default 2^26 on CPU, 2^28 on CUDA)")
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke test, not a measurement")
    p.add_argument("--stats", action="store_true",
                   help="also time lrfuse with track_stats=True (per-group norms from the kernel) and print its cost")
    p.add_argument("--json", metavar="PATH", help="write the full result as JSON")
    p.add_argument("--plot", metavar="PATH", help="write a PNG of the speed-ups (needs matplotlib)")
    return p


def main(argv: list[str] | None = None) -> int:
    """``lrfuse bench``: runs the benchmark, prints the table, writes JSON / plot when asked."""
    args = build_parser().parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("lrfuse bench: --device cuda but torch sees no CUDA device; run with --device cpu", file=sys.stderr)
        return 2
    min_run_time = args.min_run_time if args.min_run_time is not None else (0.02 if args.quick else 1.5)
    print(HEADER)
    result = run(args.device, args.workloads, args.optimizers, args.threads, min_run_time, args.quick,
                 args.large_params, args.bandwidth_numel, stats=args.stats)
    print()
    print(format_table(result))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"\nwrote {args.json}")
    if args.plot:
        try:
            plot(result, args.plot)
        except ImportError as error:
            print(f"no plot: {error} (pip install matplotlib)", file=sys.stderr)
        else:
            print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
