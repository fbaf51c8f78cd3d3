"""The worker process: one per GPU (or one on the CPU). It registers with the scheduler,
takes submissions and aborts between engine steps, runs the engine, and sends one
TokenBatch per step per gateway carrying every new token."""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import socket
import time

import msgspec
import zmq

from inflight import schema, telemetry
from inflight.errors import DEADLINE_EXCEEDED, INTERNAL, RequestError
from inflight.http_endpoints import serve_http
from inflight.process import run_until_signalled
from worker.engine_api import Engine, EngineConfig, RequestOutput
from worker.metrics import WorkerMetrics
from models.config import served_model_name
from worker.tracing import RequestTrace

log = logging.getLogger("inflight.worker")

HELLO_INTERVAL = 5.0  # seconds between re-announcements to the scheduler


@dataclasses.dataclass
class WorkerConfig:
    scheduler_address: str = dataclasses.field(default="tcp://127.0.0.1:5558", metadata={"help": "the scheduler's ZeroMQ address for workers"})
    worker_id: str = dataclasses.field(default="", metadata={"help": "name in logs, traces and routing; unset means host-pid"})
    backend: str = dataclasses.field(default="embedded", metadata={"help": "embedded, or module:Class of another Engine implementation"})
    served_model_name: str = dataclasses.field(default="", metadata={"help": "name clients use for the model; unset means the model directory's name"})
    heartbeat_interval: float = dataclasses.field(default=0.5, metadata={"help": "seconds between heartbeats with engine stats"})
    metrics_port: int = dataclasses.field(default=9402, metadata={"help": "HTTP port for /metrics, /health and /ready; 0 means off"})
    engine: EngineConfig = dataclasses.field(default_factory=EngineConfig, metadata={"flatten": True})


def load_engine(config: WorkerConfig) -> Engine:
    if config.backend == "embedded":
        from worker.embedded.engine import EmbeddedEngine

        return EmbeddedEngine(config.engine)
    module, _, attr = config.backend.partition(":")
    if not attr:
        raise SystemExit(f"error: --backend must be 'embedded' or module:Class, got {config.backend!r}")
    return getattr(importlib.import_module(module), attr)(config.engine)


def model_name(config: WorkerConfig, engine: Engine) -> str:
    if config.served_model_name:
        return config.served_model_name
    model_dir = getattr(engine, "model_dir", None) or config.engine.model
    return served_model_name(model_dir) if model_dir else "default"


