"""Smoke test of the benchmark harness: it runs and reports every workload and optimizer.

Timings never decide pass/fail; only the shape of the report is checked.
"""

import json

import pytest
import torch

from lrfuse import benchmark
from benchmark_scripts import load_benchmark


def test_quick_run_reports_every_workload_and_optimizer(tmp_path, capsys):
    out = tmp_path / "bench.json"
    torch.set_num_threads(3)  # the caller's count, which --threads 1 must leave as it was
    rc = benchmark.main(["--quick", "--threads", "1", "--min-run-time", "0.002", "--bandwidth-numel", "65536",
                         "--json", str(out)])
    assert rc == 0
    assert torch.get_num_threads() == 3
    result = json.loads(out.read_text())
    assert result["machine"]["threads"] == 1
    seen = {(e["workload"], e["optimizer"]) for e in result["rows"]}
    assert seen == {(w, o) for w in benchmark.WORKLOADS for o in benchmark.OPTIMIZERS}
    for e in result["rows"]:
        impls = set(e["times"])
        assert {"lrfuse", "forloop", "foreach"} <= impls
        assert ("fused" in impls) == ("cpu" in benchmark.BENCHED[e["optimizer"]].fused_on)
        assert all(t["median_s"] > 0 for t in e["times"].values())
        assert set(e["ratios"]) == (impls - {"lrfuse"}) | {"best"}
    assert result["bandwidth"]["gbps"] > 0
    assert result["machine"]["cpu_isa"]
    assert "| workload |" in capsys.readouterr().out


def test_stats_rows_time_the_measured_step_beside_the_plain_one(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert benchmark.main(["--quick", "--stats", "--workloads", "tiny", "--optimizers", "FusedSGD", "--threads", "1",
                           "--min-run-time", "0.002", "--bandwidth-numel", "65536", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    plain, measured = row["times"]["lrfuse"], row["times"][benchmark.STATS]
    assert len(plain["per_block_s"]) == len(measured["per_block_s"]) == plain["blocks"]
    assert row["stats_cost"] > -1 and benchmark.STATS not in row["ratios"]
    assert "stats " in capsys.readouterr().out


def test_stats_cost_pairs_the_blocks_of_one_pass():
    # The machine slows 3x halfway; each pass's stats block is 10% over the plain one beside it.
    plain = [1.0] * 5 + [3.0] * 6
    row = benchmark.Row("tiny", "FusedAdam", 1, 1, 1, 28, times={
        "lrfuse": {"median_s": 3.0, "per_block_s": plain},
        benchmark.STATS: {"median_s": 3.3, "per_block_s": [1.1 * t for t in plain]}})
    assert row.stats_cost() == pytest.approx(0.10)
    row.times.pop(benchmark.STATS)
    assert row.stats_cost() is None


def test_unknown_workload_is_rejected():
    with pytest.raises(SystemExit):
        benchmark.main(["--workloads", "huge"])


def test_workload_sizes_match_the_design():
    assert benchmark.make_workload("large").num_params == 16_777_216
    many = benchmark.make_workload("many_groups")
    assert (many.num_tensors, len(many.groups)) == (2000, 200)
    assert len({lr for lr, _ in many.groups}) == 200
    assert benchmark.make_workload("resnet_like").num_tensors == 161
    assert benchmark.make_workload("tiny").num_params == 784 * 256 + 256 + 256 * 128 + 128 + 128 * 10 + 10
    llrd = benchmark.make_workload("llrd")
    assert len(llrd.groups) == 13 and llrd.num_tensors == 2 + 12 * 12


def test_compare_step_time_leaves_params_alone():
    params = [torch.randn(64, 32), torch.randn(32)]
    before = [p.clone() for p in params]
    times = benchmark.compare_step_time(params, steps=2)
    assert {"lrfuse.FusedAdam", "torch.optim.Adam(foreach=False)", "torch.optim.Adam(foreach=True)"} <= set(times)
    assert all(t > 0 for t in times.values())
    assert all(torch.equal(a, b) for a, b in zip(params, before))


def test_amp_benchmark_reports_every_path(tmp_path):
    """benchmarks/bench_amp.py (not a package module): every GradScaler path of a workload timed."""
    bench_amp = load_benchmark("bench_amp")
    out = tmp_path / "amp.json"
    assert bench_amp.main(["--quick", "--workloads", "tiny", "--json", str(out)]) == 0
    row = json.loads(out.read_text())["rows"]["tiny"]
    assert set(row) == {"lrfuse in-kernel", "lrfuse unscale_", "torch foreach", "torch fused", "restore"}
    assert all(v["median_s"] > 0 for v in row.values())


def test_health_benchmark_times_every_configuration(tmp_path):
    """benchmarks/bench_health.py: LRHealthMonitor's cost in real fits, every configuration of each model."""
    bench_health = load_benchmark("bench_health")
    out = tmp_path / "health.json"
    assert bench_health.main(["--quick", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert set(rows) == {"demo", "mlp_256"}
    for row in rows.values():
        assert row["params"] > 0 and row["none"]["vs_none"] == 1.0
        assert all(row[c]["step_ms"] > 0 for c in bench_health.CONFIGS)
