"""Smoke test of benchmarks/health_quality.py (issue 11): its --smoke mode runs and reports every LR class.

Only the shape of the report is checked (and that every verdict is one of the three); the share of
right verdicts never decides pass/fail here.
"""

import json

import pytest

from benchmark_scripts import load_benchmark

pytest.importorskip("lightning")
pytest.importorskip("sklearn")


def test_smoke_mode_reports_every_lr_class(tmp_path, capsys):
    hq = load_benchmark("health_quality")
    out = tmp_path / "hq.json"
    assert hq.main(["--smoke", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    runs = result["runs"]
    assert [(r["dataset"], r["seed"], r["lr_class"], r["lr"]) for r in runs] == [("digits", 0, c, lr) for c, lr in hq.RUNS]
    assert set(hq.CLASSES) == {c for c, _ in hq.RUNS}
    assert set(hq.EXPECTED.values()) == set(hq.VERDICTS) == {"ok", "too_high", "too_low"}
    for r in runs:
        assert set(r["groups"]) == {"FusedAdam/body", "FusedAdam/head"}
        for g in r["groups"].values():
            assert g["verdict"] in hq.VERDICTS and set(g["history"]) <= set(hq.VERDICTS)
            assert g["history"][-1] == g["verdict"]
            assert g["correct"] == (g["verdict"] == hq.EXPECTED[r["lr_class"]])
            assert g["opposite"] == (g["verdict"] == hq.OPPOSITE[r["lr_class"]])
            assert g["opposite_any"] == (hq.OPPOSITE[r["lr_class"]] in g["history"]) and g["opposite_any"] >= g["opposite"]
            assert 0 < g["steps_to_verdict"] <= r["steps"]
    s = result["summary"]
    assert set(s["by_lr_class"]) == set(hq.CLASSES) and set(s["by_dataset"]) == {"digits"}
    assert set(s["by_lr"]) == {f"{lr:g}" for _, lr in hq.RUNS}
    n = 2 * len(hq.RUNS)
    assert s["pooled"]["verdicts"] == n and sum(s["pooled"]["counts"].values()) == n
    assert s["pooled"]["correct"] == sum(g["correct"] for r in runs for g in r["groups"].values())
    assert 0.0 <= s["pooled"]["share_correct"] <= 1.0 and s["pooled"]["opposite"] >= 0
    assert set(s["targets"]) == {"correct", "opposite"}
    printed = capsys.readouterr().out
    assert "| all |" in printed and all(f"| {c} |" in printed for c in hq.CLASSES)


def test_unknown_dataset_is_rejected():
    with pytest.raises(SystemExit):
        load_benchmark("health_quality").main(["--datasets", "mnist"])
