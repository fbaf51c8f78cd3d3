"""The Engine contract (worker/engine_api.py), one suite for every engine that can run here:

- embedded: our engine, always;
- trtllm: TensorRT-LLM's, where `tensorrt_llm` imports and a GPU is visible (elsewhere
  reported as skipped, with why);
- trtllm-over-fake: the same TensorRT-LLM adapter over FakeTensorRTLLM
  (testing/fake_tensorrt_llm.py, a double of TensorRT-LLM 1.2's LLM API) taking its
  tokens from our embedded engine, so that the adapter's translation is held to the
  contract on a real model (SmolLM2-135M-Instruct on the CPU).

One engine per kind for the module (the embedded one is conftest's engine_for(), which the
fake also takes its tokens from); every test hands it back idle. What the TensorRT-LLM
adapter cannot do (continue a seeded request's random stream) is marked xfail for it."""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import math
import time

import pytest

from inflight.errors import RequestError
from inflight.sampling_params import SamplingParams
from testing import fake_tensorrt_llm as fake
from worker.engine_api import EngineConfig, KvCacheConfig

TOKENS_PER_BLOCK = 16
GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)


def why_no_real_trtllm() -> str | None:
    if importlib.util.find_spec("tensorrt_llm") is None:
        return "tensorrt_llm is not installed here (pip install 'inflight[trtllm]' on a machine with an NVIDIA GPU)"
    import torch

    if not torch.cuda.is_available():
        return "tensorrt_llm is installed but no CUDA GPU is visible"
    return None


NO_REAL_TRTLLM = why_no_real_trtllm()
KINDS = ["embedded", "trtllm", "trtllm-over-fake"]


def embedded_source(engine_for):
    """The fake's token source: our embedded engine (conftest's, shared with the other
    engine tests), which must be configured as the fake LLM was asked to be."""

    def make(llm: fake.LLM):
        kv, sched = llm.kv_cache_config, llm.args["scheduler_config"]
        asked = (kv.tokens_per_block, kv.enable_block_reuse, kv.max_tokens, str(sched.capacity_scheduler_policy),
                 llm.args["enable_chunked_prefill"], llm.args["max_batch_size"], llm.args.get("max_num_tokens"))
        assert asked == (TOKENS_PER_BLOCK, True, None, "GUARANTEED_NO_EVICT", True, 256, None), asked
        return engine_for()

    return make


@pytest.fixture(scope="module", params=KINDS)
def engine(request, model_dir, engine_for):
    kind = request.param
    if kind == "embedded":
        yield engine_for()  # tokens_per_block 16, the CPU
        return
    if kind == "trtllm" and NO_REAL_TRTLLM:
        pytest.skip(NO_REAL_TRTLLM)
    cfg = EngineConfig(model=str(model_dir), kv_cache=KvCacheConfig(tokens_per_block=TOKENS_PER_BLOCK, free_gpu_memory_fraction=0.3))
    with pytest.MonkeyPatch.context() as mp:
        if kind == "trtllm-over-fake":
            fake.install(mp, make_source=embedded_source(engine_for))
            mp.setattr("worker.trtllm.engine.visible_gpus", lambda: 1)
        from worker.trtllm.engine import TrtllmEngine

        e = TrtllmEngine(cfg)
        yield e
        e.close()


@pytest.fixture
def is_trtllm(engine) -> bool:
    return type(engine).__name__ == "TrtllmEngine"


@dataclasses.dataclass
class Finished:
    tokens: list[int] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    error_code: str | None = None
    prompt_tokens: int = 0
    logprobs: list = dataclasses.field(default_factory=list)
    ends: int = 0


def drain(engine, results: dict[str, Finished] | None = None, timeout: float = 60) -> dict[str, Finished]:
    """Step until idle; every request appears at most once a step and ends exactly once."""
    results = {} if results is None else results
    deadline = time.monotonic() + timeout
    while engine.has_work():
        assert time.monotonic() < deadline, "the engine did not finish its requests"
        outs = engine.step()
        ids = [o.request_id for o in outs]
        assert len(ids) == len(set(ids)), f"a request appeared twice in one step: {ids}"
        for o in outs:
            r = results.setdefault(o.request_id, Finished())
            assert r.ends == 0, f"{o.request_id} produced output after it ended"
            r.tokens += o.new_token_ids
            r.logprobs += o.logprobs or []
            r.prompt_tokens = o.prompt_tokens or r.prompt_tokens
            if o.finished:
                r.ends += 1
                r.finish_reason, r.error_code = o.finish_reason, o.error_code
    return results


