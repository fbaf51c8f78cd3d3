"""Our types to TensorRT-LLM 1.2's and back, as pure functions: EngineConfig to the LLM's
arguments, our SamplingParams to theirs, a CompletionOutput's finish reason and logprobs
to ours, an iteration-stats record to EngineStats. The field names are those of the 1.2
sources listed at the top of engine.py; `llmapi` is the `tensorrt_llm.llmapi` module."""

from __future__ import annotations

import json
import math
import secrets

from inflight import errors
from inflight.sampling_params import SamplingParams
from inflight.schema import EngineStats, TokenLogprob
from worker.engine_api import EngineConfig
from worker.trtllm.model_dir import ModelDir


def llm_kwargs(config: EngineConfig, model: ModelDir, llmapi) -> dict:
    """Keyword arguments for `LLM(model_dir, **kwargs)`. Knobs left unset keep TensorRT-LLM's
    own defaults (max_num_tokens 8192; max_seq_len from the model or the built engine)."""
    kv = config.kv_cache
    kv_args = {"free_gpu_memory_fraction": kv.free_gpu_memory_fraction, "enable_block_reuse": kv.enable_block_reuse}
    if model.format == "hf":  # a built engine's block size was fixed by trtllm-build
        kv_args["tokens_per_block"] = kv.tokens_per_block
    if kv.max_tokens is not None:
        kv_args["max_tokens"] = kv.max_tokens
    if kv.dtype != "auto":  # fp8: the same name in KvCacheConfig.dtype
        kv_args["dtype"] = kv.dtype
    policy = llmapi.CapacitySchedulerPolicy[config.scheduler.capacity_scheduler_policy]
    kwargs = {
        "skip_tokenizer_init": True,  # token ids in and out: the gateway tokenizes
        "tensor_parallel_size": config.tensor_parallel_size,
        "dtype": config.dtype,  # auto, float16, bfloat16, float32: the same names
        "kv_cache_config": llmapi.KvCacheConfig(**kv_args),
        "scheduler_config": llmapi.SchedulerConfig(capacity_scheduler_policy=policy),
        "enable_chunked_prefill": config.enable_chunked_prefill,
        "max_batch_size": config.max_batch_size,
    }
    if config.max_num_tokens is not None:
        kwargs["max_num_tokens"] = config.max_num_tokens
    if config.max_seq_len is not None:
        kwargs["max_seq_len"] = config.max_seq_len
    if model.format == "hf":  # the PyTorch backend's own arguments (TorchLlmArgs); the TensorRT backend refuses them
        kwargs["enable_iter_perf_stats"] = True  # else get_stats_async yields nothing
        if config.overlap_scheduler == "off":
            kwargs["disable_overlap_scheduler"] = True
        if not config.cuda_graphs:
            kwargs["cuda_graph_config"] = None
    return kwargs


def sampling_params(p: SamplingParams, delivered: int, eos_token_ids: tuple[int, ...], llmapi):
    """TensorRT-LLM's SamplingParams for a request that already produced `delivered` tokens
    (given back to it as part of the prompt). Without a tokenizer TensorRT-LLM needs the end
    token named; a model's further end tokens become stop tokens. A stop token stays in the
    output (include_stop_str_in_output), as the embedded engine keeps it."""
    stop_ids = list(p.stop_token_ids) + ([] if p.ignore_eos else list(eos_token_ids[1:]))
    if p.seed is not None:
        seed = p.seed
    elif not p.greedy:
        seed = secrets.randbits(63)  # unset, TensorRT-LLM seeds every request with 0: all would draw alike
    else:
        seed = None
    return llmapi.SamplingParams(
        end_id=eos_token_ids[0],
        pad_id=eos_token_ids[0],
        max_tokens=p.max_tokens - delivered,
        min_tokens=max(p.min_tokens - delivered, 0) or None,
        temperature=p.temperature,
        top_k=p.top_k or None,
        top_p=p.top_p,
        min_p=p.min_p or None,
        seed=seed,
        repetition_penalty=p.repetition_penalty,
        presence_penalty=p.presence_penalty,
        frequency_penalty=p.frequency_penalty,
        stop_token_ids=stop_ids or None,
        include_stop_str_in_output=True,
        ignore_eos=p.ignore_eos,
        logprobs=p.logprobs or None,
        detokenize=False,
    )


def finish(reason: str | None) -> tuple[str | None, str | None]:
    """(our finish_reason, our error code) for a CompletionOutput.finish_reason."""
    if reason in ("stop", "length"):
        return reason, None
    if reason == "timeout":
        return None, errors.DEADLINE_EXCEEDED
    if reason == "cancelled":  # one we did not abort (ours are never reported)
        return None, errors.CANCELLED
    return None, errors.INTERNAL


def token_logprobs(token_ids: list[int], entries: list, n: int) -> list[TokenLogprob]:
    """Our per-token logprobs from CompletionOutput.logprobs_diff: each entry a dict of
    token id to Logprob(logprob, rank) (the top n, plus the sampled token where it was not
    among them), or a bare float for the sampled token alone."""
    out = []
    for token, entry in zip(token_ids, entries):
        if isinstance(entry, dict):
            ranked = sorted(entry.items(), key=lambda kv: (kv[1].rank if kv[1].rank is not None else math.inf, -kv[1].logprob))
            chosen = entry[token].logprob if token in entry else -math.inf
            out.append(TokenLogprob(token, chosen, [(t, lp.logprob) for t, lp in ranked[:n]]))
        else:
            out.append(TokenLogprob(token, float(entry), []))
    return out


def engine_stats(iteration: dict | str | None, live: int, held: bool, tokens_per_block: int) -> EngineStats:
    """EngineStats from TensorRT-LLM's latest iteration-stats record (get_stats_async). The
    record lags: `live` (requests we hold) is the truth for how many there are, which the
    record only splits into running and queued; with nothing `held` by TensorRT-LLM (every
    stream ended) no KV block is in use, whatever the last record said. Counters it does
    not keep (preemptions, evictions, cached blocks) read 0; its hit rate counts blocks."""
    if isinstance(iteration, str):
        iteration = json.loads(iteration)
    iteration = iteration or {}
    kv = iteration.get("kvCacheStats") or {}
    total = kv.get("maxNumBlocks", 0)
    free = kv.get("freeNumBlocks", total)
    used = kv.get("usedNumBlocks", total - free)
    if not held:
        used, free = 0, total
    running = min(iteration.get("numActiveRequests", 0), live)
    return EngineStats(
        running=running,
        queued=live - running,
        kv_blocks_total=total,
        kv_blocks_free=free,
        kv_blocks_in_use=used,
        kv_blocks_cached=0,
        blocks_reused=kv.get("reusedBlocks", 0),
        blocks_evicted=0,
        prefix_cache_hit_rate=kv.get("cacheHitRate", 0.0),
        preemptions=0,
        tokens_per_block=kv.get("tokensPerBlock") or tokens_per_block,
    )
