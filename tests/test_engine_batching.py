"""In-flight batching: outputs do not depend on what else runs, how the KV pool is
sized, or whether requests were preempted; prefix reuse, seeds, aborts and bad input.

Engines come from engine_for (conftest.py): one per set of knobs, shared by the tests
that use the same knobs, each handed back idle; stats are compared before and after."""

from __future__ import annotations

import random

import pytest

from inflight.errors import RequestError
from inflight.sampling_params import SamplingParams

# Twelve prompts of 8 tokens each: 8 start at once and 4 arrive while they decode, which is enough
# to mix chunked prefills with decodes and to run a small pool out (on the 2-core CI machine
# a decode step of the default model in float32 takes about 75 ms, bound by memory bandwidth,
# so each token fewer saves about a second over the file's reference and staggered runs).
N_PROMPTS = 12
GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


def prompts(tokenizer, n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    words = "river stone cloud engine paper violet north garden signal copper winter".split()
    out = []
    for i in range(n):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(2, 60)))
        out.append(tokenizer.encode_chat([{"role": "user", "content": f"{i}: {text}"}]))
    return out


@pytest.fixture(params=["off", "on"], ids=["sync", "overlap"])
def overlap(request) -> str:
    """Both step modes: overlap scheduling launches step N+1 before reading step N's tokens
    (the GPU default); on the CPU it is off unless asked for, so both run here."""
    return request.param


@pytest.fixture(scope="module")
def workload(tokenizer):
    return prompts(tokenizer, N_PROMPTS)


@pytest.fixture(scope="module")
def alone(engine_for, workload):
    """What each request produces when it is the only one in the engine."""
    engine = engine_for()
    return [engine.generate([p], GREEDY)[0] for p in workload]


def run_staggered(engine, workload, params=GREEDY) -> dict[str, list[int]]:
    """Half the requests start at once; the rest arrive one per step while others decode."""
    out: dict[str, list[int]] = {}
    pending = list(enumerate(workload))
    for i, p in pending[:8]:
        engine.submit(str(i), p, params)
    pending = pending[8:]
    while engine.has_work() or pending:
        if pending:
            i, p = pending.pop(0)
            engine.submit(str(i), p, params)
        for o in engine.step():
            out.setdefault(o.request_id, []).extend(o.new_token_ids)
            if o.finished:
                assert o.finish_reason == "length" and o.error_code is None
    return out


def as_list(out: dict[str, list[int]], n: int) -> list[list[int]]:
    return [out[str(i)] for i in range(n)]


def test_batching_invariance(engine_for, workload, alone, overlap):
    engine = engine_for(overlap_scheduler=overlap, max_num_tokens=96)  # forces chunked prefill mixed with decodes
    assert as_list(run_staggered(engine, workload), N_PROMPTS) == alone
    stats = engine.stats()
    assert stats.kv_blocks_in_use == 0 and stats.running == 0 and stats.queued == 0


def test_decode_rows_longest_first_keeps_every_requests_tokens(make_engine, workload, alone):
    """KernelConfig.decode_order "longest-first" sorts a step's decode rows by context, so a
    sequence's row changes from step to step (and, with overlap, its pending input token
    sits in another row of the step before): each request must still get its own tokens."""
    from worker.engine_api import KernelConfig

    engine = make_engine(overlap_scheduler="on", max_num_tokens=96, kernels=KernelConfig(decode_order="longest-first"))
    assert as_list(run_staggered(engine, workload), N_PROMPTS) == alone


def test_preemption_keeps_outputs(engine_for, workload, alone, overlap):
    longest = max(len(p) for p in workload) + GREEDY.max_tokens
    engine = engine_for(overlap_scheduler=overlap, policy="MAX_UTILIZATION", max_tokens=longest * 3, enable_block_reuse=False)
    before = engine.stats().preemptions
    assert as_list(run_staggered(engine, workload), N_PROMPTS) == alone
    assert engine.stats().preemptions > before
    assert engine.stats().kv_blocks_free == engine.stats().kv_blocks_total


def test_guaranteed_no_evict_small_pool(engine_for, workload, alone, overlap):
    longest = max(len(p) for p in workload) + GREEDY.max_tokens
    engine = engine_for(overlap_scheduler=overlap, max_tokens=longest * 3)
    before = engine.stats().preemptions
    assert as_list(run_staggered(engine, workload), N_PROMPTS) == alone
    assert engine.stats().preemptions == before