def generate(engine, prompt, params, resumed=()) -> Finished:
    engine.submit("g", prompt, params, resumed)
    return drain(engine)["g"]


@pytest.fixture(scope="module")
def france(tokenizer) -> list[int]:
    return tokenizer.encode_chat([{"role": "user", "content": "What is the capital of France?"}])


@pytest.fixture(scope="module")
def words(tokenizer) -> list[list[int]]:
    texts = ["river stone cloud engine paper", "violet north garden signal copper winter river",
             "paper cloud", "north north garden stone engine signal violet copper"]
    return [tokenizer.encode_chat([{"role": "user", "content": t}]) for t in texts]


@pytest.fixture(scope="module")
def answer(engine, france) -> Finished:
    return generate(engine, france, SamplingParams(max_tokens=40, temperature=0))


def test_greedy_answer_is_the_models_and_ends_with_its_end_token(engine, answer, tokenizer):
    assert answer.finish_reason == "stop" and answer.error_code is None and answer.ends == 1
    assert answer.tokens[-1] in engine.eos_token_ids
    assert tokenizer.decode(answer.tokens).strip() == "The capital of France is Paris."


def test_stop_token_ids_max_tokens_and_min_tokens(engine, answer, france):
    full = answer.tokens
    stop_at = full[3]
    cut = generate(engine, france, SamplingParams(max_tokens=40, temperature=0, stop_token_ids=(stop_at,)))
    assert (cut.tokens, cut.finish_reason) == (full[: full.index(stop_at) + 1], "stop")
    three = generate(engine, france, SamplingParams(max_tokens=3, temperature=0))
    assert (three.tokens, three.finish_reason) == (full[:3], "length")
    longer = generate(engine, france, SamplingParams(max_tokens=len(full) + 8, temperature=0, min_tokens=len(full) + 4))
    assert len(longer.tokens) >= len(full) + 4
    assert not set(longer.tokens[: len(full) + 3]) & set(engine.eos_token_ids)


