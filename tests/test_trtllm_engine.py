"""The TensorRT-LLM engine's own parts, against FakeTensorRTLLM (testing/fake_tensorrt_llm.py,
a double of TensorRT-LLM 1.2's LLM API) with its model-free ScriptedSource: a request's
i-th token is its last prompt token + 1 + i. Config translation, sampling translation,
streaming deltas, abort, finish reasons, stats parsing, logprobs, and the errors a worker
gives where TensorRT-LLM or a GPU is missing. The engine contract on a real model is
tests/test_engine_contract.py."""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
import time

import pytest

from inflight.errors import RequestError
from inflight.sampling_params import SamplingParams
from models.errors import ModelError
from testing import fake_tensorrt_llm as fake
from testing.stack import ROOT
from worker.engine_api import EngineConfig, EngineConfigError, KvCacheConfig, SchedulerConfig
from worker.trtllm import translate
from worker.trtllm.model_dir import read_model_dir

EOS = [2, 999]  # the second becomes a stop token


@pytest.fixture
def hf_dir(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("checkpoint")
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "vocab_size": 1000,
                                                      "max_position_embeddings": 2048, "eos_token_id": 5}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": EOS}))
    return tmp_path


@pytest.fixture
def engine_dir(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("engine")
    (tmp_path / "config.json").write_text(json.dumps({
        "pretrained_config": {"architecture": "LlamaForCausalLM", "vocab_size": 1000},
        "build_config": {"max_seq_len": 1024, "plugin_config": {"tokens_per_block": 64}},
    }))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
    return tmp_path


@pytest.fixture
def trtllm(monkeypatch):
    """fake.install, one visible GPU, and a maker of TrtllmEngines closed after the test."""
    fake.install(monkeypatch)
    monkeypatch.setattr("worker.trtllm.engine.visible_gpus", lambda: 1)
    from worker.trtllm.engine import TrtllmEngine

    made = []

    def make(model, **knobs) -> TrtllmEngine:
        made.append(TrtllmEngine(EngineConfig(model=str(model), **knobs)))
        return made[-1]

    yield make
    for e in made:
        e.close()


def drain(engine, timeout=10.0) -> dict[str, list]:
    """request id -> [tokens, finish_reason, error_code, error_message]"""
    out: dict[str, list] = {}
    deadline = time.monotonic() + timeout
    while engine.has_work():
        assert time.monotonic() < deadline
        for o in engine.step():
            r = out.setdefault(o.request_id, [[], None, None, None])
            r[0] += o.new_token_ids
            if o.finished:
                r[1:] = [o.finish_reason, o.error_code, o.error_message]
    return out


# Config translation


def test_engine_config_becomes_the_llms_arguments(trtllm, hf_dir):
    engine = trtllm(hf_dir, kv_cache=KvCacheConfig(free_gpu_memory_fraction=0.7, tokens_per_block=64, enable_block_reuse=False,
                                                   max_tokens=40_000, dtype="fp8"),
                    scheduler=SchedulerConfig(capacity_scheduler_policy="MAX_UTILIZATION"), enable_chunked_prefill=False,
                    max_batch_size=64, max_num_tokens=2048, max_seq_len=1536, dtype="bfloat16", overlap_scheduler="off",
                    cuda_graphs=False)
    llm = fake.LLM.created[-1]
    assert type(llm) is fake.LLM  # a checkpoint: the PyTorch backend
    assert (llm.model, llm.skip_tokenizer_init) == (str(hf_dir), True)
    kv, sched = llm.args.pop("kv_cache_config"), llm.args.pop("scheduler_config")
    assert (kv.free_gpu_memory_fraction, kv.tokens_per_block, kv.enable_block_reuse, kv.max_tokens, kv.dtype) == (
        0.7, 64, False, 40_000, "fp8")
    assert sched.capacity_scheduler_policy is fake.CapacitySchedulerPolicy.MAX_UTILIZATION
    assert llm.args == {"tensor_parallel_size": 1, "dtype": "bfloat16", "enable_chunked_prefill": False, "max_batch_size": 64,
                        "max_num_tokens": 2048, "max_seq_len": 1536, "enable_iter_perf_stats": True,
                        "disable_overlap_scheduler": True, "cuda_graph_config": None}
    assert (engine.max_seq_len, engine.vocab_size, engine.eos_token_ids) == (1536, 1000, tuple(EOS))
    assert engine.stats().tokens_per_block == 64


def test_defaults_leave_trtllms_own(trtllm, hf_dir):
    trtllm(hf_dir, tensor_parallel_size=1)
    args = fake.LLM.created[-1].args
    assert "max_num_tokens" not in args and "max_seq_len" not in args and "disable_overlap_scheduler" not in args
    assert args["kv_cache_config"].tokens_per_block == 32 and args["enable_chunked_prefill"] is True
    assert args["kv_cache_config"].dtype == "auto"


def test_a_prebuilt_engine_directory_takes_the_tensorrt_backend(trtllm, engine_dir):
    engine = trtllm(engine_dir, kv_cache=KvCacheConfig(tokens_per_block=16))
    llm = fake.LLM.created[-1]
    assert type(llm) is fake._TrtLLM  # refuses the PyTorch backend's arguments: none were passed
    assert llm.args["kv_cache_config"].tokens_per_block == 32  # left to the engine, built with 64
    assert (engine.max_seq_len, engine.stats().tokens_per_block) == (1024, 64)
    with pytest.raises(RequestError) as e:
        engine.submit("lp", [1, 2], SamplingParams(max_tokens=2, logprobs=2))
    assert e.value.field == "logprobs"
    engine.submit("r", [10], SamplingParams(max_tokens=3, temperature=0))
    assert drain(engine)["r"][:2] == [[11, 12, 13], "length"]


def test_the_fake_refuses_arguments_its_backend_lacks():
    """So that an argument name the adapter gets wrong fails, as the real LLM's would."""
    with pytest.raises(ValueError, match="invalid argument: max_batch"):
        fake.LLM("m", max_batch=8)
    with pytest.raises(ValueError, match="invalid argument: enable_iter_perf_stats"):
        fake._TrtLLM("m", enable_iter_perf_stats=True)
    with pytest.raises(TypeError):
        fake.KvCacheConfig(free_gpu_mem_fraction=0.5)


def test_model_directories(hf_dir, engine_dir, tmp_path_factory):
    hf = read_model_dir(hf_dir)
    assert (hf.format, hf.vocab_size, hf.max_seq_len, hf.eos_token_ids, hf.tokens_per_block) == ("hf", 1000, 2048, (2, 999), None)
    built = read_model_dir(engine_dir)
    assert (built.format, built.vocab_size, built.max_seq_len, built.eos_token_ids, built.tokens_per_block) == ("engine", 1000, 1024, (2,), 64)
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(ModelError, match="config.json"):
        read_model_dir(empty)
    (empty / "config.json").write_text(json.dumps({"pretrained_config": {"vocab_size": 9}, "build_config": {"max_seq_len": 9}}))
    with pytest.raises(ModelError, match="eos_token_id"):
        read_model_dir(empty)


# Sampling translation


def test_sampling_params_translation():
    sp = translate.sampling_params(SamplingParams(max_tokens=20, temperature=0.7, top_k=40, top_p=0.9, min_p=0.05, seed=7,
                                                  stop_token_ids=(11,), min_tokens=6, repetition_penalty=1.2,
                                                  presence_penalty=0.5, frequency_penalty=0.25, logprobs=3),
                                   delivered=4, eos_token_ids=(2, 999), llmapi=fake)
    assert (sp.end_id, sp.pad_id, sp.stop_token_ids, sp.include_stop_str_in_output, sp.ignore_eos) == (2, 2, [11, 999], True, False)
    assert (sp.max_tokens, sp.min_tokens, sp.temperature, sp.top_k, sp.top_p, sp.min_p, sp.seed) == (16, 2, 0.7, 40, 0.9, 0.05, 7)
    assert (sp.repetition_penalty, sp.presence_penalty, sp.frequency_penalty, sp.logprobs, sp.detokenize) == (1.2, 0.5, 0.25, 3, False)
    plain = translate.sampling_params(SamplingParams(max_tokens=5, temperature=0, ignore_eos=True), 0, (2, 999), fake)
    assert (plain.stop_token_ids, plain.ignore_eos, plain.top_k, plain.min_p, plain.min_tokens, plain.seed, plain.logprobs) == \
        (None, True, None, None, None, None, None)
    # Unseeded, TensorRT-LLM would seed every request with 0: each gets a seed of its own.
    seeds = {translate.sampling_params(SamplingParams(temperature=1.0), 0, (2,), fake).seed for _ in range(5)}
    assert len(seeds) == 5 and None not in seeds


# Streaming, finish reasons, abort


def test_streamed_deltas_become_one_output_per_request_per_step(trtllm, hf_dir):
    engine = trtllm(hf_dir)
    engine.submit("a", [100], SamplingParams(max_tokens=6, temperature=0))
    engine.submit("b", [500, 600], SamplingParams(max_tokens=4, temperature=0))
    time.sleep(0.2)  # every token is streamed before the worker steps
    outs = engine.step()
    assert sorted((o.request_id, o.new_token_ids, o.finish_reason, o.prompt_tokens) for o in outs) == [
        ("a", [101, 102, 103, 104, 105, 106], "length", 1), ("b", [601, 602, 603, 604], "length", 2)]
    assert not engine.has_work() and engine.step() == []


def test_finish_reasons(trtllm, hf_dir):
    engine = trtllm(hf_dir)
    engine.submit("end", [0], SamplingParams(max_tokens=9, temperature=0))  # 1, then the end token 2
    engine.submit("ignore", [0], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    engine.submit("eos2", [996], SamplingParams(max_tokens=9, temperature=0))  # the model's second end token
    engine.submit("stop", [40], SamplingParams(max_tokens=9, temperature=0, stop_token_ids=(43,)))
    engine.submit("min", [40], SamplingParams(max_tokens=9, temperature=0, stop_token_ids=(41, 43), min_tokens=2))
    engine.submit("length", [40], SamplingParams(max_tokens=2, temperature=0))
    got = {rid: r[:3] for rid, r in drain(engine).items()}
    assert got == {
        "end": [[1, 2], "stop", None],  # the fake leaves the end token out; the engine puts it back
        "ignore": [[1, 2, 3, 4], "length", None],
        "eos2": [[997, 998, 999], "stop", None],
        "stop": [[41, 42, 43], "stop", None],
        "min": [[41, 42, 43], "stop", None],
        "length": [[41, 42], "length", None],
    }
    assert [translate.finish(r) for r in ("stop", "length", "timeout", "cancelled", None, "not_finished")] == [
        ("stop", None), ("length", None), (None, "DEADLINE_EXCEEDED"), (None, "CANCELLED"), (None, "INTERNAL"), (None, "INTERNAL")]


def test_close_ends_a_task_that_swallows_its_first_cancellation(trtllm, hf_dir):
    """asyncio.wait_for on Python 3.11 can swallow a cancellation (its inner await done in
    the same loop iteration), as the stats reader's may when a record lands at shutdown:
    close() cancels such a task again instead of waiting SUBMIT_TIMEOUT and failing."""
    engine = trtllm(hf_dir)
    swallowed = []

    async def stubborn():
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            swallowed.append(True)
        await asyncio.sleep(3600)

    asyncio.run_coroutine_threadsafe(stubborn(), engine._loop)
    while not any(t.get_coro().__name__ == "stubborn" for t in asyncio.all_tasks(engine._loop)):
        time.sleep(0.01)
    start = time.monotonic()
    engine.close()
    assert swallowed == [True] and time.monotonic() - start < 5 and engine._loop.is_closed()


def test_abort_cancels_in_trtllm_and_returns_nothing_more(trtllm, hf_dir):
    engine = trtllm(hf_dir)
    engine.submit("x", [100], SamplingParams(max_tokens=500, temperature=0, ignore_eos=True))
    engine.submit("y", [300], SamplingParams(max_tokens=3, temperature=0))
    while not any(o.request_id == "x" and o.new_token_ids for o in engine.step()):
        pass
    held = engine._live["x"].result
    assert engine.abort("x") and not engine.abort("x")
    got = drain(engine)
    assert list(got) in (["y"], []) and "x" not in got
    executor = fake.LLM.created[-1].executor
    deadline = time.monotonic() + 5
    while held.request_id not in executor.aborted or engine._held:
        assert time.monotonic() < deadline, "TensorRT-LLM was never told, or never confirmed"
        time.sleep(0.01)
    assert held.outputs[0].finish_reason == "cancelled"
    engine.submit("x", [7], SamplingParams(max_tokens=2, temperature=0))  # its id is free at once
    assert drain(engine) == {"x": [[8, 9], "length", None, None]}


def test_a_request_trtllm_cancels_or_fails_ends_with_an_error(trtllm, hf_dir, monkeypatch):
    engine = trtllm(hf_dir)
    engine.submit("c", [100], SamplingParams(max_tokens=500, temperature=0, ignore_eos=True))
    fake.LLM.created[-1].executor.abort(engine._live["c"].result)  # cancelled by TensorRT-LLM, not by us
    assert drain(engine)["c"][1:3] == [None, "CANCELLED"]

    def refuse(self, request_id, prompt_token_ids, params, output_token_ids=()):
        raise RequestError("INVALID_ARGUMENT", "no room", "prompt")

    monkeypatch.setattr(fake.ScriptedSource, "submit", refuse)
    engine.submit("f", [1], SamplingParams(max_tokens=2))
    tokens, reason, code, message = drain(engine)["f"]
    assert (tokens, reason, code) == ([], None, "INTERNAL") and "no room" in message


def test_generate_async_refusals_are_request_errors(trtllm, hf_dir, monkeypatch):
    engine = trtllm(hf_dir, enable_chunked_prefill=False, max_num_tokens=64)
    with pytest.raises(RequestError) as e:
        engine.submit("long", list(range(100)), SamplingParams(max_tokens=2))
    assert (e.value.code, e.value.field) == ("INVALID_ARGUMENT", "prompt_token_ids")
    llm = fake.LLM.created[-1]
    monkeypatch.setattr(llm, "generate_async", lambda *a, **k: (_ for _ in ()).throw(ValueError("beam width too large")))
    with pytest.raises(RequestError) as e:
        engine.submit("v", [1], SamplingParams(max_tokens=2))
    assert e.value.code == "INVALID_ARGUMENT" and "beam width too large" in e.value.message
    monkeypatch.undo()
    llm.shutdown()
    with pytest.raises(RequestError) as e:
        engine.submit("s", [1], SamplingParams(max_tokens=2))
    assert e.value.code == "UNAVAILABLE" and "shutting down" in e.value.message
    assert not engine.has_work()


def test_step_waits_briefly_when_nothing_came(trtllm, hf_dir, monkeypatch):
    from worker.trtllm.engine import STEP_WAIT

    engine = trtllm(hf_dir)
    monkeypatch.setattr(fake.ScriptedSource, "step_seconds", 0.5)
    engine.submit("slow", [10], SamplingParams(max_tokens=1, temperature=0))
    t0 = time.monotonic()
    assert engine.step() == []
    assert STEP_WAIT * 0.9 <= time.monotonic() - t0 < STEP_WAIT + 0.2
    assert drain(engine) == {"slow": [[11], "length", None, None]}


# Stats and logprobs


def test_iteration_stats_reach_engine_stats(trtllm, hf_dir):
    engine = trtllm(hf_dir, kv_cache=KvCacheConfig(tokens_per_block=16))
    assert engine.stats().kv_blocks_total == fake.ScriptedSource.num_blocks  # known from the warm-up, before any request
    for i in range(3):
        engine.submit(f"r{i}", list(range(1, 40)), SamplingParams(max_tokens=100, temperature=0, ignore_eos=True))
    deadline = time.monotonic() + 5
    while engine.stats().kv_blocks_in_use < 9:  # 3 requests of 40 tokens and more, 16 to a block
        assert time.monotonic() < deadline
        engine.step()
    stats = engine.stats()
    assert (stats.running + stats.queued, stats.tokens_per_block) == (3, 16)
    assert stats.kv_blocks_in_use + stats.kv_blocks_free == stats.kv_blocks_total
    for i in range(3):
        engine.abort(f"r{i}")
    deadline = time.monotonic() + 5
    while engine.stats().kv_blocks_in_use:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert engine.stats().running == 0


# From the trtllm-serve documentation's example record (docs/source/commands/trtllm-serve).
RECORD = {"gpuMemUsage": 76665782272, "iter": 154, "iterLatencyMS": 7.0, "numActiveRequests": 3, "numQueuedRequests": 1,
          "kvCacheStats": {"allocNewBlocks": 3126, "allocTotalBlocks": 3126, "cacheHitRate": 0.00128, "freeNumBlocks": 101253,
                           "maxNumBlocks": 101256, "missedBlocks": 3121, "reusedBlocks": 4, "tokensPerBlock": 32,
                           "usedNumBlocks": 3}}


def test_stats_record_parsing():
    s = translate.engine_stats(RECORD, live=4, held=True, tokens_per_block=16)
    assert (s.running, s.queued, s.kv_blocks_total, s.kv_blocks_free, s.kv_blocks_in_use) == (3, 1, 101256, 101253, 3)
    assert (s.blocks_reused, s.prefix_cache_hit_rate, s.tokens_per_block, s.preemptions, s.kv_blocks_cached) == (4, 0.00128, 32, 0, 0)
    assert translate.engine_stats(json.dumps(RECORD), 4, True, 16) == s
    lagging = translate.engine_stats(RECORD, live=1, held=False, tokens_per_block=16)  # two finished since the record
    assert (lagging.running, lagging.queued, lagging.kv_blocks_in_use, lagging.kv_blocks_free) == (1, 0, 0, 101256)
    none = translate.engine_stats(None, live=2, held=True, tokens_per_block=16)
    assert (none.running, none.queued, none.kv_blocks_total, none.tokens_per_block) == (0, 2, 0, 16)


def test_logprobs_translation(trtllm, hf_dir):
    Lp = fake.Logprob
    got = translate.token_logprobs([5, 9], [{5: Lp(-0.1, 1), 6: Lp(-2.5, 2)}, {7: Lp(-0.2, 1), 8: Lp(-1.0, 2), 9: Lp(-4.0, 6)}], 2)
    assert [(t.token_id, t.logprob, t.top) for t in got] == [(5, -0.1, [(5, -0.1), (6, -2.5)]), (9, -4.0, [(7, -0.2), (8, -1.0)])]
    assert [(t.token_id, t.logprob, t.top) for t in translate.token_logprobs([3], [-0.75], 1)] == [(3, -0.75, [])]
    assert translate.token_logprobs([3], [{4: Lp(-0.1, 1)}], 1)[0].logprob == -math.inf
    engine = trtllm(hf_dir)
    engine.submit("lp", [10], SamplingParams(max_tokens=3, temperature=0, logprobs=2))
    results = []
    while engine.has_work():
        for o in engine.step():
            results += o.logprobs or []
    assert [(t.token_id, t.top) for t in results] == [(11, [(11, -0.5), (12, -1.5)]), (12, [(12, -0.5), (13, -1.5)]),
                                                      (13, [(13, -0.5), (14, -1.5)])]


# Errors where TensorRT-LLM or a GPU is missing, and choosing the engine


def test_without_tensorrt_llm_one_error_says_what_to_install(monkeypatch, hf_dir):
    monkeypatch.setitem(sys.modules, "tensorrt_llm", None)  # import fails as where it is not installed
    from worker.trtllm.engine import TrtllmEngine

    with pytest.raises(EngineConfigError) as e:
        TrtllmEngine(EngineConfig(model=str(hf_dir)))
    assert "pip install 'inflight[trtllm]'" in str(e.value) and "docker compose --profile trtllm" in str(e.value)


def test_without_a_gpu_or_enough_of_them_one_error(monkeypatch, hf_dir):
    fake.install(monkeypatch)
    from worker.trtllm.engine import TrtllmEngine

    monkeypatch.setattr("worker.trtllm.engine.visible_gpus", lambda: 0)
    with pytest.raises(EngineConfigError, match="needs an NVIDIA GPU"):
        TrtllmEngine(EngineConfig(model=str(hf_dir)))
    monkeypatch.setattr("worker.trtllm.engine.visible_gpus", lambda: 2)
    with pytest.raises(EngineConfigError, match="tensor_parallel_size 4: 2 GPU"):
        TrtllmEngine(EngineConfig(model=str(hf_dir), tensor_parallel_size=4))
    with pytest.raises(EngineConfigError, match="device 'cpu'"):
        TrtllmEngine(EngineConfig(model=str(hf_dir), device="cpu"))
    assert fake.LLM.created == []


def test_the_worker_chooses_its_engine(monkeypatch, hf_dir, tmp_path):
    from testing.engine_double import InstantEngine
    from worker.main import WorkerConfig, load_engine
    from worker.trtllm.engine import TrtllmEngine

    assert isinstance(load_engine(WorkerConfig(engine="testing.engine_double:InstantEngine")), InstantEngine)
    with pytest.raises(EngineConfigError, match="embedded, trtllm or module:Class"):
        load_engine(WorkerConfig(engine="tensorrt"))
    with pytest.raises(EngineConfigError, match="tensor_parallel_size"):
        load_engine(WorkerConfig(engine="embedded", engine_config=EngineConfig(tensor_parallel_size=2)))
    # A worker process where tensorrt_llm cannot be imported (a package that refuses, first on
    # its path): one line, exit 2. A process of its own: the worker registers its metrics.
    shadow = tmp_path / "shadow" / "tensorrt_llm"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shadow.parent), str(ROOT)])}
    res = subprocess.run([sys.executable, "-m", "cli", "worker", "--engine", "trtllm", "--model", str(hf_dir),
                          "--metrics-port", "0"], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "Traceback" not in res.stderr, res.stderr[-2000:]
    assert [line for line in res.stderr.splitlines() if line.startswith("inflight worker: error: --engine trtllm needs TensorRT-LLM")]
    fake.install(monkeypatch)
    monkeypatch.setattr("worker.trtllm.engine.visible_gpus", lambda: 1)
    engine = load_engine(WorkerConfig(engine="trtllm", engine_config=EngineConfig(model=str(hf_dir))))
    assert isinstance(engine, TrtllmEngine)
    engine.close()