def test_prefix_reuse_shows_in_stats_and_keeps_outputs(make_engine, engine_for, tokenizer, overlap):
    # A fresh engine: the exact counts below need a prefix cache that has seen nothing.
    engine = make_engine(overlap_scheduler=overlap, tokens_per_block=8)
    system = "You are a careful assistant. " * 12
    msgs = lambda q: [{"role": "system", "content": system}, {"role": "user", "content": q}]
    first = tokenizer.encode_chat(msgs("Name a fruit."))
    second = tokenizer.encode_chat(msgs("Name a tree."))
    fresh = engine_for(overlap_scheduler=overlap, tokens_per_block=8, enable_block_reuse=False).generate([second], GREEDY)[0]
    engine.generate([first], GREEDY)
    assert engine.stats().blocks_reused == 0
    engine.submit("b", second, GREEDY)
    tokens, cached = [], None
    while engine.has_work():
        for o in engine.step():
            tokens += o.new_token_ids
            cached = o.cached_tokens
    assert tokens == fresh
    shared = next(i for i, (a, b) in enumerate(zip(first, second)) if a != b)
    assert cached == shared // 8 * 8 and cached > 0
    stats = engine.stats()
    assert stats.blocks_reused == shared // 8
    assert 0 < stats.prefix_cache_hit_rate < 1


def test_seeded_sampling_reproduces_in_any_batch(engine_for, workload, overlap):
    engine = engine_for(overlap_scheduler=overlap)
    seeded = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.95, top_k=50, seed=1234, ignore_eos=True)
    alone = engine.generate([workload[0]], seeded)[0]
    others = SamplingParams(max_tokens=10, temperature=1.0, ignore_eos=True)
    batch = engine.generate(workload[:6], [seeded] + [others] * 5)
    assert batch[0] == alone
    other_seed = engine.generate([workload[0]], SamplingParams(max_tokens=10, temperature=0.9, top_p=0.95, top_k=50, seed=99, ignore_eos=True))[0]
    assert other_seed != alone


def test_abort_frees_every_block(engine_for, workload, overlap):
    engine = engine_for(overlap_scheduler=overlap)
    for i, p in enumerate(workload[:6]):
        engine.submit(str(i), p, SamplingParams(max_tokens=100, temperature=0))
    for _ in range(5):
        engine.step()
    assert engine.stats().kv_blocks_in_use > 0
    for i in range(6):
        assert engine.abort(str(i))
    assert not engine.abort("0")
    stats = engine.stats()
    assert stats.kv_blocks_in_use == 0 and stats.running == 0 and not engine.has_work()


def test_max_tokens_min_tokens_and_stop_ids(engine_for, tokenizer, workload, overlap):
    engine = engine_for(overlap_scheduler=overlap)
    prompt = tokenizer.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    full = engine.generate([prompt], SamplingParams(max_tokens=40, temperature=0))[0]
    assert full[-1] in engine.eos_token_ids  # the model ends its answer by itself
    # A stop token id taken from the middle of the answer ends it there.
    stop_at = full[3]
    cut = engine.generate([prompt], SamplingParams(max_tokens=40, temperature=0, stop_token_ids=(stop_at,)))[0]
    assert cut == full[: full.index(stop_at) + 1]
    # max_tokens at min_tokens: what comes after the minimum is not looked at, and without
    # min_tokens the answer would end at its end token, len(full) tokens in.
    longer = engine.generate([prompt], SamplingParams(max_tokens=len(full) + 5, temperature=0, min_tokens=len(full) + 5))[0]
    assert len(longer) == len(full) + 5 and not set(longer[: len(full) + 4]) & set(engine.eos_token_ids)
    assert len(engine.generate([prompt], SamplingParams(max_tokens=3, temperature=0))[0]) == 3


BAD = [  # (prompt, params, the field named)
    ([], SamplingParams(), "prompt_token_ids"),
    ([1] * 9000, SamplingParams(), "prompt_token_ids"),  # over max_seq_len, the model's 8192
    ([1, 2, 10**6], SamplingParams(), "prompt_token_ids"),
    ([1, -3], SamplingParams(), "prompt_token_ids"),
    ([1, 2], SamplingParams(max_tokens=0), "max_tokens"),
    ([1, 2], SamplingParams(max_tokens=10**9), "max_tokens"),
    ([1, 2], SamplingParams(temperature=-1), "temperature"),
    ([1, 2], SamplingParams(temperature=float("nan")), "temperature"),
    ([1, 2], SamplingParams(top_p=0), "top_p"),
    ([1, 2], SamplingParams(top_p=1.5), "top_p"),
    ([1, 2], SamplingParams(stop_token_ids=(10**7,)), "stop_token_ids"),
    ([1, 2], SamplingParams(logprobs=50), "logprobs"),
]


