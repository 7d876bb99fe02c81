"""benchmarks/finder_quality.py: its --smoke mode runs the real finders on one small task and reports
every method and protocol, the same twice; and the task split it judges on stays what it was."""

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
    assert (case["task"], case["seed"], case["steps"]) == ("iris", 0, 100)
    assert set(case["suggested"]) == set(case["protocols"]) == set(fq.PROTOCOLS)
    for protocol, p in case["protocols"].items():
        suggested = case["suggested"][protocol]
        assert set(suggested) == set(p["methods"]) == set(fq.METHODS)
        assert len(p["grid"]) == 4 and p["best_score"] == max(s for _, s in p["grid"])
        for m, r in p["methods"].items():
            assert math.isclose(r["gap"], p["best_score"] - r["score"]) and r["lr"] == suggested[m]
        # The floor a broken finder would miss: the race suggests, not far from the grid's best.
        race = p["methods"]["lrfuse:race"]
        assert race["failure"] is None and race["gap"] <= 5.0
        assert 1e-2 < race["lr"] / p["best_lr"] < 1e2
        steps = case["finder_steps"][protocol]
        assert steps["lrfuse:race"] == steps["lrfuse:curve"] + 4 * 20  # 4 candidates, a fifth of 100 steps
    # The curve's own pick differs between the protocols (a schedule's peak lies above the constant LR).
    assert case["suggested"]["warmup_cosine"]["lrfuse:curve"] > case["suggested"]["constant"]["lrfuse:curve"]
    for m in fq.METHODS:
        s = result["summary"]["pooled"][m]
        assert s["cases"] == len(fq.PROTOCOLS) and 0 < s["cost"] < 1 and set(s["targets"]) == set(fq.TARGETS)
    printed = capsys.readouterr().out
    assert "| all | lrfuse:race |" in printed and "| iris | rmsprop | constant |" in printed

    # Deterministic given the seed: a second run gives the same suggestions and scores.
    again = tmp_path / "again.json"
    assert fq.main(["--smoke", "--json", str(again)]) == 0
    second = json.loads(again.read_text())["cases"][0]
    assert second["suggested"] == case["suggested"] and second["protocols"] == case["protocols"]

    merged = tmp_path / "merged.json"
    assert fq.main(["--merge", str(out), str(again), "--json", str(merged)]) == 0
    assert json.loads(merged.read_text())["summary"]["pooled"]["lrfuse:race"]["cases"] == 2 * len(fq.PROTOCOLS)


def test_the_split_is_the_one_fixed_before_any_rule():
    tasks = load_benchmark("tasks")
    assert tasks.SPLITS["evaluation"] == ["diabetes", "friedman2", "breast_cancer", "circles", "wine", "class50",
                                          "digits_dropout", "digits_cnn_rmsprop", "seq_transformer", "regression_sgd"]
    assert len(tasks.SPLITS["tuning"]) == 13 and not set(tasks.SPLITS["tuning"]) & set(tasks.SPLITS["evaluation"])
    for name, task in tasks.TASKS.items():
        assert task.name == name and task.optimizer in tasks.OPTIMIZERS and 5 <= task.epochs <= 50


def test_unknown_task_is_rejected():
    with pytest.raises(SystemExit):
        load_benchmark("finder_quality").main(["--split", "mnist"])
