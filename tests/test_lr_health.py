"""lrfuse.lr_health: the verdict rules, without a Trainer. The curves are the shapes issue 19 and the
tuning runs of benchmarks/health_quality.py showed (the numbers are from those runs)."""

from __future__ import annotations

import math

import pytest

from lrfuse.lr_health import HealthRules


def judge(losses, ratios, lrs=None, **kwargs) -> tuple[str, str]:
    """The verdict after the last check, ratios given per check (a number: the same at every check)."""
    rules = HealthRules(**kwargs)
    ratios = [ratios] * len(losses) if isinstance(ratios, float) else ratios
    for i, loss in enumerate(losses):
        rules.add_loss(loss, None if lrs is None else lrs[i])
    return rules.verdict(ratios[: len(losses)])


def history(losses, ratios, **kwargs) -> str:
    """The verdict at every check, one letter each: . ok, H too high, L too low."""
    rules, out = HealthRules(**kwargs), ""
    for i, loss in enumerate(losses):
        rules.add_loss(loss)
        out += {"ok": ".", "too_high": "H", "too_low": "L"}[rules.verdict(ratios[: i + 1])[0]]
    return out


CONVERGED = [2.3, 1.2, 0.24, 0.08, 0.03, 0.012, 0.006] + [0.004, 0.014, 0.007, 0.011, 0.005, 0.013, 0.009] * 2


def test_noise_of_a_loss_that_converged_near_zero_is_not_a_rise():
    # Issue 19: a good LR whose loss wanders between 0.004 and 0.014 after falling from 2.3 was "rising".
    assert judge(CONVERGED, 5e-3) == ("ok", "")
    # A loss that gave back more than half of its progress is rising.
    status, why = judge(CONVERGED + [1.5, 1.6, 1.7], 5e-3)
    assert status == "too_high" and "rising" in why, why


def test_a_spike_that_came_back_down_is_still_too_high():
    # Issue 19: Adam at lr 3.0, the loss jumps from 1.1 to ~5,000 twice and falls to 0.003 between.
    losses = [1.1, 0.4, 0.05, 5e3, 0.2, 0.01, 0.003, 0.003, 4.8e3, 0.1, 0.005, 0.003, 0.003, 0.003]
    status, why = judge(losses, 1e-2)
    assert status == "too_high" and "exploded" in why and "5e+03" in why, why
    assert judge([1.1, math.nan, 1.1, 1.1, 1.1], 1e-2)[0] == "too_high"  # non-finite once counts too


def test_an_explosion_is_forgiven_once_the_lr_is_halved():
    losses = [1.1, 5e3, 0.2, 0.1, 0.05, 0.04]
    assert judge(losses, 1e-2, lrs=[3.0] * 6)[0] == "too_high"
    assert judge(losses, 1e-2, lrs=[3.0] * 4 + [2.0, 2.0])[0] == "too_high"  # lowered, not halved
    assert judge(losses, 1e-2, lrs=[3.0] * 4 + [1.0, 1.0]) == ("ok", "")
    # Dead units of the explosion stop moving: never "too low" after one, forgiven or not.
    assert judge(losses + [0.04] * 5, 1e-9, lrs=[3.0] * 4 + [1.0] * 7)[0] == "ok"
    # A second explosion at the lowered LR is judged afresh.
    assert judge(losses + [6e3, 0.03], 1e-2, lrs=[3.0] * 4 + [1.0] * 4)[0] == "too_high"


def test_a_spike_below_the_explosion_factor_at_the_start_is_not_one():
    # RMSprop's first steps at the grid's best LR (iris): 1.07 -> 21.4 -> converged. Not flagged.
    losses = [1.07, 21.4, 0.24, 0.22, 0.09, 0.08, 0.09, 0.11, 0.13, 0.12, 0.07, 0.08]
    assert history(losses, [1e-2] * len(losses)) == "." * len(losses)


def test_far_too_low_is_flagged_from_a_slow_fall_and_small_updates():
    # Adam at 1e-4 of the best LR: the loss falls 5% over the run, the ratio stays ~5e-5, never below 1e-5.
    slow = [0.695 - 0.0014 * i for i in range(27)]
    status, why = judge(slow, [7.5e-5] + [5.2e-5] * 26)
    assert status == "too_low" and "barely fell" in why, why
    assert history(slow[:6], [5e-5] * 6) == "...LLL"  # from check `patience` + 1 on, not before
    # The same ratios with a loss that did fall (a noisy-label task at a good LR has large ratios
    # instead; a converged run may have tiny ones): not too low.
    fell = [0.695 * 0.9 ** i for i in range(27)]
    assert judge(fell, 5e-5) == ("ok", "")


def test_a_converged_run_whose_updates_vanish_is_ok():
    # RMSprop at a good LR on a tiny set: the loss reaches ~1e-6 and the updates 0.
    losses = [1.08, 0.3, 0.05, 1e-3] + [1e-6] * 10
    ratios = [3e-2, 1e-2, 5e-3, 1e-3] + [0.0] * 10
    assert judge(losses, ratios) == ("ok", "")


