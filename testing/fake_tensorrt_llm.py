"""FakeTensorRTLLM: a TEST DOUBLE of the part of TensorRT-LLM 1.2's LLM API that
worker/trtllm/ uses, for machines without TensorRT-LLM or a GPU (such as the ones the
tests run on). Nothing in the product imports it: install() puts it in sys.modules as
`tensorrt_llm`, `tensorrt_llm.llmapi` and `tensorrt_llm._tensorrt_engine`.

What it copies from the 1.2 sources that worker/trtllm/engine.py lists, because the adapter
depends on it:
- LLM(model, ..., **kwargs) refuses an argument its backend does not take ("LLM got invalid
  argument: ..."): LLM is the PyTorch backend (TorchLlmArgs), _tensorrt_engine.LLM the
  TensorRT one, which lacks the PyTorch backend's own arguments (TORCH_ONLY);
- generate_async needs end_id when skip_tokenizer_init (there is no tokenizer to find it),
  refuses a prompt over max_num_tokens with chunked prefill off (ValueError), and raises
  RuntimeError("LLM is shutting down") after shutdown();
- a result made where no asyncio loop runs cannot be iterated with `async for`
  (AssertionError), nor can the stats of an LLM whose first request was made so;
- streaming: every response updates outputs[0] (token_ids grows; token_ids_diff and
  logprobs_diff are the new part; logprobs are dicts of token id to Logprob(logprob, rank));
  `finished`, finish_reason and stop_reason come with the last: "stop" for the end token
  (END_ID) or a stop token (STOP_WORDS; stop_reason is the id, cut from the output unless
  include_stop_str_in_output), "length", and "cancelled" after abort();
- SamplingParams, KvCacheConfig, SchedulerConfig are keyword-only and refuse unknown names;
  an unset seed is seed 0 (the C++ runtime's default); no temperature, top_k or top_p is greedy;
- get_stats_async(timeout): the LLM's one IterationResult, yielding records as dicts
  (numActiveRequests, numQueuedRequests, kvCacheStats{maxNumBlocks, freeNumBlocks,
  usedNumBlocks, tokensPerBlock, reusedBlocks, cacheHitRate, ...}), done after `timeout`
  seconds without one until the next generate_async; the PyTorch backend records nothing
  unless enable_iter_perf_stats.
What it chooses where the sources leave it open: the end token is left out of the output
(the adapter copes with either); responses come from an executor thread of its own.

Tokens come from any object that serves our Engine contract, the LLM's `source`:
ScriptedSource (no model; each request counts up from its last prompt token) unless
install() is given `make_source`, e.g. one building our embedded engine, so that the engine
contract suite runs the adapter over a real model.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import json
import queue
import sys
import threading
import time
import types
from collections import OrderedDict
from pathlib import Path
from typing import Callable, List, Optional, Union

from inflight.errors import RequestError
from inflight.sampling_params import SamplingParams as OurSamplingParams
from inflight.schema import EngineStats, RequestOutput as OurOutput, TokenLogprob

__version__ = "1.2.0-fake"


class CapacitySchedulerPolicy(enum.StrEnum):
    MAX_UTILIZATION = "MAX_UTILIZATION"
    GUARANTEED_NO_EVICT = "GUARANTEED_NO_EVICT"
    STATIC_BATCH = "STATIC_BATCH"


@dataclasses.dataclass(kw_only=True)
class KvCacheConfig:
    enable_block_reuse: bool = True
    max_tokens: Optional[int] = None
    max_attention_window: Optional[List[int]] = None
    sink_token_length: Optional[int] = None
    free_gpu_memory_fraction: Optional[float] = 0.9
    host_cache_size: Optional[int] = None
    onboard_blocks: bool = True
    cross_kv_cache_fraction: Optional[float] = None
    secondary_offload_min_priority: Optional[int] = None
    event_buffer_max_size: int = 0
    enable_partial_reuse: bool = True
    copy_on_partial_reuse: bool = True
    use_uvm: bool = False
    dtype: str = "auto"
    tokens_per_block: int = 32

    def __post_init__(self):
        if self.free_gpu_memory_fraction is not None and not 0 <= self.free_gpu_memory_fraction <= 1:
            raise ValueError(f"free_gpu_memory_fraction must be in [0, 1], got {self.free_gpu_memory_fraction}")


@dataclasses.dataclass(kw_only=True)
class SchedulerConfig:
    capacity_scheduler_policy: CapacitySchedulerPolicy = CapacitySchedulerPolicy.GUARANTEED_NO_EVICT
    context_chunking_policy: Optional[str] = None
    dynamic_batch_config: Optional[object] = None

    def __post_init__(self):
        self.capacity_scheduler_policy = CapacitySchedulerPolicy(self.capacity_scheduler_policy)


@dataclasses.dataclass(kw_only=True)
class SamplingParams:
    end_id: Optional[int] = None
    pad_id: Optional[int] = None
    max_tokens: int = 32
    bad: Optional[Union[str, List[str]]] = None
    bad_token_ids: Optional[List[int]] = None
    stop: Optional[Union[str, List[str]]] = None
    stop_token_ids: Optional[List[int]] = None
    include_stop_str_in_output: bool = False
    embedding_bias: Optional[object] = None
    logits_processor: Optional[object] = None
    apply_batched_logits_processor: bool = False
    n: int = 1
    best_of: Optional[int] = None
    use_beam_search: bool = False
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    top_p_min: Optional[float] = None
    top_p_reset_ids: Optional[int] = None
    top_p_decay: Optional[float] = None
    seed: Optional[int] = None
    temperature: Optional[float] = None
    min_tokens: Optional[int] = None
    beam_search_diversity_rate: Optional[float] = None
    repetition_penalty: Optional[float] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    length_penalty: Optional[float] = None
    early_stopping: Optional[int] = None
    no_repeat_ngram_size: Optional[int] = None
    min_p: Optional[float] = None
    beam_width_array: Optional[List[int]] = None
    logprobs: Optional[int] = None
    prompt_logprobs: Optional[int] = None
    return_context_logits: bool = False
    return_generation_logits: bool = False
    exclude_input_from_output: bool = True
    return_encoder_output: bool = False
    return_perf_metrics: bool = False
    additional_model_outputs: Optional[List[str]] = None
    lookahead_config: Optional[object] = None
    guided_decoding: Optional[object] = None
    ignore_eos: bool = False
    detokenize: bool = True
    add_special_tokens: bool = True
    truncate_prompt_tokens: Optional[int] = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True


@dataclasses.dataclass
class Logprob:
    logprob: float
    rank: Optional[int] = None


@dataclasses.dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: List[int] = dataclasses.field(default_factory=list)
    cumulative_logprob: Optional[float] = None
    logprobs: list = dataclasses.field(default_factory=list)
    finish_reason: Optional[str] = None
    stop_reason: Optional[Union[int, str]] = None
    _last_token_ids_len: int = 0
    _last_logprobs_len: int = 0

    @property
    def length(self) -> int:
        return len(self.token_ids)

    @property
    def token_ids_diff(self) -> List[int]:
        return self.token_ids[self._last_token_ids_len:]

    @property
    def logprobs_diff(self) -> list:
        return self.logprobs[self._last_logprobs_len:]


@dataclasses.dataclass
class _Response:
    """One executor response: new tokens, and on the last, why it ended."""

    tokens: list[int]
    logprobs: list | None = None
    cached_tokens: int = 0
    final: bool = False
    reason: str | None = None  # END_ID, STOP_WORDS, LENGTH, CANCELLED
    error: str | None = None


NO_LOOP = "The asyncio event loop was not present during initialization, so async operations are not available."


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class _LoopQueue:
    """Put from any thread, get on the loop the owner was made on (or nowhere: no loop)."""

    def __init__(self, loop):
        self.loop = loop
        self.q = asyncio.Queue() if loop else queue.Queue()

    def put(self, item) -> None:
        if self.loop is None:
            self.q.put(item)
            return
        try:
            self.loop.call_soon_threadsafe(self.q.put_nowait, item)
        except RuntimeError:  # its loop is closed: nobody is listening
            pass


class RequestOutput:
    """One request's result, as generate_async returns it."""

    def __init__(self, llm: "LLM", request_id: int, prompt_token_ids: list[int], sampling_params: SamplingParams,
                 streaming: bool):
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.sampling_params = sampling_params
        self.outputs = [CompletionOutput(0)]
        self.finished = False
        self.cached_tokens = 0
        self._llm = llm
        self._streaming = streaming
        self._aborted = False
        self._queue = _LoopQueue(_running_loop())

    def abort(self) -> None:
        self._llm.executor.abort(self)
        self._aborted = True

    def aborted(self) -> bool:
        return self._aborted

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.finished:
            raise StopAsyncIteration
        assert self._queue.loop is not None, NO_LOOP
        self._handle(await self._queue.q.get())
        return self

    def _handle(self, r: _Response) -> None:
        if r.error:
            raise RuntimeError(r.error)  # as the result's error handler raises a per-request error
        out = self.outputs[0]
        out._last_token_ids_len = len(out.token_ids)
        out.token_ids.extend(r.tokens)
        if r.logprobs is not None:
            out._last_logprobs_len = len(out.logprobs)
            out.logprobs += r.logprobs
        self.cached_tokens = r.cached_tokens
        if not r.final:
            return
        self.finished = True
        sp = self.sampling_params
        if r.reason == "END_ID":
            out.finish_reason = "stop"
        elif r.reason == "STOP_WORDS":
            out.finish_reason, out.stop_reason = "stop", out.token_ids[-1]
            if not sp.include_stop_str_in_output:
                out.token_ids = out.token_ids[:-1]
        elif r.reason == "LENGTH":
            out.finish_reason = "length"
        elif r.reason == "CANCELLED":
            out.finish_reason = "cancelled"


