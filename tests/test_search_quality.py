"""Smoke test of benchmarks/search_quality.py (issue 12): its --smoke mode runs every method on Ray Tune.

Only the shape of the report is checked; scores never decide pass/fail.
"""

import importlib.util
import json
import math

import pytest

from benchmark_scripts import load_benchmark

pytest.importorskip("lightning")
pytest.importorskip("sklearn")
if importlib.util.find_spec("ray") is None:
    pytest.skip('Ray Tune is not installed (pip install "ray[tune]>=2.60")', allow_module_level=True)


def test_smoke_mode_reports_every_method(tmp_path, capsys):
    sq = load_benchmark("search_quality")
    out = tmp_path / "sq.json"
    assert sq.main(["--smoke", "--json", str(out), "--storage", str(tmp_path / "ray")]) == 0
    result = json.loads(out.read_text())
    (r,) = result["results"]
    assert r["dataset"] == "digits" and r["budget"] == 20
    assert set(r["methods"]) == set(sq.METHODS)
    grid = r["methods"]["grid"]
    assert len(grid["trials"]) == 2 and r["grid_best"]["value"] == max(t["value"] for t in grid["trials"])
    for m, e in r["methods"].items():
        assert math.isclose(e["gap"], r["grid_best"]["value"] - e["value"])
        assert e["steps"] >= r["budget"] and e["seconds"] > 0
    assert r["methods"]["finder"]["steps"] == r["finder"]["steps"] + 20
    printed = capsys.readouterr().out
    assert "| digits (seed 0) | race |" in printed and "| digits (seed 0) | grid |" in printed
    assert result["summary"] in printed and "| grid | 1 | 0.00 | 0.00 | 1/1 |" in result["summary"]
    # --render prints the same tables from the saved JSON, without training
    assert sq.main(["--render", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"{result['summary']}\n\n{result['table']}"


def test_unknown_dataset_is_rejected():
    with pytest.raises(SystemExit):
        load_benchmark("search_quality").main(["--datasets", "mnist"])
