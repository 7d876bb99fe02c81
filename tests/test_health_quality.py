"""benchmarks/health_quality.py: its --smoke mode runs a real Trainer at every LR class, and what
it records can be judged again (--replay) with the same verdicts as the live monitor gave."""

import json

import pytest

from benchmark_scripts import load_benchmark

pytest.importorskip("lightning")
pytest.importorskip("sklearn")


def test_smoke_mode_judges_every_lr_class_and_replays_the_live_verdicts(tmp_path, capsys):
    hq = load_benchmark("health_quality")
    out = tmp_path / "hq.json"
    assert hq.main(["--smoke", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    runs = result["runs"]
    assert [r["lr_class"] for r in runs] == list(hq.LR_CLASSES)
    (ref,) = result["references"]
    assert ref["best_lr"] == max(zip(ref["scores"], ref["grid"]))[1]
    for r in runs:
        assert r["lr"] == pytest.approx(ref["best_lr"] * hq.LR_CLASSES[r["lr_class"]])
        assert set(r["groups"]) == {"FusedSGD/body", "FusedSGD/head"}
        assert len(r["losses"]) == len(r["check_steps"]) > 0
        for g in r["groups"].values():
            assert len(g["history"]) == len(g["ratios"]) == len(r["losses"])
            assert g["history"][-1] == g["verdict"]
            assert g["opposite"] == (g["verdict"] in hq.OPPOSITE[r["lr_class"]])
        # The recorded inputs, judged again by the default rules, give the live verdicts at every check.
        assert hq.replay(r, {}) == {k: g["history"] for k, g in r["groups"].items()}
    # The floor a broken monitor would miss: far too low and far too high are judged right.
    verdicts = {r["lr_class"]: {g["verdict"] for g in r["groups"].values()} for r in runs}
    assert verdicts["far_low"] == {"too_low"} and verdicts["far_high"] == {"too_high"}
    s = result["summary"]
    assert s["pooled"]["judged"] == 2 * len(hq.EXPECTED) and s["pooled"]["verdicts"] == 2 * len(hq.LR_CLASSES)
    printed = capsys.readouterr().out
    assert "| all |" in printed and "| far_high (x1000) |" in printed


def test_unknown_task_is_rejected():
    with pytest.raises(SystemExit):
        load_benchmark("health_quality").main(["--split", "mnist"])
