"""The embedded engine's step scheduler on its own: the token budget while requests decode
(step_time_target_ms), decodes before prefills, and preemption dropping what a step had
scheduled for the request it evicts."""

from __future__ import annotations

from inflight.sampling_params import SamplingParams
from worker.embedded.block_pool import KvBlockPool
from worker.embedded.model_runner import no_slower_than_larger, tokens_within
from worker.embedded.scheduler import MIN_PREFILL_TOKENS, BatchScheduler
from worker.embedded.sequence import Sequence, SeqStatus


def scheduler(pool: KvBlockPool, budget=None, max_num_tokens: int = 2048, policy: str = "GUARANTEED_NO_EVICT"):
    return BatchScheduler(pool, max_batch_size=16, max_num_tokens=max_num_tokens, max_seq_len=8192,
                          enable_chunked_prefill=True, policy=policy, token_budget=budget)


def seq(name: str, prompt_len: int, max_tokens: int = 64) -> Sequence:
    return Sequence(name, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=max_tokens))


def run_step(chunks) -> None:
    """What the engine does with a step's chunks once its tokens are back."""
    for ch in chunks:
        ch.seq.num_computed += ch.num_tokens
        if ch.sample:
            ch.seq.output_token_ids.append(7)


def test_while_requests_decode_a_prompt_gets_what_the_budget_leaves():
    calls = []
    allowed = {"tokens": 300}

    def budget(decodes: int, context: int) -> int:
        calls.append((decodes, context))
        return allowed["tokens"]

    sched = scheduler(KvBlockPool(1000, 16), budget)
    a, b, c = seq("a", 10), seq("b", 20), seq("c", 1000)
    sched.add(a)
    sched.add(b)
    first = sched.schedule()
    assert [(ch.seq, ch.num_tokens) for ch in first] == [(a, 10), (b, 20)]
    assert calls == []  # nothing decodes yet: the whole max_num_tokens
    run_step(first)

    sched.add(c)
    step = sched.schedule()
    assert calls == [(2, 11 + 21)]  # each decode reads its context and its new token
    assert [(ch.seq, ch.num_tokens) for ch in step] == [(a, 1), (b, 1), (c, 298)]
    run_step(step)

    allowed["tokens"] = 0  # the decodes alone are over the target: prompts still move
    step = sched.schedule()
    assert [(ch.seq, ch.num_tokens) for ch in step] == [(a, 1), (b, 1), (c, MIN_PREFILL_TOKENS)]
    run_step(step)

    allowed["tokens"] = 10_000  # never more than max_num_tokens
    step = sched.schedule()
    assert sum(ch.num_tokens for ch in step) == 2 + (1000 - 298 - MIN_PREFILL_TOKENS)
    run_step(step)
    assert c.num_computed == 1000 and len(c.output_token_ids) == 1


def test_without_a_budget_function_every_step_may_take_max_num_tokens():
    sched = scheduler(KvBlockPool(1000, 16), None, max_num_tokens=512)
    a, c = seq("a", 10), seq("c", 2000)
    sched.add(a)
    run_step(sched.schedule())
    sched.add(c)
    step = sched.schedule()
    assert [(ch.seq, ch.num_tokens) for ch in step] == [(a, 1), (c, 511)]


def test_decodes_are_scheduled_before_an_older_prefill():
    sched = scheduler(KvBlockPool(1000, 16), lambda decodes, context: 0, max_num_tokens=4096)
    p, d = seq("p", 1000), seq("d", 8)
    for s, computed, outputs in ((p, 100, 0), (d, 8, 1)):  # p was admitted first and is still prefilling
        s.output_token_ids = [7] * outputs
        s.num_computed = computed
        s.block_table = [sched.pool.allocate() for _ in range(sched.pool.blocks_needed(computed))]
        s.status = SeqStatus.RUNNING
        sched.running.append(s)
    step = sched.schedule()
    assert [(ch.seq, ch.num_tokens) for ch in step] == [(d, 1), (p, 1 + MIN_PREFILL_TOKENS - 1)]


def test_preempting_a_request_drops_the_chunk_this_step_gave_it():
    pool = KvBlockPool(4, 4)  # 16 tokens of KV
    sched = scheduler(pool, None, max_num_tokens=64, policy="MAX_UTILIZATION")
    p, d = seq("p", 12), seq("d", 4)
    p.num_computed, p.block_table = 4, [pool.allocate()]  # older, 8 prompt tokens to go
    d.output_token_ids = [7]
    d.num_computed, d.block_table = 4, [pool.allocate()]  # newer, decoding: needs a second block
    for s in (p, d):
        s.status = SeqStatus.RUNNING
        sched.running.append(s)
    step = sched.schedule()
    # d's decode took a block first; p's prefill then needed two of the one left, so d
    # (the newest) was preempted and its decode must not run on blocks it no longer has.
    assert [(ch.seq, ch.num_tokens) for ch in step] == [(p, 8)]
    assert d.status is SeqStatus.WAITING and d.block_table == [] and list(sched.waiting) == [d]
    assert len(p.block_table) == 3 and pool.num_free == 1


