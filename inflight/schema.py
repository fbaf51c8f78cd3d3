"""Every message between gateway, scheduler and worker (ZeroMQ, msgspec MessagePack).

Sockets: the scheduler binds a ROUTER for gateways and a ROUTER for workers; gateways and
workers connect DEALERs with their own identity. Read this file to know the protocol.

    gateway  --GatewayHello/Submit/Abort-->  scheduler  --Submit/Abort-->  worker
    gateway  <--ModelsInfo/TokenBatch-----   scheduler  <--WorkerHello/Heartbeat/TokenBatch--  worker
"""

from __future__ import annotations

import msgspec

from inflight.sampling_params import SamplingParams


class TokenLogprobMsg(msgspec.Struct, array_like=True):
    token_id: int
    logprob: float
    top: list[tuple[int, float]]


class TokenItem(msgspec.Struct, array_like=True, omit_defaults=True):
    """New tokens of one request from one engine step, and its end if it ended."""

    request_id: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length"
    error_code: str | None = None  # a gRPC status name
    error_message: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    logprobs: list[TokenLogprobMsg] | None = None


# gateway -> scheduler -> worker


class GatewayHello(msgspec.Struct, tag=True):
    gateway_id: str


class Submit(msgspec.Struct, tag=True, omit_defaults=True):
    request_id: str  # unique across the fleet: "<gateway id>/<n>"
    model: str
    prompt_token_ids: list[int]
    params: SamplingParams
    traceparent: str | None = None  # W3C trace context
    deadline: float | None = None  # unix time after which nobody wants the answer
    gateway: bytes = b""  # the owning gateway's identity, set by the scheduler


class Abort(msgspec.Struct, tag=True):
    request_ids: list[str]


# scheduler -> gateway


class ModelInfo(msgspec.Struct):
    name: str
    max_seq_len: int
    vocab_size: int
    workers: int


class ModelsInfo(msgspec.Struct, tag=True):
    models: list[ModelInfo]


class TokenBatch(msgspec.Struct, tag=True):
    """One engine step's tokens for the requests of one gateway (or scheduler errors)."""

    items: list[TokenItem]
    gateway: bytes = b""  # set by the worker so the scheduler knows where to relay


# worker -> scheduler


class WorkerHello(msgspec.Struct, tag=True):
    worker_id: str
    model: str
    max_seq_len: int
    vocab_size: int
    tokens_per_block: int
    kv_blocks_total: int
    max_batch_size: int


class WorkerStats(msgspec.Struct):
    running: int
    queued: int
    kv_blocks_total: int
    kv_blocks_free: int
    kv_blocks_in_use: int
    kv_blocks_cached: int
    blocks_reused: int
    blocks_evicted: int
    prefix_cache_hit_rate: float
    preemptions: int


class Heartbeat(msgspec.Struct, tag=True):
    worker_id: str
    stats: WorkerStats
    # Prefix-cache changes since the last heartbeat, for routing by prefix affinity.
    stored_hashes: list[int] = []
    removed_hashes: list[int] = []


GatewayToScheduler = GatewayHello | Submit | Abort
SchedulerToGateway = ModelsInfo | TokenBatch
SchedulerToWorker = Submit | Abort
WorkerToScheduler = WorkerHello | Heartbeat | TokenBatch

def no_drop(sock) -> None:
    """No high-water mark: a ROUTER past it drops messages silently, and a lost token batch
    or terminal event would leave a stream hanging. Memory stays bounded by what the open
    requests produce."""
    import zmq

    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)


_encoder = msgspec.msgpack.Encoder()
encode = _encoder.encode
gateway_to_scheduler = msgspec.msgpack.Decoder(GatewayToScheduler)
scheduler_to_gateway = msgspec.msgpack.Decoder(SchedulerToGateway)
scheduler_to_worker = msgspec.msgpack.Decoder(SchedulerToWorker)
worker_to_scheduler = msgspec.msgpack.Decoder(WorkerToScheduler)
