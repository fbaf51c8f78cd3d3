"""TrtllmEngine: the Engine contract (worker/engine_api.py) over TensorRT-LLM's LLM API.

Written against TensorRT-LLM 1.2's LLM API, as read in NVIDIA/TensorRT-LLM (sources of the
1.1-1.2 line; not checked against the tagged v1.2.0 tree, and never run here: README.md,
"TensorRT-LLM", says what has been):
  tensorrt_llm/llmapi/llm.py            LLM(model, skip_tokenizer_init, tensor_parallel_size, dtype,
                                        **kwargs), which refuses arguments its backend lacks;
                                        generate_async(inputs, sampling_params, streaming=True);
                                        get_stats_async(timeout); end_id required without a tokenizer
  tensorrt_llm/_tensorrt_engine/__init__.py   the LLM for prebuilt engine directories (_TrtLLM)
  tensorrt_llm/llmapi/llm_args.py       KvCacheConfig, SchedulerConfig, CapacitySchedulerPolicy,
                                        TorchLlmArgs (enable_iter_perf_stats, disable_overlap_scheduler,
                                        cuda_graph_config)
  tensorrt_llm/sampling_params.py       SamplingParams
  tensorrt_llm/executor/result.py       RequestOutput: async iteration (only for a result made on a
                                        running asyncio loop), outputs[0].token_ids_diff, logprobs_diff,
                                        finish_reason, stop_reason; abort(); cached_tokens; IterationResult
  tensorrt_llm/executor/executor.py     get_stats_async's one IterationResult: it stops after `timeout`
                                        seconds without a record, until the next generate_async
  docs/source/commands/trtllm-serve     the iteration-stats record (numActiveRequests, kvCacheStats...)

How the two meet: TensorRT-LLM runs its own iterations and streams results over asyncio; the
worker loop is synchronous. This engine runs one asyncio loop in a thread of its own, and
every TensorRT-LLM call after the constructor happens on it. Each request's stream is a task
there that turns responses into deltas; the deltas of one loop turn reach the worker as one
batch through a thread-safe queue. step() waits at most STEP_WAIT for the next batch, so a
worker holding requests neither spins on the CPU TensorRT-LLM's own Python needs nor stops
taking submissions and aborts, and merges what it takes into one output per request.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import sys
import threading
import time
from typing import Sequence

from inflight import errors
from inflight.errors import RequestError, invalid
from inflight.sampling_params import SamplingParams
from inflight.schema import EngineStats, RequestOutput, TokenLogprob
from inflight.validation import check_request
from models.locate import locate_model
from worker.engine_api import EngineConfig, EngineConfigError
from worker.trtllm import translate
from worker.trtllm.model_dir import read_model_dir

log = logging.getLogger(__name__)

STEP_WAIT = 0.05  # seconds step() waits for output: the longest the worker's intake waits on it
SUBMIT_TIMEOUT = 30.0  # generate_async only queues the request; longer means TensorRT-LLM is stuck
START_TIMEOUT = 600.0  # the warm-up request at start
CANCEL_AGAIN = 0.1  # seconds close() gives cancelled tasks before cancelling those still running again
STATS_TIMEOUT, STATS_RETRY = 2.0, 0.5  # stats iterator's wait for a record; pause before asking again
DEFAULT_MAX_NUM_TOKENS = 8192  # TensorRT-LLM's, where EngineConfig leaves it unset
INSTALL = ("pip install 'inflight[trtllm]' (TensorRT-LLM 1.2; Linux with an NVIDIA GPU and its CUDA driver), or run "
           "the worker in NVIDIA's TensorRT-LLM release container: docker compose --profile trtllm up")


def import_llmapi():
    """`tensorrt_llm.llmapi`, or one error that says what to install."""
    try:
        import tensorrt_llm.llmapi as llmapi
    except (ImportError, OSError) as e:  # OSError: a CUDA library it links against is missing
        raise EngineConfigError(f"--engine trtllm needs TensorRT-LLM, which cannot be imported here ({e}): {INSTALL}") from None
    version = getattr(sys.modules.get("tensorrt_llm"), "__version__", "unknown")
    if not str(version).startswith("1.2"):
        log.warning("TensorRT-LLM %s: this engine was written against 1.2's LLM API", version)
    return llmapi


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count()


def check_devices(config: EngineConfig) -> None:
    if config.device not in ("auto", "cuda", "cuda:0"):
        raise EngineConfigError(f"device {config.device!r}: --engine trtllm runs on the GPUs CUDA_VISIBLE_DEVICES shows "
                                f"(device auto or cuda); choose them there")
    gpus = visible_gpus()
    if gpus == 0:
        raise EngineConfigError(f"--engine trtllm needs an NVIDIA GPU and none is visible here (check the driver and "
                                f"CUDA_VISIBLE_DEVICES); without one, use --engine embedded. {INSTALL}")
    if not 1 <= config.tensor_parallel_size <= gpus:
        raise EngineConfigError(f"tensor_parallel_size {config.tensor_parallel_size}: {gpus} GPU(s) visible")


@dataclasses.dataclass(eq=False)
class _Stream:
    """One request as this engine holds it. `result` (TensorRT-LLM's RequestOutput) is
    touched on the loop thread only."""

    request_id: str
    prompt_tokens: int
    logprobs: int
    result: object = None
    last_token: int | None = None
    aborted: bool = False


@dataclasses.dataclass
class _Delta:
    stream: _Stream
    tokens: list[int]
    logprobs: list[TokenLogprob] | None = None
    cached_tokens: int = 0
    finish_reason: str | None = None
    error_code: str | None = None
    error_message: str | None = None


class TrtllmEngine:
    def __init__(self, config: EngineConfig):
        if config.quantization != "none":  # the LLM API quantizes through a checkpoint, not a flag
            raise EngineConfigError(f"--quantization {config.quantization} is the embedded engine's; TensorRT-LLM serves "
                                    "a checkpoint quantized beforehand (Model Optimizer, compressed-tensors) as it is")
        llmapi = import_llmapi()
        check_devices(config)
        self.config = config
        self.model_dir = locate_model(config.model)
        self.model = read_model_dir(self.model_dir)
        self.vocab_size = self.model.vocab_size
        self.eos_token_ids = self.model.eos_token_ids
        self.max_seq_len = min(config.max_seq_len or self.model.max_seq_len, self.model.max_seq_len)
        self.max_num_tokens = config.max_num_tokens or DEFAULT_MAX_NUM_TOKENS
        self.tokens_per_block = self.model.tokens_per_block or config.kv_cache.tokens_per_block
        self._llmapi = llmapi
        if self.model.format == "engine":
            from tensorrt_llm._tensorrt_engine import LLM
        else:
            LLM = llmapi.LLM
        self._live: dict[str, _Stream] = {}  # worker thread only
        self._batches: queue.SimpleQueue[list[_Delta]] = queue.SimpleQueue()
        self._pending: list[_Delta] = []  # loop thread: this loop turn's deltas
        self._held = 0  # loop thread writes: streams TensorRT-LLM has not ended yet, aborted ones too
        self._iteration: dict | None = None  # the latest iteration-stats record, replaced whole
        self._tasks: set[asyncio.Task] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="trtllm-loop", daemon=True)
        self._thread.start()
        t0 = time.monotonic()
        try:
            self.llm = LLM(str(self.model_dir), **translate.llm_kwargs(config, self.model, llmapi))
        except (ValueError, TypeError) as e:  # its argument checks (pydantic's errors are ValueErrors)
            self._stop_loop()
            raise EngineConfigError(f"TensorRT-LLM refused the configuration: {e}") from None
        except BaseException:
            self._stop_loop()
            raise
        self._warm_up()
        stats = self.stats()
        log.info("TensorRT-LLM engine ready in %.1fs: %s (%s), %d KV blocks of %d tokens, tensor parallel %d",
                 time.monotonic() - t0, self.model_dir, "prebuilt engine" if self.model.format == "engine" else "checkpoint",
                 stats.kv_blocks_total, stats.tokens_per_block, config.tensor_parallel_size)

    # The Engine contract, called from the worker's thread.

    def submit(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
               output_token_ids: Sequence[int] = ()) -> None:
        """Resumed requests (`output_token_ids`) go to TensorRT-LLM as prompt plus those
        tokens, with max_tokens and min_tokens reduced by them. Penalties then count them
        as prompt, and a seeded request draws afresh: its rest differs from an undisturbed
        run's (TensorRT-LLM's sampler cannot start a seed's stream part way)."""
        if request_id in self._live:
            raise invalid("request_id", f"{request_id!r} is already in use")
        check_request(prompt_token_ids, params, self.vocab_size, self.max_seq_len, output_token_ids=output_token_ids)
        n = len(prompt_token_ids) + len(output_token_ids)
        if not self.config.enable_chunked_prefill and n > self.max_num_tokens:
            raise invalid("prompt_token_ids", f"has {n} tokens, over max_num_tokens {self.max_num_tokens} with chunked prefill off")
        if params.logprobs and self.model.format == "engine":
            raise invalid("logprobs", "not served by a prebuilt TensorRT engine here (it needs gather_generation_logits "
                                      "at build and run time); serve the Hugging Face checkpoint instead")
        sp = translate.sampling_params(params, len(output_token_ids), self.eos_token_ids, self._llmapi)
        stream = _Stream(request_id, len(prompt_token_ids), params.logprobs)
        try:
            self._call(self._start(stream, [*prompt_token_ids, *output_token_ids], sp), SUBMIT_TIMEOUT)
        except TimeoutError:
            stream.aborted = True  # should it have started after all, it is cancelled
            self._loop.call_soon_threadsafe(self._cancel, stream)
            raise RequestError(errors.UNAVAILABLE, f"TensorRT-LLM did not take the request within {SUBMIT_TIMEOUT:.0f}s") from None
        except (ValueError, TypeError) as e:  # generate_async's own checks
            raise RequestError(errors.INVALID_ARGUMENT, f"TensorRT-LLM refused it: {e}") from None
        except RuntimeError as e:  # "LLM is shutting down"
            raise RequestError(errors.UNAVAILABLE, f"TensorRT-LLM: {e}") from None
        self._live[request_id] = stream

    def abort(self, request_id: str) -> bool:
        stream = self._live.pop(request_id, None)
        if stream is None:
            return False
        stream.aborted = True  # from here on nothing of it is returned
        self._loop.call_soon_threadsafe(self._cancel, stream)
        return True

    def has_work(self) -> bool:
        return bool(self._live)

    def step(self) -> list[RequestOutput]:
        try:
            deltas = self._batches.get(timeout=STEP_WAIT)
        except queue.Empty:
            return []
        while True:
            try:
                deltas += self._batches.get_nowait()
            except queue.Empty:
                break
        outputs: dict[str, RequestOutput] = {}
        for d in deltas:
            s = d.stream
            if self._live.get(s.request_id) is not s:  # aborted, or its id since reused
                continue
            out = outputs.get(s.request_id)
            if out is None:
                out = outputs[s.request_id] = RequestOutput(s.request_id, [], prompt_tokens=s.prompt_tokens)
            out.new_token_ids += d.tokens
            if d.logprobs:
                out.logprobs = (out.logprobs or []) + d.logprobs
            out.cached_tokens = min(d.cached_tokens, s.prompt_tokens)  # its count includes resumed tokens
            if d.finish_reason or d.error_code:
                out.finish_reason, out.error_code, out.error_message = d.finish_reason, d.error_code, d.error_message
                del self._live[s.request_id]
        return list(outputs.values())

    def stats(self) -> EngineStats:
        return translate.engine_stats(self._iteration, len(self._live), self._held > 0, self.tokens_per_block)

    def kv_events(self) -> tuple[list[int], list[int]]:
        """Nothing: TensorRT-LLM's KV events are not translated into our prefix hashes, so
        the scheduler routes on its own record of the prompts it sent here."""
        return [], []

    def close(self) -> None:
        """Shut TensorRT-LLM down (its executor and any tensor-parallel ranks) and the loop."""
        if self._loop.is_closed():
            return
        self.llm.shutdown()
        try:
            self._call(self._cancel_tasks(), SUBMIT_TIMEOUT)
        finally:
            self._stop_loop()
            if not self._thread.is_alive():
                self._loop.close()

    # The loop thread.

    def _call(self, coro, timeout: float):
        """Run `coro` on the loop thread and wait for its result."""
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    async def _start(self, stream: _Stream, prompt: list[int], sp) -> None:
        stream.result = self.llm.generate_async(prompt, sampling_params=sp, streaming=True)
        self._held += 1
        if stream.aborted:
            stream.result.abort()
        task = self._loop.create_task(self._follow(stream))
        self._tasks.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self._tasks.discard)

    async def _follow(self, stream: _Stream) -> None:
        """One request's responses, as deltas, until TensorRT-LLM ends it (an aborted one
        too: its blocks are free once it says so)."""
        try:
            async for result in stream.result:
                if not stream.aborted:
                    self._delta(stream, result)
        except Exception as e:  # a request's failure inside TensorRT-LLM
            if not stream.aborted:
                log.warning("TensorRT-LLM failed request %s: %s", stream.request_id, e)
                self._push(_Delta(stream, [], error_code=errors.INTERNAL, error_message=f"TensorRT-LLM: {e}"))
        finally:
            self._held -= 1

    def _delta(self, stream: _Stream, result) -> None:
        out = result.outputs[0]
        tokens = list(out.token_ids_diff)
        logprobs = translate.token_logprobs(tokens, list(out.logprobs_diff), stream.logprobs) if stream.logprobs else None
        delta = _Delta(stream, tokens, logprobs, getattr(result, "cached_tokens", 0) or 0)
        if result.finished:
            delta.finish_reason, delta.error_code = translate.finish(out.finish_reason)
            if delta.error_code:
                delta.error_message = f"TensorRT-LLM ended it: {out.finish_reason}"
            end = self.eos_token_ids[0]
            last = tokens[-1] if tokens else stream.last_token
            if delta.finish_reason == "stop" and out.stop_reason is None and last != end:
                tokens.append(end)  # it stopped on its end token and left it out; ours end with it
        if tokens:
            stream.last_token = tokens[-1]
        if tokens or delta.finish_reason or delta.error_code:
            self._push(delta)

    def _push(self, delta: _Delta) -> None:
        if not self._pending:
            self._loop.call_soon(self._flush)  # after the other streams woken this turn
        self._pending.append(delta)

    def _flush(self) -> None:
        self._batches.put(self._pending)
        self._pending = []

    def _cancel(self, stream: _Stream) -> None:
        if stream.result is not None and not stream.result.finished:
            try:
                stream.result.abort()
            except Exception:
                log.exception("TensorRT-LLM could not abort request %s", stream.request_id)

    async def _cancel_tasks(self) -> None:
        """Cancel every task on the loop and wait for them to end. A task that swallowed its
        cancellation is cancelled again: asyncio.wait_for (Python 3.11) returns its inner
        result instead of raising when both land in the same loop iteration, as a stats
        record put just before shutdown can."""
        tasks = {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}
        while tasks:
            for t in tasks:
                t.cancel()
            _, tasks = await asyncio.wait(tasks, timeout=CANCEL_AGAIN)

    async def _start_stats(self) -> asyncio.Task:
        return self._loop.create_task(self._poll_stats())

    async def _poll_stats(self) -> None:
        """Keep the latest iteration-stats record. The iterator ends after STATS_TIMEOUT
        without a record and stays ended until the next request is submitted (executor.py),
        so it is asked again after a pause."""
        while True:
            try:
                async for record in self.llm.get_stats_async(timeout=STATS_TIMEOUT):
                    self._iteration = record
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("TensorRT-LLM's iteration stats could not be read")
                await asyncio.sleep(10 * STATS_RETRY)
            await asyncio.sleep(STATS_RETRY)

    def _warm_up(self) -> None:
        """One token through the whole path before the worker announces itself: a failure
        shows here rather than on a client's request, and the first stats record gives the
        KV cache's size for the hello."""
        self.submit("inflight-warm-up", [self.eos_token_ids[0]], SamplingParams(max_tokens=1, temperature=0))
        self._stats_task = self._call(self._start_stats(), SUBMIT_TIMEOUT)  # stats exist once a request was made
        deadline = time.monotonic() + START_TIMEOUT
        while self.has_work():
            if time.monotonic() > deadline:
                raise RuntimeError(f"TensorRT-LLM's warm-up request did not finish within {START_TIMEOUT:.0f}s")
            for out in self.step():
                if out.error_code:
                    raise RuntimeError(f"TensorRT-LLM's warm-up request failed: {out.error_message}")
        deadline = time.monotonic() + 2 * STATS_TIMEOUT
        while self._iteration is None and time.monotonic() < deadline:
            time.sleep(0.02)
        if self._iteration is None:
            log.warning("TensorRT-LLM reported no iteration stats: heartbeats and metrics carry no KV block counts")