def test_updates_that_collapse_while_the_loss_never_fell_are_too_high():
    # SGD at 10x the best LR on a CNN: ratios 4e-2 -> 0 (dead units), loss 1.39 -> 1.42 (chance):
    # the ratio rule alone called it too low, the opposite verdict.
    ratios = [4.4e-2, 9.1e-2, 5e-2, 1.4e-2, 4.4e-3, 1.5e-3, 6e-4, 3.9e-3, 1.5e-3, 5e-4, 1.8e-4, 9e-5, 3e-5,
              1e-5, 4e-6, 1e-6, 0.0, 0.0, 0.0]
    losses = [1.39, 1.42, 1.42, 1.44, 1.44, 1.44, 1.43, 1.42, 1.43, 1.42, 1.42, 1.43, 1.44, 1.41, 1.45, 1.45,
              1.42, 1.42, 1.42]
    status, why = judge(losses, ratios)
    assert status == "too_high" and "collapsed" in why, why
    assert "L" not in history(losses, ratios)


def test_a_loss_that_never_fell_with_large_updates_is_too_high():
    losses = [1.0, 1.02, 0.99, 1.01, 1.0, 1.0, 1.01, 1.0, 1.0]
    status, why = judge(losses, [0.5, 0.4, 0.3, 0.05, 0.02, 0.02, 0.02, 0.02, 0.02])
    assert status == "too_high" and "never fell" in why, why


def test_large_updates_now_are_too_high_and_one_large_first_step_is_not():
    assert judge([2.3, 1.8, 0.75, 0.45, 0.4], [0.11, 0.04, 0.02, 0.01, 0.01]) == ("ok", "")  # Adam's first step
    status, why = judge([2.3, 1.8, 0.75, 0.45, 0.4], [0.01, 0.01, 0.3, 0.3, 0.3])
    assert status == "too_high" and "> 0.1 for 3 checks" in why, why


def test_too_early_to_say():
    assert judge([2.3], 1e-9) == ("ok", "")
    assert judge([2.3, 2.3, 2.3], 1e-9) == ("ok", "")  # `patience` checks are not enough for too low


def test_thresholds_are_arguments():
    slow = [0.695 - 0.0014 * i for i in range(10)]
    assert judge(slow, 5e-5, low_ratio=1e-5) == ("ok", "")
    assert judge(slow, 5e-5)[0] == "too_low"
    assert judge([1.1, 50.0, 0.5, 0.4, 0.3], 1e-2, explode_factor=20.0)[0] == "too_high"
    assert judge([1.1, 50.0, 0.5, 0.4, 0.3], 1e-2)[0] == "ok"


def test_state_dict_round_trip_and_older_state_dicts():
    rules = HealthRules()
    for loss, lr in zip([1.1, 5e3, 0.2, 0.1], [3.0, 3.0, 3.0, 3.0]):
        rules.add_loss(loss, lr)
    state = rules.state_dict()
    assert state["first"] == 1.1 and state["peak"] == 5e3 and state["peak_lr"] == 3.0 and state["count"] == 4
    fresh = HealthRules()
    fresh.load_state_dict(state)
    assert fresh.state_dict() == state and fresh.verdict([1e-2] * 4) == rules.verdict([1e-2] * 4)
    # 0.1's history rules kept "losses", "best", "first", "peak", "count"; the oldest only the first two.
    old = HealthRules()
    old.load_state_dict({"losses": [2.3, 5e4, 40.0, 2.3], "best": 2.3, "first": 2.3, "peak": 5e4, "count": 4})
    assert old.verdict([1e-9] * 5)[0] == "too_high"
    oldest = HealthRules()
    oldest.load_state_dict({"losses": [2.3, 2.3, 2.3, 2.3], "best": 2.3})
    assert oldest.state_dict()["first"] == 2.3 and oldest.verdict([1e-9] * 5)[0] == "too_low"


@pytest.mark.parametrize("name", ["_recent", "_first", "_peak"])
def test_history_is_not_an_argument(name):
    with pytest.raises(TypeError):
        HealthRules(**{name: None})


def test_a_loss_that_stays_far_above_its_start_exploded():
    # Adam at 0.46 on a small binary task: 0.695 -> 29 and 6-26 for seven checks, then down to 0.1.
    losses = [0.695, 29.0, 25.8, 5.8, 16.5, 14.4, 11.7, 18.4, 2.26, 0.53, 0.23, 0.16, 0.12, 0.11, 0.1]
    status, why = judge(losses, 1e-2)
    assert status == "too_high" and "exploded" in why, why
    # One check that high is not (see the RMSprop start above); three in a row are.
    assert judge([0.7, 9.0, 0.5, 0.4, 0.3, 0.2], 1e-2)[0] == "ok"
    assert judge([0.7, 9.0, 9.0, 9.0, 0.3, 0.2], 1e-2)[0] == "too_high"