class IterationResult:
    """The LLM's one source of iteration-stats records (get_stats_async)."""

    def __init__(self):
        self._done = False
        self._timeout = 2.0
        self._queue = _LoopQueue(_running_loop())

    def set_timeout(self, timeout: float) -> None:
        self._timeout = timeout

    def mark_undone(self) -> None:
        self._done = False

    def __aiter__(self):
        return self

    async def __anext__(self) -> dict:
        if self._done:
            raise StopAsyncIteration
        assert self._queue.loop is not None, NO_LOOP
        try:
            data = await asyncio.wait_for(self._queue.q.get(), self._timeout)
        except asyncio.TimeoutError:
            self._done = True
            raise StopAsyncIteration from None
        return json.loads(data)


async def _no_stats():
    if False:  # an empty async generator, as the real one before any request
        yield


# The TorchLlmArgs / TrtLlmArgs fields this double accepts: those of 1.2's llm_args.py that
# a worker might pass, not all of them.
COMMON_ARGS = {
    "kv_cache_config", "scheduler_config", "enable_chunked_prefill", "max_batch_size", "max_num_tokens",
    "max_seq_len", "max_beam_width", "gather_generation_logits", "iter_stats_max_iterations",
    "request_stats_max_iterations", "return_perf_metrics", "pipeline_parallel_size", "context_parallel_size",
    "gpus_per_node", "enable_attention_dp", "enable_lora", "lora_config", "guided_decoding_backend",
    "speculative_config", "num_postprocess_workers", "postprocess_tokenizer_dir", "backend", "peft_cache_config",
}
TORCH_ONLY = {
    "enable_iter_perf_stats", "enable_iter_req_stats", "disable_overlap_scheduler", "cuda_graph_config",
    "stream_interval", "print_iter_log", "attn_backend", "sampler_type", "moe_config", "load_format",
    "garbage_collection_gen0_threshold", "torch_compile_config", "batch_wait_timeout_ms",
}
TRT_ONLY = {"build_config", "batching_type", "normalize_log_probs", "extended_runtime_perf_knob_config",
            "fast_build", "enable_build_cache", "calib_config", "quant_config", "embedding_parallel_mode"}


