"""The contract every engine serves: the embedded PyTorch engine and TensorRT-LLM's.

The worker loop drives an engine only through `Engine`: submit, abort, step, stats.
Knob names follow TensorRT-LLM (`KvCacheConfig`, `SchedulerConfig`, `max_num_tokens`...)
so that one `EngineConfig` maps onto both engines.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Protocol

from inflight.sampling_params import SamplingParams

CapacityPolicy = Literal["GUARANTEED_NO_EVICT", "MAX_UTILIZATION"]
FinishReason = Literal["stop", "length"]


@dataclasses.dataclass
class KvCacheConfig:
    free_gpu_memory_fraction: float = dataclasses.field(default=0.9, metadata={"help": "share of the GPU memory left free after loading the weights that the KV cache takes"})
    tokens_per_block: int = dataclasses.field(default=32, metadata={"help": "tokens per KV cache block"})
    enable_block_reuse: bool = dataclasses.field(default=True, metadata={"help": "keep finished prompts' blocks for reuse by later requests with the same prefix"})
    max_tokens: int | None = dataclasses.field(default=None, metadata={"help": "cap on the tokens the KV cache holds"})
    cpu_bytes: int = dataclasses.field(default=512 * 2**20, metadata={"help": "KV cache size in bytes when running on the CPU"})


@dataclasses.dataclass
class SchedulerConfig:
    capacity_scheduler_policy: CapacityPolicy = dataclasses.field(default="GUARANTEED_NO_EVICT", metadata={"help": "admit only what can finish (GUARANTEED_NO_EVICT) or admit greedily and preempt (MAX_UTILIZATION)"})


@dataclasses.dataclass
class EngineConfig:
    model: str | None = dataclasses.field(default=None, metadata={"help": "Hugging Face layout model directory; unset means the built-in SmolLM2-135M-Instruct"})
    device: str = dataclasses.field(default="auto", metadata={"help": "auto, cpu, cuda or cuda:N"})
    dtype: str = dataclasses.field(default="auto", metadata={"help": "auto (float32 on CPU, bfloat16 on CUDA), float32, bfloat16 or float16"})
    kv_cache: KvCacheConfig = dataclasses.field(default_factory=KvCacheConfig)
    scheduler: SchedulerConfig = dataclasses.field(default_factory=SchedulerConfig)
    enable_chunked_prefill: bool = dataclasses.field(default=True, metadata={"help": "split long prompts across steps so decodes keep flowing"})
    max_batch_size: int = dataclasses.field(default=256, metadata={"help": "requests running at once"})
    max_num_tokens: int = dataclasses.field(default=8192, metadata={"help": "tokens one engine step computes at most, prefill and decode together"})
    attention: Literal["auto", "triton", "reference"] = dataclasses.field(default="auto", metadata={"help": "auto (Triton kernels on CUDA, the PyTorch reference elsewhere), triton or reference"})
    overlap_scheduler: Literal["auto", "on", "off"] = dataclasses.field(default="auto", metadata={"help": "prepare and launch step N+1 while the device runs step N: auto turns it on for CUDA (on the CPU nothing runs asynchronously, so it would only delay each token by a step)"})
    cuda_graphs: bool = dataclasses.field(default=True, metadata={"help": "replay decode steps from captured CUDA graphs (CUDA only)"})
    max_seq_len: int | None = dataclasses.field(default=None, metadata={"help": "prompt plus output tokens at most; unset means the model's limit"})


@dataclasses.dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the request's top-n alternatives, best first


@dataclasses.dataclass
class RequestOutput:
    """What one step produced for one request: new tokens, and how it ended if it did."""

    request_id: str
    new_token_ids: list[int]
    finish_reason: FinishReason | None = None
    logprobs: list[TokenLogprob] | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens served from the prefix cache
    error_code: str | None = None  # a gRPC status name when the request failed
    error_message: str | None = None
    scheduled_at: float | None = None  # unix time the engine first ran the request

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None or self.error_code is not None


@dataclasses.dataclass
class EngineStats:
    running: int
    queued: int
    kv_blocks_total: int
    kv_blocks_free: int  # free or evictable (cached but unreferenced)
    kv_blocks_in_use: int
    kv_blocks_cached: int  # blocks holding a reusable prefix
    blocks_reused: int  # blocks handed to a request straight from the prefix cache
    blocks_evicted: int
    prefix_cache_hit_rate: float  # prompt tokens served from cache / prompt tokens seen
    preemptions: int
    tokens_per_block: int
    # Forward passes so far by how they ran: a replayed CUDA graph (decode-only batches)
    # or eagerly (any prompt tokens, or no graphs). A growing eager share means more steps
    # carry prefill, each slower than a graph replay; engines that cannot tell leave 0.
    steps_graph: int = 0
    steps_eager: int = 0


class Engine(Protocol):
    vocab_size: int
    max_seq_len: int
    eos_token_ids: tuple[int, ...]

    def submit(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Queue a request; raises RequestError naming the field when it is invalid."""

    def abort(self, request_id: str) -> bool:
        """Drop a request and free its KV blocks; False if the engine does not hold it."""

    def step(self) -> list[RequestOutput]:
        """Run one iteration; every request that produced tokens or ended appears once."""

    def has_work(self) -> bool: ...

    def stats(self) -> EngineStats: ...

    def kv_events(self) -> tuple[list[int], list[int]]:
        """Prefix-block hashes (inflight.prefix_hash) stored and evicted since last asked."""