class Worker:
    def __init__(self, config: WorkerConfig, engine: Engine, worker_id: str, metrics: WorkerMetrics, tracing: bool):
        self.config = config
        self.engine = engine
        self.worker_id = worker_id
        self.model = model_name(config, engine)
        self.metrics = metrics
        self.tracing = tracing
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, worker_id.encode())
        self.sock.setsockopt(zmq.LINGER, 0)
        schema.no_drop(self.sock)
        self.sock.connect(config.scheduler_address)
        self.owner: dict[str, bytes] = {}  # request id -> owning gateway identity
        self.deadlines: dict[str, float] = {}  # request id -> unix time nobody waits past
        self.traces: dict[str, RequestTrace] = {}
        self.running = True
        self._next_heartbeat = 0.0
        self._next_hello = 0.0

    def hello(self) -> None:
        """Announce the worker. Repeated every few seconds, so that a restarted scheduler
        (or one that declared this worker dead) registers it again."""
        self._next_hello = time.monotonic() + HELLO_INTERVAL
        stats = self.engine.stats()
        self.sock.send(schema.encode(schema.WorkerHello(
            worker_id=self.worker_id, model=self.model, max_seq_len=self.engine.max_seq_len,
            vocab_size=self.engine.vocab_size, tokens_per_block=stats.tokens_per_block,
            kv_blocks_total=stats.kv_blocks_total, max_batch_size=self.config.engine.max_batch_size,
        )))

    def heartbeat(self) -> None:
        s = self.engine.stats()
        stored, removed = self.engine.kv_events()
        stats = schema.WorkerStats(
            running=s.running, queued=s.queued, kv_blocks_total=s.kv_blocks_total, kv_blocks_free=s.kv_blocks_free,
            kv_blocks_in_use=s.kv_blocks_in_use, kv_blocks_cached=s.kv_blocks_cached, blocks_reused=s.blocks_reused,
            blocks_evicted=s.blocks_evicted, prefix_cache_hit_rate=s.prefix_cache_hit_rate, preemptions=s.preemptions,
        )
        self.sock.send(schema.encode(schema.Heartbeat(self.worker_id, stats, stored, removed)))
        self.metrics.update(s)
        self._next_heartbeat = time.monotonic() + self.config.heartbeat_interval

    def handle(self, raw: bytes, out: dict[bytes, list[schema.TokenItem]]) -> None:
        try:
            msg = schema.scheduler_to_worker.decode(raw)
        except msgspec.DecodeError as e:
            log.error("undecodable message from the scheduler: %s", e)
            return
        if isinstance(msg, schema.Submit):
            try:
                self.engine.submit(msg.request_id, msg.prompt_token_ids, msg.params)
            except RequestError as e:
                out.setdefault(msg.gateway, []).append(
                    schema.TokenItem(msg.request_id, [], error_code=e.code, error_message=e.message))
                return
            self.owner[msg.request_id] = msg.gateway
            if msg.deadline is not None:
                self.deadlines[msg.request_id] = msg.deadline
            if self.tracing:
                self.traces[msg.request_id] = RequestTrace(msg.traceparent, msg.model, msg.params.max_tokens)
            self.metrics.submitted.inc()
        else:
            for rid in msg.request_ids:
                self.drop(rid, "CANCELLED", "aborted")

    def drop(self, rid: str, code: str, message: str) -> None:
        self.engine.abort(rid)
        self.owner.pop(rid, None)
        self.deadlines.pop(rid, None)
        rt = self.traces.pop(rid, None)
        if rt:
            rt.finish(self.worker_id, None, code, message)

    def expire(self, out: dict[bytes, list[schema.TokenItem]]) -> None:
        """Drop requests whose deadline passed (their gateway may be gone too)."""
        now = time.time()
        for rid in [r for r, d in self.deadlines.items() if d <= now]:
            gateway = self.owner.get(rid)
            self.drop(rid, DEADLINE_EXCEEDED, "deadline passed in the worker")
            if gateway is not None:
                out.setdefault(gateway, []).append(
                    schema.TokenItem(rid, [], error_code=DEADLINE_EXCEEDED, error_message="deadline passed in the worker"))

    def deliver(self, o: RequestOutput, out: dict[bytes, list[schema.TokenItem]]) -> int:
        """Queue an output for its gateway; returns the tokens it carries (the caller
        counts a step's tokens in one metric update)."""
        gateway = self.owner.get(o.request_id)
        if gateway is None:
            return 0
        lps = None
        if o.logprobs:
            lps = [schema.TokenLogprobMsg(lp.token_id, lp.logprob, lp.top) for lp in o.logprobs]
        out.setdefault(gateway, []).append(schema.TokenItem(
            o.request_id, o.new_token_ids, o.finish_reason, o.error_code, o.error_message, o.prompt_tokens, o.cached_tokens, lps))
        n = len(o.new_token_ids)
        rt = self.traces.get(o.request_id) if self.tracing else None
        if rt is not None and n:
            if rt.first_token_ns is None:
                rt.first_output(o.scheduled_at, o.prompt_tokens, o.cached_tokens)
            rt.tokens += n
        if o.finished:
            del self.owner[o.request_id]
            self.deadlines.pop(o.request_id, None)
            self.metrics.finished.labels(o.finish_reason or "error").inc()
            self.metrics.prompt_tokens.inc(o.prompt_tokens)
            self.metrics.cached_tokens.inc(o.cached_tokens)
            if rt:
                del self.traces[o.request_id]
                rt.finish(self.worker_id, o.finish_reason, o.error_code, o.error_message or "", o.prompt_tokens, o.cached_tokens)
        return n

    def step(self) -> list[RequestOutput]:
        try:
            return self.engine.step()
        except Exception:  # an engine bug must not take every request down silently
            log.exception("engine step failed; failing its requests")
            failed = [RequestOutput(rid, [], error_code=INTERNAL, error_message="engine step failed") for rid in self.owner]
            for o in failed:
                self.engine.abort(o.request_id)
            return failed

    def run(self) -> None:
        self.hello()
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        while self.running:
            out: dict[bytes, list[schema.TokenItem]] = {}
            busy = self.engine.has_work()
            timeout = 0 if busy else max(0, self._next_heartbeat - time.monotonic()) * 1000
            if poller.poll(timeout):
                while True:  # take everything that arrived before this step
                    try:
                        raw = self.sock.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self.handle(raw, out)
            if self.engine.has_work():
                # one counter update a step, not one a request: each takes a lock (0.3-0.5 µs)
                self.metrics.generated_tokens.inc(sum(self.deliver(o, out) for o in self.step()))
            heartbeat_due = time.monotonic() >= self._next_heartbeat
            if heartbeat_due:
                self.expire(out)
            for gateway, items in out.items():
                self.sock.send(schema.encode(schema.TokenBatch(items, gateway)))
            if heartbeat_due:
                self.heartbeat()
                if time.monotonic() >= self._next_hello:
                    self.hello()
        self.sock.close()


def run(config: WorkerConfig) -> None:
    worker_id = config.worker_id or f"{socket.gethostname()}-{os.getpid()}"
    tracing = telemetry.setup_tracing("inflight-worker", **{"inflight.worker_id": worker_id})
    metrics = WorkerMetrics()
    worker: Worker | None = None
    serve_http("", config.metrics_port, ready=lambda: worker is not None)  # /health answers while the model loads
    engine = load_engine(config)
    worker = Worker(config, engine, worker_id, metrics, tracing)
    log.info("worker %s serving %s, scheduler at %s", worker.worker_id, worker.model, config.scheduler_address)
    run_until_signalled(worker)