class LLM:
    """tensorrt_llm.LLM, the PyTorch backend, over `make_source(llm)` (ScriptedSource unset)."""

    accepts = COMMON_ARGS | TORCH_ONLY
    make_source: Callable[["LLM"], object] | None = None
    created: list["LLM"] = []  # every one made, for tests to look into

    def __init__(self, model, tokenizer=None, tokenizer_mode="auto", skip_tokenizer_init=False,
                 trust_remote_code=False, tensor_parallel_size=1, dtype="auto", revision=None,
                 tokenizer_revision=None, **kwargs):
        for key in kwargs:
            if key not in self.accepts:
                raise ValueError(f"{type(self).__name__} got invalid argument: {key}")
        self.model = model
        self.skip_tokenizer_init = skip_tokenizer_init
        self.args = {"tensor_parallel_size": tensor_parallel_size, "dtype": dtype, **kwargs}
        self.kv_cache_config = self._kv_cache(kwargs.get("kv_cache_config") or KvCacheConfig())
        self.records_stats = kwargs.get("enable_iter_perf_stats", False)
        self.source = (type(self).make_source or ScriptedSource)(self)
        self._shut_down = False
        self._stats: IterationResult | None = None
        self._next_id = 1
        self.executor = _Executor(self)
        LLM.created.append(self)

    def _kv_cache(self, asked: KvCacheConfig) -> KvCacheConfig:
        return asked

    def generate_async(self, inputs, sampling_params: SamplingParams | None = None, lora_request=None,
                       prompt_adapter_request=None, streaming: bool = False, kv_cache_retention_config=None,
                       disaggregated_params=None, _postproc_params=None, scheduling_params=None,
                       cache_salt=None) -> RequestOutput:
        if self._shut_down:
            raise RuntimeError("LLM is shutting down")
        sp = sampling_params if sampling_params is not None else SamplingParams()
        if not isinstance(sp, SamplingParams):
            raise TypeError(f"The sampling_params must be type SamplingParams or None, but got {type(sp)}")
        if sp.end_id is None and self.skip_tokenizer_init:
            raise ValueError("tokenizer is required to reset end_id if it is None, or you can explicitly specify the end_id for sampling_params")
        prompt = inputs["prompt_token_ids"] if isinstance(inputs, dict) else inputs
        if isinstance(prompt, str) or not prompt or not all(isinstance(t, int) for t in prompt):
            raise TypeError(f"The inputs must be type str or list of int, but got {type(inputs)}")
        max_num_tokens = self.args.get("max_num_tokens") or 8192
        if not self.args.get("enable_chunked_prefill", False) and len(prompt) > max_num_tokens:
            raise ValueError(f"The sum of prompt length ({len(prompt)}), query length (0) should not exceed "
                             f"max_num_tokens ({max_num_tokens})")
        if self._stats is None:
            self._stats = IterationResult()
        else:
            self._stats.mark_undone()
        result = RequestOutput(self, self._next_id, list(prompt), sp, streaming)
        self._next_id += 1
        self.executor.submit(result)
        return result

    def get_stats_async(self, timeout: float | None = 2):
        if self._stats is None:
            return _no_stats()
        self._stats.set_timeout(timeout)
        return self._stats

    def shutdown(self) -> None:
        self._shut_down = True
        self.executor.stop()


