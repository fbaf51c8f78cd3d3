"""Every message between gateway, scheduler and worker (ZeroMQ, msgspec MessagePack).

Sockets (inflight/sockets.py): the scheduler binds a ROUTER for gateways and a ROUTER for
workers; gateways and workers connect DEALERs with their own identity. Read this file to
know the protocol.

    gateway  --GatewayHello/Submit/Abort-->  scheduler  --Submit/Abort-->  worker
    gateway  <--ModelsInfo/TokenBatch-----   scheduler  <--WorkerHello/Heartbeat/TokenBatch/Leaving--  worker
                                             scheduler  --Reannounce-->  worker

One type per message from where it is made to where it leaves a process: the engine
itself emits `RequestOutput` and `EngineStats`, which travel as they are.
"""

from __future__ import annotations

import msgspec

from inflight.sampling_params import SamplingParams


class TokenLogprob(msgspec.Struct, array_like=True):
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the request's top-n alternatives, best first


class RequestOutput(msgspec.Struct, array_like=True, omit_defaults=True):
    """What one engine step produced for one request: new tokens, and its end if it ended.
    Engines emit it; workers send it on in a TokenBatch; the gateway turns it into text."""

    request_id: str
    new_token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length"
    error_code: str | None = None  # a gRPC status name when the request failed
    error_message: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens served from the prefix cache
    logprobs: list[TokenLogprob] | None = None
    scheduled_at: float | None = None  # unix time the engine first ran the request; on its first output only

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None or self.error_code is not None


class EngineStats(msgspec.Struct):
    """An engine's counters, as it reports them; workers send them in every heartbeat."""

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
    # Forward passes so far by how they ran: a replayed CUDA graph or eagerly (a step
    # larger than every graph, or no graphs); engines that cannot tell leave 0.
    steps_graph: int = 0
    steps_eager: int = 0
    # GPU kernels compiled after the engine reported ready, each a step it held up.
    kernel_compiles_late: int = 0


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
    # Tokens the client already has, when the scheduler moves a request whose worker died
    # or stalled: the new worker continues after them.
    output_token_ids: list[int] = []


class Abort(msgspec.Struct, tag=True):
    request_ids: list[str]


class Reannounce(msgspec.Struct, tag=True):
    """To a worker the scheduler does not know (it restarted, or had taken the worker for
    lost): say hello now rather than at the next periodic hello."""


# scheduler -> gateway


class ModelInfo(msgspec.Struct):
    name: str
    max_seq_len: int
    vocab_size: int
    workers: int


class ModelsInfo(msgspec.Struct, tag=True):
    """The scheduler's answer to every gateway hello: also how a gateway knows it is there."""

    models: list[ModelInfo]
    scheduler: str = ""  # new at every scheduler start: a gateway whose requests the new one never knew ends them


class TokenBatch(msgspec.Struct, tag=True):
    """One engine step's outputs for the requests of one gateway (or scheduler errors)."""

    items: list[RequestOutput]
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
    incarnation: str = ""  # new at every process start: a worker restarted under the same id is told apart


class Leaving(msgspec.Struct, tag=True):
    """A worker told to stop: first `gone=False` (route nothing new here; what it holds
    finishes), then `gone=True` as it exits (move whatever it still held)."""

    worker_id: str
    gone: bool = False


class Heartbeat(msgspec.Struct, tag=True):
    worker_id: str
    stats: EngineStats
    # Prefix-cache changes since the last heartbeat, for routing by prefix affinity.
    stored_hashes: list[int] = []
    removed_hashes: list[int] = []


GatewayToScheduler = GatewayHello | Submit | Abort
SchedulerToGateway = ModelsInfo | TokenBatch
SchedulerToWorker = Submit | Abort | Reannounce
WorkerToScheduler = WorkerHello | Heartbeat | TokenBatch | Leaving

_encoder = msgspec.msgpack.Encoder()
encode = _encoder.encode
gateway_to_scheduler = msgspec.msgpack.Decoder(GatewayToScheduler)
scheduler_to_gateway = msgspec.msgpack.Decoder(SchedulerToGateway)
scheduler_to_worker = msgspec.msgpack.Decoder(SchedulerToWorker)
worker_to_scheduler = msgspec.msgpack.Decoder(WorkerToScheduler)


def error_output(request_id: str, code: str, message: str) -> RequestOutput:
    """The end of a request that failed, with its gRPC status name."""
    return RequestOutput(request_id, [], error_code=code, error_message=message)
