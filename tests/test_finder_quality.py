"""Smoke test of benchmarks/finder_quality.py (issue 11): its --smoke mode runs and reports every method.

Only the shape of the report is checked (and that two runs agree); scores never decide pass/fail.
"""

import json
import math

import pytest

from benchmark_scripts import load_benchmark

pytest.importorskip("lightning")
pytest.importorskip("sklearn")


def test_smoke_mode_reports_every_method_and_protocol(tmp_path, capsys):
    fq = load_benchmark("finder_quality")
    out = tmp_path / "fq.json"
    assert fq.main(["--smoke", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    (case,) = result["cases"]
    assert case["dataset"] == "digits" and case["seed"] == 0
    assert set(case["suggested"]) == set(case["protocols"]) == set(fq.PROTOCOLS)
    assert all(set(s) == set(fq.METHODS) for s in case["suggested"].values())
    assert set(fq.PROTOCOLS) == {"constant", "warmup_cosine", "onecycle"}
    # No schedule under the constant protocol: the schedule-aware default is the plain suggestion there,
    # and the peaks of warm-up + cosine and of one-cycle (mean factors below 1) lie above it.
    constant = case["suggested"]["constant"]
    assert constant["lrfuse:auto+schedule"] == constant["lrfuse:auto"]
    for p in ("warmup_cosine", "onecycle"):
        aware = case["suggested"][p]
        assert aware["lrfuse:auto"] == constant["lrfuse:auto"]
        assert aware["lrfuse:auto"] < aware["lrfuse:auto+schedule"] <= aware["lrfuse:auto+schedule-nocap"]
    for p in case["protocols"].values():
        assert len(p["grid"]) == 4
        assert p["best_score"] == max(s for _, s in p["grid"])
        for m, r in p["methods"].items():
            assert math.isclose(r["gap"], p["best_score"] - r["score"])
            assert r["failure"] in (None, "none", "collapse")
    for m in fq.METHODS:
        s = result["summary"]["pooled"][m]
        assert s["cases"] == len(fq.PROTOCOLS)
        assert 0 < s["cost"] < s["cost_total"]
        assert set(s["targets"]) == set(fq.TARGETS)
    assert set(result["summary"]["by_dataset"]) == {"digits"}
    assert set(result["summary"]["by_protocol"]) == set(fq.PROTOCOLS)
    assert set(result["summary"]["by_dataset_protocol"]["digits"]) == set(fq.PROTOCOLS)
    printed = capsys.readouterr().out
    assert "| all | lrfuse:auto |" in printed and "| digits | lightning |" in printed
    assert all(f"| {p} | lrfuse:auto+schedule |" in printed for p in fq.PROTOCOLS)
    assert all(f"| digits | {p} |" in printed for p in fq.PROTOCOLS)  # the grid best LR per seed table

    # Deterministic given the seed: a second run gives the same suggestions and scores.
    again = tmp_path / "again.json"
    assert fq.main(["--smoke", "--json", str(again)]) == 0
    second = json.loads(again.read_text())["cases"][0]
    assert second["suggested"] == case["suggested"]
    assert second["protocols"] == case["protocols"]

    # Runs made side by side (one per dataset) are reported together.
    merged = tmp_path / "merged.json"
    assert fq.main(["--merge", str(out), str(again), "--json", str(merged)]) == 0
    both = json.loads(merged.read_text())
    assert len(both["cases"]) == 2 and both["summary"]["pooled"]["lrfuse:auto"]["cases"] == 2 * len(fq.PROTOCOLS)
    assert both["meta"]["protocols"] == list(fq.PROTOCOLS)


def test_unknown_dataset_is_rejected():
    with pytest.raises(SystemExit):
        load_benchmark("finder_quality").main(["--datasets", "mnist"])