class _TrtLLM(LLM):
    """tensorrt_llm._tensorrt_engine.LLM: a prebuilt engine directory; it records stats always."""

    accepts = COMMON_ARGS | TRT_ONLY

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.records_stats = True

    def _kv_cache(self, asked: KvCacheConfig) -> KvCacheConfig:
        """The block size is the one the engine was built with (its config.json)."""
        build = json.loads((Path(self.model) / "config.json").read_text())["build_config"]
        built = (build.get("plugin_config") or {}).get("tokens_per_block") or build.get("tokens_per_block")
        return dataclasses.replace(asked, tokens_per_block=built) if built else asked


class _Executor:
    """TensorRT-LLM's executor side: a thread that steps the source and answers each
    request from there, as the real executor answers from its own thread."""

    def __init__(self, llm: LLM):
        self.llm = llm
        self.source = llm.source
        self.cond = threading.Condition()
        self.inbox: list[tuple[str, RequestOutput]] = []
        self.running: dict[str, RequestOutput] = {}  # source id -> result
        self.aborted: list[int] = []  # request ids abort() reached, for tests
        self.iteration = 0
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="fake-trtllm-executor", daemon=True)
        self.thread.start()

    def submit(self, result: RequestOutput) -> None:
        with self.cond:
            self.inbox.append(("submit", result))
            self.cond.notify()

    def abort(self, result: RequestOutput) -> None:
        with self.cond:
            self.inbox.append(("abort", result))
            self.cond.notify()

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify()
        self.thread.join(10)

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.inbox and not self.source.has_work() and not self.stopping:
                    self.cond.wait()
                if self.stopping:
                    return
                inbox, self.inbox = self.inbox, []
            for kind, result in inbox:
                if kind == "submit":
                    self._start(result)
                else:
                    self._cancel(result)
            if self.source.has_work():
                for out in self.source.step():
                    self._answer(out)
            self.iteration += 1
            if self.llm.records_stats and self.llm._stats is not None:
                self.llm._stats._queue.put(json.dumps(self._record()))

    def _start(self, result: RequestOutput) -> None:
        key = str(result.request_id)
        try:
            self.source.submit(key, result.prompt_token_ids, _source_params(result.sampling_params))
        except RequestError as e:
            result._queue.put(_Response([], final=True, error=f"request failed: {e.message}"))
            return
        self.running[key] = result

    def _cancel(self, result: RequestOutput) -> None:
        self.aborted.append(result.request_id)
        key = str(result.request_id)
        if self.running.pop(key, None) is not None:
            self.source.abort(key)
            result._queue.put(_Response([], final=True, reason="CANCELLED"))

    def _answer(self, out: OurOutput) -> None:
        result = self.running.get(out.request_id)
        if result is None:
            return
        sp = result.sampling_params
        tokens = list(out.new_token_ids)
        logprobs = [_logprob_dict(lp) for lp in out.logprobs] if sp.logprobs and out.logprobs else None
        r = _Response(tokens, logprobs, out.cached_tokens)
        if out.finished:
            del self.running[out.request_id]
            r.final = True
            if out.error_code:
                r.error = f"{out.error_code}: {out.error_message}"
            elif out.finish_reason == "length":
                r.reason = "LENGTH"
            elif tokens and tokens[-1] == sp.end_id and not sp.ignore_eos:
                r.reason = "END_ID"
                del tokens[-1:]  # this double's choice: the end token is not output
                if logprobs:
                    del logprobs[-1:]
            else:
                r.reason = "STOP_WORDS"
        if r.final or result._streaming:
            result._queue.put(r)

    def _record(self) -> dict:
        s: EngineStats = self.source.stats()
        return {
            "iter": self.iteration,
            "iterLatencyMS": 0.0,
            "numActiveRequests": s.running,
            "numQueuedRequests": s.queued,
            "maxNumActiveRequests": self.llm.args.get("max_batch_size", 2048),
            "kvCacheStats": {
                "maxNumBlocks": s.kv_blocks_total, "freeNumBlocks": s.kv_blocks_free, "usedNumBlocks": s.kv_blocks_in_use,
                "tokensPerBlock": s.tokens_per_block, "allocTotalBlocks": 0, "allocNewBlocks": 0,
                "reusedBlocks": s.blocks_reused, "missedBlocks": 0, "cacheHitRate": s.prefix_cache_hit_rate,
            },
            "inflightBatchingStats": {"numScheduledRequests": s.running, "numContextRequests": 0,
                                      "numGenRequests": s.running, "numPausedRequests": 0, "numCtxTokens": 0},
        }