def test_bad_input_names_field_and_spares_others(engine_for, workload, overlap):
    """Each bad request is refused at submit, between the steps of a good one, naming its
    field; it leaves nothing behind (the next one reuses its id) and the good request's
    output is what it is alone."""
    engine = engine_for(overlap_scheduler=overlap)
    assert engine.max_seq_len == 8192
    good = SamplingParams(max_tokens=len(BAD) + 4, temperature=0, ignore_eos=True)  # still running after the last
    alone = engine.generate([workload[0]], good)
    engine.submit("good", workload[0], good)
    out = [t for o in engine.step() for t in o.new_token_ids]
    refused = []
    for prompt, params, field in BAD:
        with pytest.raises(RequestError) as e:
            engine.submit("bad", prompt, params)
        refused.append((e.value.code, e.value.field))
        assert list(engine.requests) == ["good"]
        out += [t for o in engine.step() for t in o.new_token_ids]
    assert refused == [("INVALID_ARGUMENT", field) for _, _, field in BAD]
    while engine.has_work():
        for o in engine.step():
            out += o.new_token_ids
    assert out == alone[0] and len(out) == good.max_tokens


def test_duplicate_request_id_refused(engine_for, workload):
    engine = engine_for()
    engine.submit("x", workload[0], GREEDY)
    with pytest.raises(RequestError) as e:
        engine.submit("x", workload[1], GREEDY)
    assert e.value.field == "request_id"
    assert engine.abort("x")


def test_request_larger_than_pool_refused(engine_for, workload):
    engine = engine_for(max_tokens=64)
    with pytest.raises(RequestError) as e:
        engine.submit("big", workload[0], SamplingParams(max_tokens=500))
    assert e.value.code == "INVALID_ARGUMENT" and e.value.field == "max_tokens"


def test_penalties_turn_overlap_off_while_they_run(engine_for, workload):
    """Penalties read every output token, so an overlap engine runs sync steps while a
    request with penalties is in; its outputs and its neighbours' equal the sync engine's."""
    penalized = SamplingParams(max_tokens=8, temperature=0, repetition_penalty=1.3, frequency_penalty=0.5, ignore_eos=True)
    params = [GREEDY, penalized, GREEDY]
    want = engine_for(overlap_scheduler="off").generate(workload[:3], params)
    engine = engine_for(overlap_scheduler="on")
    assert engine.generate(workload[:3], params) == want
    assert engine._penalized == 0 and engine.generate(workload[:1], GREEDY) == [want[0]]


def test_overlap_reads_each_token_one_step_later(engine_for, workload):
    sync, ahead = engine_for(overlap_scheduler="off"), engine_for(overlap_scheduler="on")
    for engine in (sync, ahead):
        engine.submit("r", workload[0], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    first_sync, first_ahead = sync.step(), ahead.step()
    assert len(first_sync) == 1 and first_ahead == []
    # The second step ran with the first token still "on the device".
    assert [o.new_token_ids for o in ahead.step()] == [first_sync[0].new_token_ids]
    assert ahead.requests["r"].num_pending == 1
    for engine in (sync, ahead):  # back to idle for the next test
        while engine.has_work():
            engine.step()


@pytest.mark.parametrize("params", [GREEDY, SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, seed=11, ignore_eos=True,
                                                              frequency_penalty=0.4)], ids=["greedy", "seeded-penalized"])
def test_a_request_resumed_with_its_tokens_so_far_goes_on_as_if_undisturbed(engine_for, workload, params):
    """What a worker taking over a request from one that died does: the prompt plus the
    tokens the client already has; the rest equals an undisturbed run's."""
    engine = engine_for()
    whole = engine.generate([workload[0]], params)[0]
    assert len(whole) == params.max_tokens
    engine.submit("resumed", workload[0], params, whole[:5])
    rest = []
    while engine.has_work():
        for o in engine.step():
            rest += o.new_token_ids
            if o.finished:
                assert o.prompt_tokens == len(workload[0])
    assert whole[:5] + rest == whole


def test_resumed_tokens_are_checked(engine_for, workload):
    engine = engine_for()
    with pytest.raises(RequestError) as e:
        engine.submit("r", workload[0], SamplingParams(max_tokens=4), [1, 2, 3, 4])
    assert e.value.field == "output_token_ids"
    with pytest.raises(RequestError) as e:
        engine.submit("r", workload[0], SamplingParams(max_tokens=8), [1, 10**7])
    assert e.value.field == "output_token_ids"
    assert not engine.has_work()
