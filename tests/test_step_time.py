"""The step-time model the engine sizes steps by (worker/embedded/step_time.py): refitted
to measured steps, it finds the law they follow; it stays at the start-up timings until
steps say otherwise; and its bounds hold against steps that say something absurd."""

import random

import pytest

from worker.embedded.step_time import A_BOUNDS, B_FACTOR_MAX, StepTimeModel

B0 = 0.03e-3  # ms a context token, as timed at start-up


def model() -> StepTimeModel:
    return StepTimeModel(B0, typical_graph_ms=10.0, typical_context=64 * 1024, typical_pairs=512 * 1024)


def steps(n: int, a: float, b: float, e: float, seed: int = 0):
    rng = random.Random(seed)
    for _ in range(n):
        g, c = rng.uniform(3, 25), rng.randrange(0, 100_000)
        pairs = rng.choice([0, rng.randrange(0, 1_000_000)])
        yield g, c, pairs, a * g + b * c + e * pairs


def test_it_starts_at_the_start_up_timings():
    m = model()
    assert m.predict(10.0, 50_000) == pytest.approx(10.0 + 50_000 * B0)
    assert m.graph_budget(15.0, 50_000) == pytest.approx(15.0 - 50_000 * B0)


def test_it_learns_the_law_the_steps_follow():
    """Steps 20% slower in their graphs, context twice as dear, and prompt attention
    costing something: after a few hundred steps the fit has all three."""
    m = model()
    a, b, e = 1.2, 2 * B0, 2e-6
    for g, c, p, ms in steps(300, a, b, e):
        m.observe(g, c, p, ms)
    assert m.coef.tolist() == pytest.approx([a, b, e], rel=0.05)
    assert m.predict(12.0, 40_000, 300_000) == pytest.approx(a * 12 + b * 40_000 + e * 300_000, rel=0.02)
    # The budget inverts the prediction: a graph of that time is predicted at the target.
    budget = m.graph_budget(15.0, 40_000)
    assert m.predict(budget, 40_000) == pytest.approx(15.0)


def test_it_follows_a_change_in_the_device():
    """Recent steps weigh more: after the device slows (clocks, another tenant), the fit
    follows within a hundred or so steps."""
    m = model()
    for g, c, p, ms in steps(200, 1.0, B0, 0.0, seed=1):
        m.observe(g, c, p, ms)
    assert m.coef[0] == pytest.approx(1.0, rel=0.02)
    for g, c, p, ms in steps(150, 1.5, B0, 0.0, seed=2):
        m.observe(g, c, p, ms)
    assert m.coef[0] == pytest.approx(1.5, rel=0.05)


def test_its_bounds_hold_against_absurd_steps():
    m = model()
    for g, c, p, _ in steps(50, 1.0, B0, 0.0):
        m.observe(g, c, p, 100 * g + 1.0)  # far slower than anything the graphs took
    assert m.coef[0] == A_BOUNDS[1] and m.coef[1] <= B_FACTOR_MAX * B0
    m = model()
    for g, c, p, _ in steps(50, 1.0, B0, 0.0):
        m.observe(g, c, p, 0.0)  # steps that took nothing
    assert m.coef[0] == A_BOUNDS[0] and m.coef[1] >= 0 and m.coef[2] >= 0


