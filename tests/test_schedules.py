"""Schedule math at known steps, against torch's own schedulers where torch has one."""

import math

import pytest
import torch

from lrfuse import schedules as S


def torch_factors(make, steps, base=1.0):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=base)
    sched = make(opt)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"] / base)
        opt.step()
        sched.step()
    return out


def assert_close_lists(a, b):
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert x == pytest.approx(y, rel=1e-9, abs=1e-12), f"step {i}: {x} != {y}"


def test_constant():
    assert [S.Constant()(t) for t in (0, 5, 10_000)] == [1.0, 1.0, 1.0]


def test_step_decay_matches_torch():
    assert_close_lists([S.StepDecay(3, 0.5)(t) for t in range(10)],
                       torch_factors(lambda o: torch.optim.lr_scheduler.StepLR(o, 3, 0.5), 10))


def test_multistep_matches_torch_and_explicit_pieces():
    assert_close_lists([S.MultiStep([2, 5], 0.1)(t) for t in range(8)],
                       torch_factors(lambda o: torch.optim.lr_scheduler.MultiStepLR(o, [2, 5], 0.1), 8))
    # "0.1 until step 400, 0.01 until 700, then 0.001"
    s = S.MultiStep([400, 700], factors=[0.1, 0.01, 0.001])
    assert [s(t) for t in (0, 399, 400, 699, 700, 5000)] == [0.1, 0.1, 0.01, 0.01, 0.001, 0.001]


def test_exponential_matches_torch():
    assert_close_lists([S.Exponential(0.9)(t) for t in range(6)],
                       torch_factors(lambda o: torch.optim.lr_scheduler.ExponentialLR(o, 0.9), 6))


def test_cosine_matches_torch_and_known_points():
    s = S.Cosine(10, min_factor=0.1)
    assert_close_lists([s(t) for t in range(11)],
                       torch_factors(lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, 10, eta_min=0.1), 11))
    assert s(0) == 1.0 and s(5) == pytest.approx(0.55) and s(10) == pytest.approx(0.1) and s(50) == pytest.approx(0.1)


@pytest.mark.parametrize("mult", [1, 2])
def test_cosine_restarts_match_torch(mult):
    s = S.Cosine(restart_period=4, restart_mult=mult, min_factor=0.0)
    expected = torch_factors(lambda o: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(o, 4, mult), 30)
    assert_close_lists([s(t) for t in range(30)], expected)


def test_onecycle_matches_torch():
    s = S.OneCycle(20, pct_start=0.3, div_factor=25, final_div_factor=1e4)
    expected = torch_factors(lambda o: torch.optim.lr_scheduler.OneCycleLR(
        o, max_lr=1.0, total_steps=20, pct_start=0.3, anneal_strategy="cos", cycle_momentum=False,
        div_factor=25, final_div_factor=1e4), 20)
    assert_close_lists([s(t) for t in range(20)], expected)
    assert max(s(t) for t in range(20)) == pytest.approx(1.0)


def test_warmup_composes_with_any_schedule():
    s = S.Warmup(S.Cosine(100), warmup_steps=10)
    assert [s(t) for t in (0, 5, 10)] == [0.0, 0.5, 1.0]
    assert s(60) == pytest.approx(0.5)
    s = S.Warmup(S.StepDecay(5, 0.1), warmup_steps=4, start_factor=0.2)
    assert s(0) == 0.2 and s(2) == pytest.approx(0.6) and s(4) == 1.0 and s(9) == pytest.approx(0.1)


def test_make_schedule_counts_warmup_in_total_steps():
    s = S.make_schedule("cosine", total_steps=110, warmup_steps=10)
    assert s(10) == 1.0 and s(60) == pytest.approx(0.5) and s(110) == pytest.approx(0.0)
    m = S.make_schedule("multistep", milestones=[20, 30], warmup_steps=10)
    assert [m(t) for t in (19, 20, 29, 30)] == pytest.approx([1.0, 0.1, 0.1, 0.01])


@pytest.mark.parametrize("bad, match", [
    (lambda: S.StepDecay(0), "step_size"),
    (lambda: S.MultiStep([5, 3]), "strictly increasing"),
    (lambda: S.MultiStep([5], factors=[1.0]), "len\\(milestones\\) \\+ 1"),
    (lambda: S.Cosine(0), "total_steps"),
    (lambda: S.Warmup(S.Constant(), -1), "warmup_steps"),
    (lambda: S.OneCycle(1), "total_steps"),
    (lambda: S.make_schedule("nope"), "unknown schedule"),
    (lambda: S.make_schedule("step"), "step_size"),
    (lambda: S.Plateau(factor=1.5), "factor"),
    (lambda: S.Constant()(-1), "step must be >= 0"),
])
def test_errors_name_the_argument(bad, match):
    with pytest.raises(ValueError, match=match):
        bad()