def _source_params(sp: SamplingParams) -> OurSamplingParams:
    """What TensorRT-LLM's sampler would do, in our source's terms. The source never stops
    on its own end tokens: TensorRT-LLM stops on end_id and the stop tokens it is given."""
    greedy = sp.temperature is None and sp.top_k is None and sp.top_p is None
    stop = list(sp.stop_token_ids or []) + ([] if sp.ignore_eos else [sp.end_id])
    return OurSamplingParams(
        max_tokens=sp.max_tokens,
        temperature=0.0 if greedy else (1.0 if sp.temperature is None else sp.temperature),
        top_k=sp.top_k or 0,
        top_p=1.0 if sp.top_p is None else sp.top_p,
        min_p=sp.min_p or 0.0,
        seed=sp.seed if sp.seed is not None else 0,
        stop_token_ids=tuple(dict.fromkeys(stop)),
        ignore_eos=True,
        min_tokens=sp.min_tokens or 0,
        repetition_penalty=1.0 if sp.repetition_penalty is None else sp.repetition_penalty,
        presence_penalty=sp.presence_penalty or 0.0,
        frequency_penalty=sp.frequency_penalty or 0.0,
        logprobs=sp.logprobs or 0,
    )


def _logprob_dict(lp: TokenLogprob) -> dict:
    ranked = {t: Logprob(v, i + 1) for i, (t, v) in enumerate(lp.top)}
    ranked.setdefault(lp.token_id, Logprob(lp.logprob, len(lp.top) + 1))
    return ranked