def test_a_chunk_over_a_long_prompt_gets_fewer_tokens_once_its_attention_is_learned():
    """chunk_within picks the largest chunk predicted within the target on the mixed graphs:
    before the model knows what prompt attention costs, a chunk at position 3,000 gets what
    one at position 0 gets; once it knows, less."""
    from worker.embedded.model_runner import chunk_within

    sizes, ms = [128, 256, 512, 1024, 2048], [5.0, 7.0, 11.0, 20.0, 40.0]
    m = model()
    fresh = chunk_within(sizes, ms, m, 15.0, 50_000, 40, 0, 0, 2000)
    assert fresh == 512 - 40  # 11 ms + 1.5 ms of context fits 15 ms; 20 ms does not
    assert chunk_within(sizes, ms, m, 15.0, 50_000, 40, 0, 3000, 2000) == fresh
    for g, c, p, t in steps(300, 1.0, B0, 2e-6):
        m.observe(g, c, p, t)
    late = chunk_within(sizes, ms, m, 15.0, 50_000, 40, 0, 3000, 2000)
    assert 0 < late < fresh
    n = late
    assert m.predict(ms[sizes.index(next(s for s in sizes if s >= 40 + n))], 50_000, n * 3000 + n * (n + 1) // 2) <= 15.0
    # And a chunk that cannot fit at all gets nothing (the scheduler then gives the step's
    # first chunk its minimum).
    assert chunk_within(sizes, ms, m, 2.0, 50_000, 40, 0, 3000, 2000) == 0


def test_its_residuals_say_how_far_steps_ran_past_their_prediction_and_the_target():
    """Steps that follow the start-up law but run 0.4 ms longer one time in ten: the
    residuals report it at p90-p99, and among the steps sized near a 15 ms target, the
    share that ran over it."""
    m = model()
    rng = random.Random(1)
    for i in range(2000):
        g = rng.uniform(3, 15)
        extra = 0.4 if i % 10 == 0 else 0.0
        m.observe(g, 0, 0, g + extra)
    r = m.residuals(15.0)
    assert r["all"]["steps"] == 2000 and r["all"]["p50"] == pytest.approx(0.0, abs=0.05)
    assert r["all"]["p99"] == pytest.approx(0.4, abs=0.05) and r["all"]["max"] == pytest.approx(0.4, abs=0.05)
    sized = r["sized"]  # predicted at 13.5 ms or more; those over 14.6 ms with the extra 0.4 ran past 15
    assert 0 < sized["steps"] < 2000 and 0 < sized["over_target"] < 0.1, sized
    assert model().residuals(15.0) == {"all": {"steps": 0}, "sized": {"steps": 0, "over_target": 0.0}, "margin_ms": 0.0}


def test_steps_are_sized_to_the_target_less_how_far_sized_steps_ran_past_their_prediction():
    """Steps that run 0.8 ms past their prediction one time in five: once enough steps
    sized near the target are seen, the margin is their 90th percentile of that (0.8 ms,
    less what the refit takes up on average), and the runner sizes steps to 15 ms less it;
    steps that run as predicted bring it back to 0. It never exceeds a tenth of the target."""
    from worker.embedded.model_runner import ModelRunner
    from worker.embedded.step_time import MARGIN_EVERY, MARGIN_MAX, RECENT

    runner = ModelRunner.__new__(ModelRunner)  # the sizing methods need only the graphs' timings and the model
    runner.mixed_sizes, runner.mixed_ms = [128, 256, 512], [10.0, 14.0, 14.5]
    runner.step_model = m = model()
    m.margined = True  # as the runner makes it under step_time_margin
    assert m.margin(15.0) == 0.0
    assert runner.tokens_within(15.0, 0) == 512 and runner.chunk_within(15.0, 0, 0, 0, 0, 1000) == 512
    rng = random.Random(2)

    def run(n: int, extra: float, every: int) -> None:
        for i in range(n):
            g = rng.uniform(13.6, 15.0)  # sized near the target
            m.observe(g, 0, 0, g + (extra if i % every == 0 else 0.0))

    run(MARGIN_EVERY, 0.8, 5)
    margin = m.margin(15.0)
    assert 0.5 < margin <= 0.8 and m.residuals(15.0)["margin_ms"] == margin
    # 14.5 ms of graph is predicted past 15 less the margin: the 256-token graph is the largest that fits
    assert runner.tokens_within(15.0, 0) == 256 and runner.chunk_within(15.0, 0, 0, 0, 0, 1000) == 256
    m.margined = False  # step_time_margin off: the target itself
    assert runner.tokens_within(15.0, 0) == 512
    m.margined = True
    run(RECENT, 0.0, 1)  # the recent steps all ran as predicted
    assert m.margin(15.0) == 0.0
    assert runner.tokens_within(15.0, 0) == 512
    run(RECENT, 100.0, 2)  # every other step absurdly late: the margin stops at its bound
    assert m.margin(15.0) == pytest.approx(MARGIN_MAX * 15.0)