@pytest.mark.parametrize("mode", ["min", "max"])
@pytest.mark.parametrize("threshold_mode", ["rel", "abs"])
def test_plateau_matches_torch(mode, threshold_mode):
    gen = torch.Generator().manual_seed(0)
    values = (torch.rand(60, generator=gen) * 0.2 + torch.linspace(1, 0.5, 60)).tolist()
    if mode == "max":
        values = [-v for v in values]
    kw = dict(mode=mode, factor=0.5, patience=3, cooldown=2)
    p = S.Plateau(min_delta=0.01, threshold_mode=threshold_mode, **kw)
    ours = [p.update(v) for v in values]
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, threshold=0.01, threshold_mode=threshold_mode, **kw)
    theirs = []
    for v in values:
        sched.step(v)
        theirs.append(opt.param_groups[0]["lr"])
    assert_close_lists(ours, theirs)
    assert p.num_reductions > 0


def test_plateau_patience_and_min_delta():
    p = S.Plateau(patience=2, min_delta=0.1, threshold_mode="abs")
    # 0.95 and 0.92 are not 0.1 better than 1.0: bad evaluations 1, 2, then the third reduces.
    assert [p.update(v) for v in (1.0, 0.95, 0.92)] == [1.0, 1.0, 1.0]
    assert p.update(0.91) == pytest.approx(0.1)
    assert p.update(0.5) == pytest.approx(0.1) and p.best == 0.5  # real improvement resets the count
    state = p.state_dict()
    q = S.Plateau(patience=2, min_delta=0.1, threshold_mode="abs")
    q.load_state_dict(state)
    assert [q.update(1.0) for _ in range(3)] == [p.update(1.0) for _ in range(3)]


def test_plateau_nan_is_never_better():
    p = S.Plateau(patience=0)
    p.update(1.0)
    assert p.update(math.nan) == pytest.approx(0.1)


@pytest.mark.parametrize("bad", [math.nan, math.inf, 2.5, -1, "10"])
def test_lengths_must_be_whole_numbers(bad):
    with pytest.raises(ValueError, match=f"total_steps must be a whole number of steps >= 1, got {bad!r}"):
        S.make_schedule("cosine", total_steps=bad)
    with pytest.raises(ValueError, match="total_steps must be a whole number"):
        S.OneCycle(bad)
    assert S.make_schedule("cosine", total_steps=10.0)(5) == pytest.approx(0.5)  # an integral float is a length


def test_nan_rates_are_refused():
    with pytest.raises(ValueError, match="gamma must be a finite number > 0, got nan"):
        S.Exponential(math.nan)
    with pytest.raises(ValueError, match="warmup_steps must be a whole number"):
        S.make_schedule("constant", warmup_steps=math.nan)


def test_mean_factor():
    assert S.mean_factor(S.Constant(), 7) == 1.0
    assert S.mean_factor(S.make_schedule("cosine", total_steps=300, warmup_steps=30), 300) == pytest.approx(0.5)
    assert S.mean_factor(S.make_schedule("onecycle", total_steps=300), 300) == pytest.approx(0.5, abs=0.01)
    assert S.mean_factor(S.StepDecay(5, 0.5), 10) == pytest.approx(0.75)
    # Relative to the peak: a schedule that never reaches factor 1 still averages to 1 when flat.
    assert S.mean_factor(S.MultiStep([5], factors=[0.1, 0.1]), 10) == pytest.approx(1.0)
    # Long runs are sampled evenly; the answer stays within the sampling error.
    assert S.mean_factor(S.Cosine(1_000_000), 1_000_000) == pytest.approx(0.5, abs=1e-3)
    with pytest.raises(ValueError, match="not all 0"):
        S.mean_factor(lambda t: 0.0, 10)
    with pytest.raises(ValueError, match="total_steps must be a whole number"):
        S.mean_factor(S.Constant(), 0)


def test_compress_squeezes_the_runs_shape_into_the_race():
    run = S.make_schedule("cosine", total_steps=1000, warmup_steps=100)
    squeezed = S.compress(run, 1000, 50)
    assert [squeezed(t) for t in range(50)] == pytest.approx([run(t * 20) for t in range(50)])
    assert max(squeezed(t) for t in range(50)) == pytest.approx(1.0)
    half = S.compress(lambda t: 0.5, 10, 5)  # scaled to peak at 1
    assert half(3) == 1.0
    with pytest.raises(ValueError, match="steps"):
        S.compress(run, 1000, 0)
