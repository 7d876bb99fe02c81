"""The range test's pure logic on synthetic curves with known answers."""

import math

import numpy as np
import pytest

from lrfuse.lr_range import LRRangeResult, lr_values, race_candidates, race_pick, range_test, smooth, suggest


def sigmoid_curve(lr, centre=1e-3, cliff=0.3):
    """Falls fastest (per unit of log lr) exactly at ``centre``; explodes past ``cliff``."""
    return 1.0 - math.tanh(math.log10(lr / centre)) + (100.0 if lr > cliff else 0.0)


def test_lr_values():
    assert lr_values(1e-6, 1.0, 7).tolist() == pytest.approx([1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0])
    assert lr_values(0.1, 1.0, 10, "linear")[1] == pytest.approx(0.2)
    with pytest.raises(ValueError, match="min_lr < max_lr"):
        lr_values(1.0, 0.1, 10)


def test_smoothing_has_no_lag():
    lrs = lr_values(1e-6, 1.0, 101)
    x = np.log(lrs)
    line = 3.0 - 0.5 * x
    ys, dy = smooth(lrs, line)
    assert np.allclose(ys, line) and np.allclose(dy, -0.5)  # a linear trend passes unchanged, ends included
    bump = np.exp(-0.5 * ((np.arange(101) - 50) / 6.0) ** 2)
    ys, _ = smooth(lrs, bump)
    assert int(np.argmax(ys)) == 50  # centred: the peak does not move (a trailing EMA shifts it right)


def test_steepest_descent_at_known_lr():
    result = range_test(sigmoid_curve, min_lr=1e-6, max_lr=1.0, num_steps=100)
    assert result.stopped == "diverged"
    steep = result.suggest("steepest")
    assert steep.lr == pytest.approx(1e-3, rel=0.15)
    assert result.lr is not None and result.low <= result.lr <= result.high
    assert steep.lr < result.lr  # auto sits between the steepest descent and the minimum


def test_noisy_curve_still_finds_the_descent():
    rng = np.random.default_rng(0)
    result = range_test(lambda lr: sigmoid_curve(lr) + 0.1 * rng.standard_normal(), 1e-6, 1.0, 100)
    assert result.ok
    assert 1e-3 / 3 < result.suggest("steepest").lr < 1e-3 * 3
    assert 1e-4 < result.lr < 1e-1


def test_flat_curve_gives_a_reason_not_a_crash():
    rng = np.random.default_rng(1)
    result = range_test(lambda lr: 2.3 + 0.01 * rng.standard_normal(), 1e-6, 1.0, 100)
    assert result.lr is None and result.low is None
    assert "did not fall" in result.reason and "flat" in result.reason
    assert "no LR suggestion" in result.summary()


def test_diverges_at_step_3():
    losses = iter([1.0, 0.9, 0.8, 50.0] + [1e6] * 100)
    result = range_test(lambda lr: next(losses), 1e-6, 1.0, 100)
    assert result.stopped == "diverged" and len(result.lrs) == 4
    assert result.lr is None and "only 4 usable points" in result.reason


def test_nan_stops_immediately():
    losses = iter([1.0, 0.5, math.nan, 0.1])
    result = range_test(lambda lr: next(losses), 1e-6, 1.0, 100)
    assert result.stopped == "non-finite loss" and len(result.lrs) == 3 and result.lr is None


@pytest.mark.parametrize("lrs, losses", [([], []), ([1e-3], [1.0]), ([1e-3, 1e-2], [1.0, math.inf])])
def test_short_curves(lrs, losses):
    result = suggest(lrs, losses)
    assert isinstance(result, LRRangeResult) and result.lr is None and result.reason


@pytest.mark.parametrize("method", ["steepest", "valley", "min10", "auto"])
def test_every_method_suggests_inside_the_range(method):
    lrs = lr_values(1e-6, 1.0, 80).tolist()
    result = suggest(lrs, [sigmoid_curve(lr) for lr in lrs], method=method)
    assert result.ok and result.method == method
    assert result.low <= result.lr <= result.high and lrs[0] <= result.lr <= lrs[-1]
    assert result.candidates[method if method != "auto" else "steepest"] is not None


def test_stop_decision_is_the_shared_one():
    seen = []
    # Another process diverged at the 10th step: this one stops too, and says why.
    result = range_test(lambda lr: 1.0, 1e-6, 1.0, 50, should_stop=lambda stop: seen.append(stop) or len(seen) >= 10)
    assert len(result.lrs) == 10 and result.stopped == "diverged on another process"


def test_errors():
    with pytest.raises(ValueError, match="method must be one of"):
        suggest([1.0], [1.0], method="best")
    with pytest.raises(ValueError, match="diverge_factor"):
        range_test(lambda lr: 1.0, diverge_factor=1.0)