def test_step_sizes_from_graph_timings():
    # As timed on an H200 for the 8B shape: the 448-token graph was slower than the
    # 512-token one, so its steps replay that one instead.
    sizes = [256, 384, 448, 512, 640, 768]
    ms = [7.1, 9.5, 15.8, 11.7, 15.9, 18.3]
    kept, kept_ms = no_slower_than_larger(sizes, ms)
    assert kept == [256, 384, 512, 640, 768] and kept_ms == [7.1, 9.5, 11.7, 15.9, 18.3]
    assert no_slower_than_larger([16, 32, 64], [1.0, 0.9, 2.0]) == ([32, 64], [0.9, 2.0])
    assert tokens_within(sizes, ms, 12.0) == 512  # the slow 448 graph in between does not stop it
    assert tokens_within(kept, kept_ms, 9.5) == 384
    assert tokens_within(kept, kept_ms, 5.0) == 0


def test_launch_wait_counts_on_the_queued_steps_predicted_time(engine_for, monkeypatch):
    """The engine says how long its caller may take in requests before the next step: the
    queued step's predicted time (here given, as a GPU's start-up timings would), less
    the host's launch time and a margin; 0 with nothing predicted, or nothing queued."""
    from worker.embedded.engine import LAUNCH_WAIT_SHARE

    engine = engine_for(overlap_scheduler="on")
    assert engine.launch_wait() == 0.0
    # Long enough that the CPU's own step time (the "launch" here computes the step) is small beside it.
    monkeypatch.setattr(engine.runner, "predict_ms", lambda chunks: 20_000.0)
    engine.submit("w", list(range(1, 11)), SamplingParams(max_tokens=3, temperature=0))
    try:
        engine.step()
        first = engine.launch_wait()
        assert LAUNCH_WAIT_SHARE * 20 - 2 * engine._launch_s - 1.0 < first <= LAUNCH_WAIT_SHARE * 20 - 2 * engine._launch_s
        assert engine.launch_wait() <= first  # it counts down
        monkeypatch.setattr(engine.runner, "predict_ms", lambda chunks: None)  # a step not timed: no wait
        engine.step()
        assert engine.launch_wait() == 0.0
    finally:
        engine.abort("w")
        while engine.has_work():
            engine.step()
    assert engine.launch_wait() == 0.0  # nothing queued


def test_a_prompt_chunk_is_cut_by_what_its_attention_over_the_prompt_costs():
    """chunk_limit sees each prompt chunk with what the step holds so far (tokens, and the
    (query, key) pairs of earlier chunks), and cuts it; the step's first chunk still gets
    MIN_PREFILL_TOKENS; a later one may get nothing this step and waits."""
    from worker.embedded.scheduler import MIN_PREFILL_TOKENS

    calls = []
    allow = {"tokens": 400}

    def chunk_limit(context, tokens, pairs, start, want):
        calls.append((context, tokens, pairs, start, want))
        return min(want, allow["tokens"])

    sched = BatchScheduler(KvBlockPool(1000, 16), max_batch_size=8, max_num_tokens=2048, max_seq_len=4096,
                           enable_chunked_prefill=True, policy="GUARANTEED_NO_EVICT", chunk_limit=chunk_limit)
    d = seq("d", 10)
    sched.add(d)
    run_step(sched.schedule())  # d's prompt: nothing decodes yet, so no limit
    assert calls == []
    p, q = seq("p", 1500), seq("q", 300)
    sched.add(p)
    sched.add(q)
    step = sched.schedule()
    # d decodes (context 11); p is cut to 400; q then sees 401 tokens and p's 400 x 401 / 2 pairs.
    assert [(ch.seq, ch.num_tokens) for ch in step] == [(d, 1), (p, 400), (q, 300)]
    assert calls == [(11, 1, 0, 0, 1500), (11, 401, 400 * 401 // 2, 0, 300)]
    run_step(step)
    # Now nothing fits: p (continuing at 400) still gets the first chunk's minimum, q nothing.
    allow["tokens"] = 0
    calls.clear()
    step = sched.schedule()
    assert [(ch.seq.request_id, ch.num_tokens) for ch in step] == [("d", 1), ("q", 1), ("p", MIN_PREFILL_TOKENS)]
    assert calls[-1][3] == 400