def test_a_batch_of_requests_each_ends_once_with_its_own_tokens(engine, words):
    lengths = [5, 12, 8, 3]
    for i, (prompt, n) in enumerate(zip(words, lengths)):
        engine.submit(f"r{i}", prompt, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
    results = drain(engine)
    assert sorted(results) == ["r0", "r1", "r2", "r3"]
    for i, (prompt, n) in enumerate(zip(words, lengths)):
        r = results[f"r{i}"]
        assert (len(r.tokens), r.finish_reason, r.ends, r.prompt_tokens) == (n, "length", 1, len(prompt))
    alone = generate(engine, words[1], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    assert alone.tokens == results["r1"].tokens[:4]


def test_abort_ends_a_request_at_once_and_frees_its_blocks(engine, words):
    for i, prompt in enumerate(words[:3]):
        engine.submit(f"a{i}", prompt, SamplingParams(max_tokens=200, temperature=0, ignore_eos=True))
    seen = drain_some(engine, steps=4)
    assert seen, "no tokens before the aborts"
    assert [engine.abort(f"a{i}") for i in range(3)] == [True] * 3
    assert not engine.abort("a0") and not engine.abort("never-submitted")
    assert not engine.has_work()
    stats = wait_for(engine, lambda s: s.kv_blocks_in_use == 0)
    assert stats.running == 0 and stats.queued == 0 and stats.kv_blocks_free == stats.kv_blocks_total
    # Its id is free again, and nothing of the aborted ones comes back.
    engine.submit("a0", words[3], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    results = drain(engine)
    assert list(results) == ["a0"] and len(results["a0"].tokens) == 4


def drain_some(engine, steps: int, timeout: float = 30.0) -> set[str]:
    """The requests that produced output in `steps` steps, stepping on until one has (within
    `timeout`): an engine that iterates on its own (TensorRT-LLM's) returns from a step
    with nothing after 50 ms, and its first tokens can take longer on a busy machine."""
    seen = set()
    deadline = time.monotonic() + timeout
    for i in itertools.count():
        if i >= steps and (seen or time.monotonic() > deadline):
            return seen
        seen |= {o.request_id for o in engine.step()}


def wait_for(engine, condition, timeout: float = 5.0):
    """Stats that satisfy `condition`: an engine that iterates on its own reports them a
    moment later."""
    deadline = time.monotonic() + timeout
    while not condition(stats := engine.stats()):
        assert time.monotonic() < deadline, f"stats never satisfied the test: {stats}"
        time.sleep(0.02)
    return stats


def test_stats_count_what_the_engine_holds(engine, words):
    for i, prompt in enumerate(words[:3]):
        engine.submit(f"s{i}", prompt, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
    stats = engine.stats()
    assert stats.running + stats.queued == 3
    assert stats.tokens_per_block == TOKENS_PER_BLOCK and stats.kv_blocks_total > 0
    results: dict[str, Finished] = {}
    deadline = time.monotonic() + 30
    while engine.stats().kv_blocks_in_use == 0:  # reported once a step has run
        assert engine.has_work() and time.monotonic() < deadline, "no KV block was ever reported in use"
        for o in engine.step():
            results.setdefault(o.request_id, Finished()).tokens += o.new_token_ids
    drain(engine, results)
    assert all(len(results[f"s{i}"].tokens) == 16 for i in range(3))
    stats = wait_for(engine, lambda s: s.kv_blocks_in_use == 0)
    assert stats.running == 0 and stats.queued == 0


BAD = [  # (prompt, params, the field named)
    ([], SamplingParams(), "prompt_token_ids"),
    ([1, 2, 10**6], SamplingParams(), "prompt_token_ids"),
    ([1, 2], SamplingParams(max_tokens=0), "max_tokens"),
    ([1, 2], SamplingParams(temperature=-1), "temperature"),
    ([1, 2], SamplingParams(top_p=0), "top_p"),
    ([1, 2], SamplingParams(stop_token_ids=(10**7,)), "stop_token_ids"),
    ([1, 2], SamplingParams(logprobs=50), "logprobs"),
]


def test_bad_input_is_refused_at_submit_naming_the_field(engine, words):
    engine.submit("good", words[0], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    refused = []
    for prompt, params, field in BAD + [(words[1], SamplingParams(), "request_id")]:
        with pytest.raises(RequestError) as e:
            engine.submit("good" if field == "request_id" else "bad", prompt, params)
        refused.append((e.value.code, e.value.field))
    assert refused == [("INVALID_ARGUMENT", field) for *_, field in BAD] + [("INVALID_ARGUMENT", "request_id")]
    results = drain(engine)
    assert list(results) == ["good"] and len(results["good"].tokens) == 6


def test_a_resumed_request_goes_on_from_its_tokens(engine, words):
    """What a worker taking over a request from one that died does: prompt plus the tokens
    the client has; max_tokens counts them."""
    whole = generate(engine, words[0], GREEDY)
    assert len(whole.tokens) == GREEDY.max_tokens
    rest = generate(engine, words[0], GREEDY, resumed=whole.tokens[:5])
    assert whole.tokens[:5] + rest.tokens == whole.tokens
    assert rest.prompt_tokens == len(words[0]) and rest.finish_reason == "length"


def test_a_resumed_seeded_request_goes_on_as_if_undisturbed(engine, words, is_trtllm):
    if is_trtllm:
        pytest.xfail("TensorRT-LLM's sampler cannot start a seed's random stream part way (worker/trtllm/engine.py, submit)")
    seeded = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.95, seed=11, ignore_eos=True)
    whole = generate(engine, words[0], seeded)
    rest = generate(engine, words[0], seeded, resumed=whole.tokens[:4])
    assert whole.tokens[:4] + rest.tokens == whole.tokens


def test_a_seed_reproduces_its_draws(engine, words):
    def sample(seed):
        return generate(engine, words[2], SamplingParams(max_tokens=8, temperature=1.0, seed=seed, ignore_eos=True)).tokens

    first = sample(1234)
    assert sample(1234) == first
    assert sample(99) != first


def test_logprobs_are_the_top_n_of_each_chosen_token(engine, words):
    out = generate(engine, words[3], SamplingParams(max_tokens=5, temperature=0, logprobs=3, ignore_eos=True))
    assert [lp.token_id for lp in out.logprobs] == out.tokens
    for lp in out.logprobs:
        values = [v for _, v in lp.top]
        assert len(lp.top) == 3 and values == sorted(values, reverse=True) and all(v <= 0 for v in values)
        assert lp.top[0][0] == lp.token_id and math.isclose(lp.logprob, values[0], abs_tol=1e-4)  # greedy: the best