class ScriptedSource:
    """A model-free token source with our Engine contract: a request's i-th token is its
    last prompt token + 1 + i (mod `vocab_size`); each step gives one to each of the first
    max_batch_size requests; it stops on a stop token id, at max_tokens, or on abort. Its
    KV cache: `num_blocks` blocks, a request holding one per tokens_per_block of its tokens."""

    vocab_size = 1000
    num_blocks = 64
    step_seconds = 0.002  # a step's time, so that a test can act between its tokens

    def __init__(self, llm: LLM):
        self.max_batch_size = llm.args.get("max_batch_size") or 8
        self.tokens_per_block = llm.kv_cache_config.tokens_per_block
        self.requests: OrderedDict[str, list] = OrderedDict()  # id -> [prompt, params, produced]

    def submit(self, request_id, prompt_token_ids, params, output_token_ids=()) -> None:
        self.requests[request_id] = [list(prompt_token_ids), params, []]

    def abort(self, request_id) -> bool:
        return self.requests.pop(request_id, None) is not None

    def has_work(self) -> bool:
        return bool(self.requests)

    def step(self) -> list[OurOutput]:
        time.sleep(self.step_seconds)
        outputs = []
        for rid, (prompt, p, produced) in list(self.requests.items())[: self.max_batch_size]:
            token = (prompt[-1] + 1 + len(produced)) % self.vocab_size
            produced.append(token)
            out = OurOutput(rid, [token], prompt_tokens=len(prompt))
            if p.logprobs:
                top = [((token + i) % self.vocab_size, -0.5 - i) for i in range(p.logprobs)]
                out.logprobs = [TokenLogprob(token, -0.5, top)]
            if len(produced) >= p.min_tokens and token in p.stop_token_ids:
                out.finish_reason = "stop"
            elif len(produced) >= p.max_tokens:
                out.finish_reason = "length"
            if out.finish_reason:
                del self.requests[rid]
            outputs.append(out)
        return outputs

    def stats(self) -> EngineStats:
        n = len(self.requests)
        running = min(n, self.max_batch_size)
        used = sum(-(-(len(pr) + len(out)) // self.tokens_per_block) for pr, _, out in self.requests.values())
        return EngineStats(running, n - running, self.num_blocks, self.num_blocks - used, used, 0, 0, 0, 0.0, 0,
                           self.tokens_per_block)

    def kv_events(self):
        return [], []


def install(monkeypatch, make_source: Callable[[LLM], object] | None = None) -> types.ModuleType:
    """Make `import tensorrt_llm` (and .llmapi, ._tensorrt_engine) find this double for the
    life of `monkeypatch`; tokens come from `make_source(llm)`, ScriptedSource if None."""
    this = sys.modules[__name__]
    package = types.ModuleType("tensorrt_llm")
    package.__version__ = __version__
    package.__path__ = []  # a package, so that its submodules import
    package.LLM, package.SamplingParams, package.llmapi = LLM, SamplingParams, this
    engine_module = types.ModuleType("tensorrt_llm._tensorrt_engine")
    engine_module.LLM = _TrtLLM
    package._tensorrt_engine = engine_module
    monkeypatch.setitem(sys.modules, "tensorrt_llm", package)
    monkeypatch.setitem(sys.modules, "tensorrt_llm.llmapi", this)
    monkeypatch.setitem(sys.modules, "tensorrt_llm._tensorrt_engine", engine_module)
    monkeypatch.setattr(LLM, "make_source", make_source)
    monkeypatch.setattr(LLM, "created", [])
    return this
