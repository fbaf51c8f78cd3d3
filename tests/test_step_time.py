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
    assert model().residuals(15.0) == {"all": {"steps": 0}, "sized": {"steps": 0, "over_target": 0.0}}
