"""The open-loop benchmark's arithmetic (bench/serving_load.py): the Poisson schedule,
percentiles, inter-token gaps, goodput, and the engine-direct side keeping the schedule."""

from __future__ import annotations

import statistics

import pytest

from bench.load import Timing, percentile, summarize
from bench.serving_load import drive_engine, goodput, meets_slo, poisson_arrivals
from testing.engine_double import InstantEngine
from worker.engine_api import EngineConfig


def test_poisson_arrivals_have_the_rate_and_are_seeded():
    times = poisson_arrivals(20_000, 50.0, seed=3)
    assert times[0] == 0.0 and times == sorted(times)
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert statistics.mean(gaps) == pytest.approx(1 / 50, rel=0.03)
    assert statistics.stdev(gaps) == pytest.approx(1 / 50, rel=0.05)  # exponential: sd equals mean
    assert poisson_arrivals(5, 2.0, seed=3) == poisson_arrivals(5, 2.0, seed=3) != poisson_arrivals(5, 2.0, seed=4)


def test_percentile_is_the_nearest_rank_in_ms():
    xs = [i / 1000 for i in range(1, 101)]  # 1..100 ms
    assert [percentile(xs, p) for p in (50, 90, 99)] == pytest.approx([51, 91, 100])
    assert percentile([0.005], 99) == pytest.approx(5)


def test_gaps_are_per_token_and_feed_itl():
    t = Timing("a", 10.0)
    t.add(1, 10.2)  # first token: TTFT 200 ms
    t.add(0, 10.25)  # an empty delta changes nothing
    t.add(1, 10.3)
    t.add(4, 10.7)  # 400 ms for 4 tokens: 100 ms each
    ttft, e2e, tokens, key, gaps, late, sent = t.record(10.8)
    assert (ttft, e2e, tokens, key, late) == pytest.approx((0.2, 0.8, 6, "a", 0.0))
    assert gaps == pytest.approx([0.1, 0.1])
    res = summarize([t.record(10.8)], wall=1.0, gaps=True)
    assert res["itl_p50_ms"] == pytest.approx(100) and res["tok_per_s"] == 6
    assert summarize([], wall=1.0)["ttft_p99_ms"] is None


def test_goodput_needs_both_slos_and_counts_failures_as_missed():
    ok = (0.1, 1.1, 11, 0, [], 0.0)  # TTFT 100 ms, 100 ms a token after
    slow_first = (0.5, 1.5, 11, 1, [], 0.0)
    slow_rest = (0.1, 3.1, 11, 2, [], 0.0)
    single = (0.1, 0.1, 1, 3, [], 0.0)  # one token: no ITL to miss
    assert [meets_slo(r, 200, 150) for r in (ok, slow_first, slow_rest, single)] == [True, False, False, True]
    per_s, share = goodput([ok, slow_first, slow_rest, single], seconds=2.0, sent=8, slo_ttft_ms=200, slo_itl_ms=150)
    assert (per_s, share) == (1.0, 0.25)


def test_engine_direct_keeps_the_schedule_and_the_closed_loop():
    engine = InstantEngine(EngineConfig())
    engine.step_seconds = 0.002
    reqs = [([5, 6, 7], 3)] * 12
    arrivals = [0.01 * i for i in range(12)]  # one each 10 ms, each done in ~6 ms
    got = drive_engine(engine, reqs, arrivals=arrivals)
    records = sorted(got["records"], key=lambda r: r[3])
    assert [r[3] for r in records] == list(range(12)) and all(r[2] == 3 for r in records)
    assert all(r[5] >= 0 for r in records) and statistics.median(r[5] for r in records) < 0.01  # sent at its time
    assert 0.11 < got["seconds"] < 0.5  # paced by the arrivals, not run back to back
    closed = drive_engine(engine, reqs, concurrency=4)
    assert len(closed["records"]) == 12 and closed["seconds"] < got["seconds"]
    # --breakdown's direct hops: arrival -> submitted at a step boundary -> scheduled -> first token, adding up to TTFT
    for run in (got, closed):
        ttfts = sorted(1000 * r[0] for r in run["records"])
        sums = sorted(sum(h.values()) for h in run["hops"])
        assert len(sums) == 12 and sums == pytest.approx(ttfts, abs=0.01)
        assert all(min(h.values()) >= -0.01 for h in run["hops"]) and all(h["first steps"] >= 1.5 for h in run["hops"])
    assert max(h["to worker"] for h in closed["hops"]) < 0.5  # closed loop: submitted at once


def test_hops_are_the_gaps_between_a_requests_moments_and_a_missing_span_drops_it():
    from bench.path_breakdown import HOPS, request_hops

    ms = 1_000_000  # ns
    t0 = 1_700_000_000 * 10**9
    spans = [
        {"name": "inflight.v1.Inference/Generate", "start": t0 + 1 * ms, "end": t0 + 90 * ms, "events": {"first_token": t0 + 40 * ms}},
        {"name": "inflight.scheduler.schedule", "start": t0 + 3 * ms, "end": t0 + 4 * ms, "events": {}},
        {"name": "inflight.worker.request", "start": t0 + 6 * ms, "end": t0 + 80 * ms, "events": {"first_token": t0 + 35 * ms}},
        {"name": "queued", "start": t0 + 6 * ms, "end": t0 + 10 * ms, "events": {}},
        {"name": "inflight.worker.request", "start": t0 + 50 * ms, "end": t0 + 95 * ms, "events": {"first_token": t0 + 60 * ms}},  # requeued: later
    ]
    hops = request_hops(spans, sent=t0 / 1e9, ttft=0.042)
    assert list(hops) == [name for name, _ in HOPS]
    assert list(hops.values()) == pytest.approx([1, 2, 1, 2, 4, 25, 5, 2], abs=1e-3)  # unix seconds as floats: 0.2 us steps
    assert sum(hops.values()) == pytest.approx(42, abs=1e-3)
    assert request_hops([s for s in spans if s["name"] != "queued"], sent=t0 / 1e9, ttft=0.042) is None