def test_plot_to_file(tmp_path):
    pytest.importorskip("matplotlib")
    result = range_test(sigmoid_curve, 1e-6, 1.0, 60)
    path = tmp_path / "lr.png"
    fig = result.plot(str(path))
    assert path.stat().st_size > 1000
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert "loss (raw)" in labels and "plausible range" in labels
    assert f"suggested {result.lr:.2g} ({result.method})" in labels
    empty = tmp_path / "empty.png"
    fig = suggest([], []).plot(str(empty))  # no suggestion: still a plot, whose title says why
    assert empty.stat().st_size > 1000
    assert "no LR suggestion" in fig.axes[0].get_title()


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_lr=math.inf), "max_lr must be a finite number > 0, got inf; pass e.g. max_lr=1.0"),
    (dict(min_lr=math.nan), "min_lr must be a finite number > 0"),
    (dict(bandwidth=-1), r"bandwidth must be in \(0, 0.5\]"),
    (dict(bandwidth=5), r"bandwidth must be in \(0, 0.5\]"),
    (dict(num_steps=2.5), "num_steps must be an integer >= 2"),
    (dict(schedule_mean=0.0), r"schedule_mean must be in \(0, 1\]"),
])
def test_bad_arguments_name_the_argument_and_the_fix(kwargs, match):
    with pytest.raises(ValueError, match="range_test: " + match):
        range_test(sigmoid_curve, **kwargs)


def test_schedule_mean_makes_the_suggestion_the_peak():
    lrs = lr_values(1e-6, 1.0, 100)
    losses = [sigmoid_curve(lr) for lr in lrs]
    constant = suggest(lrs, losses)
    assert constant.schedule_mean == 1.0 and constant.constant_lr == constant.lr
    # Warm-up + cosine averages half its peak: the peak with the same summed LR is twice the constant pick.
    half = suggest(lrs, losses, schedule_mean=0.5)
    assert half.constant_lr == constant.lr and half.lr == pytest.approx(2 * constant.lr)
    assert half.low <= half.lr <= half.high and "peak" in half.summary()
    assert half.suggest("auto").lr == half.lr  # another look at the curve keeps the schedule
    assert half.suggest("auto", schedule_mean=1.0).lr == constant.lr
    # A schedule far below its peak on average is capped where the smoothed loss stopped falling.
    tiny = suggest(lrs, losses, schedule_mean=1e-4)
    assert tiny.lr == pytest.approx(lrs[int(np.argmin(tiny.smoothed))])
    assert tiny.lr < constant.lr / 1e-4


# The race's pure part (issue 19).

def test_race_candidates_span_the_edge():
    lrs = np.geomspace(1e-5, 1.0, 60)
    losses = 2.0 - np.tanh(np.log10(lrs / 1e-3)) + 50 * (lrs > 0.1)  # falls to 1e-1, then blows up
    result = suggest(lrs, losses)
    assert result.edge == pytest.approx(lrs[int(np.argmin(result.smoothed))])
    assert race_candidates(result) == pytest.approx([result.edge * 10 ** d for d in (0.5, 0.0, -0.5, -1.0)])
    flat = suggest(lrs, np.ones(60))
    assert flat.edge is None
    with pytest.raises(ValueError, match="no suggestion"):
        race_candidates(flat)


def test_race_pick_refines_by_a_parabola_and_halves():
    lrs = [1e-1, 1e-2, 1e-3, 1e-4]
    assert race_pick(lrs, [0.9, 0.5, 0.9, 1.0]) == pytest.approx(0.5 * 1e-2)  # symmetric: the best one
    shifted = race_pick(lrs, [0.9, 0.5, 0.6, 1.0])  # the parabola leans towards the lower neighbour
    assert 0.5 * 1e-3 < shifted < 0.5 * 1e-2
    assert race_pick(lrs, [0.1, 0.5, 0.9, 1.0]) == pytest.approx(0.5 * 1e-1)  # the edge of the ladder: no parabola
    assert race_pick(lrs, [math.inf, 0.5, math.inf, 1.0]) == pytest.approx(0.5 * 1e-2)  # diverged neighbours
    assert race_pick(lrs, [math.inf] * 4) is None
    assert race_pick(lrs[::-1], [1.0, 0.9, 0.5, 0.9]) == race_pick(lrs, [0.9, 0.5, 0.9, 1.0])  # any order
    with pytest.raises(ValueError, match="as many losses as LRs"):
        race_pick(lrs, [1.0])


def test_with_race_keeps_the_curve_and_falls_back_to_it():
    lrs = np.geomspace(1e-5, 1.0, 60)
    result = suggest(lrs, 2.0 - np.tanh(np.log10(lrs / 1e-3)) + 50 * (lrs > 0.1))
    candidates = race_candidates(result)
    raced = result.with_race(candidates, [0.9, 0.5, 0.9, 1.0], steps=7)
    assert raced.method == "race" and raced.lr == pytest.approx(0.5 * candidates[1])
    assert raced.race == {"lrs": candidates, "losses": [0.9, 0.5, 0.9, 1.0], "steps": 7, "curve_lr": result.lr}
    assert raced.low <= raced.lr <= raced.high and raced.lrs == result.lrs
    assert "raced 4 LRs for 7 steps each" in raced.summary()
    none = result.with_race(candidates, [math.inf] * 4, steps=7)
    assert none.lr == result.lr and none.method == result.method and none.race["losses"] == [math.inf] * 4
