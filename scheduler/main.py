"""The scheduler process: owns every request's lifecycle between gateways and workers.

Admission (bounded queue), routing (prefix affinity plus load), worker registration and
heartbeats, cancellation, deadlines, and what happens when a worker goes silent. Token
batches from workers are relayed to the owning gateway unchanged."""

from __future__ import annotations

import dataclasses
import logging
import time

import msgspec
import zmq

from inflight import errors, schema, telemetry
from inflight.http_endpoints import serve_http
from inflight.process import run_until_signalled
from scheduler.admission import AdmissionQueue
from scheduler.metrics import SchedulerMetrics
from scheduler.routing import WorkerState, route_by_prefix

log = logging.getLogger("inflight.scheduler")
SCOPE = telemetry.scope_of("inflight.scheduler")


@dataclasses.dataclass
class SchedulerConfig:
    gateway_address: str = dataclasses.field(default="tcp://127.0.0.1:5557", metadata={"help": "ZeroMQ address to bind for gateways"})
    worker_address: str = dataclasses.field(default="tcp://127.0.0.1:5558", metadata={"help": "ZeroMQ address to bind for workers"})
    max_queued: int = dataclasses.field(default=1024, metadata={"help": "requests waiting for a worker at most; more get RESOURCE_EXHAUSTED"})
    worker_queue_factor: float = dataclasses.field(default=2.0, metadata={"help": "a worker holds up to this many times its max batch size"})
    worker_timeout: float = dataclasses.field(default=10.0, metadata={"help": "seconds without a heartbeat before a worker counts as dead"})
    balance_slack: int = dataclasses.field(default=16, metadata={"help": "how many more requests a prefix-holding worker may run than the least busy before load wins"})
    cache_threshold: float = dataclasses.field(default=0.5, metadata={"help": "route by prefix only when a worker holds at least this share of the prompt"})
    metrics_port: int = dataclasses.field(default=9401, metadata={"help": "HTTP port for /metrics, /health and /ready; 0 means off"})


@dataclasses.dataclass
class RequestState:
    submit: schema.Submit
    arrived: float = dataclasses.field(default_factory=time.monotonic)
    worker: bytes | None = None
    delivered: int = 0  # tokens relayed to the gateway so far
    span: telemetry.OwnSpan | telemetry.Unrecorded | None = None


class Scheduler:
    def __init__(self, config: SchedulerConfig, metrics: SchedulerMetrics | None = None, tracing: bool = False):
        self.config = config
        self.metrics = metrics or SchedulerMetrics()
        self.tracing = tracing
        self.ctx = zmq.Context.instance()
        self.front = self.ctx.socket(zmq.ROUTER)
        self.front.setsockopt(zmq.LINGER, 0)
        schema.no_drop(self.front)
        self.front.bind(config.gateway_address)
        self.back = self.ctx.socket(zmq.ROUTER)
        self.back.setsockopt(zmq.LINGER, 0)
        schema.no_drop(self.back)
        self.back.bind(config.worker_address)
        self.workers: dict[bytes, WorkerState] = {}
        self.gateways: set[bytes] = set()
        self.requests: dict[str, RequestState] = {}
        self.queue = AdmissionQueue(config.max_queued)
        self.running = True
        self._models_seen: set[str] = set()

    # Messages to gateways.

    def fail(self, submit: schema.Submit, code: str, message: str) -> None:
        state = self.requests.pop(submit.request_id, None)
        if state and state.span:
            state.span.set_error(code, message)
            state.span.end()
        if code in (errors.RESOURCE_EXHAUSTED, errors.UNAVAILABLE, errors.ALREADY_EXISTS):
            self.metrics.rejected.labels(code).inc()
        item = schema.TokenItem(submit.request_id, [], error_code=code, error_message=message)
        self.front.send_multipart([submit.gateway, schema.encode(schema.TokenBatch([item]))])

    def models_info(self) -> schema.ModelsInfo:
        models: dict[str, schema.ModelInfo] = {}
        for w in self.workers.values():
            m = models.get(w.info.model)
            if m is None:
                models[w.info.model] = schema.ModelInfo(w.info.model, w.info.max_seq_len, w.info.vocab_size, 1)
            else:
                m.workers += 1
                m.max_seq_len = min(m.max_seq_len, w.info.max_seq_len)
        return schema.ModelsInfo(list(models.values()))

    def broadcast_models(self) -> None:
        raw = schema.encode(self.models_info())
        for g in self.gateways:
            self.front.send_multipart([g, raw])

    # Gateway side.

    def on_gateway(self, identity: bytes, raw: bytes) -> None:
        try:
            msg = schema.gateway_to_scheduler.decode(raw)
        except msgspec.DecodeError as e:
            log.error("undecodable message from gateway %r: %s", identity, e)
            return
        if isinstance(msg, schema.Submit):
            msg.gateway = identity
            self.submit(msg)
        elif isinstance(msg, schema.Abort):
            self.abort(msg.request_ids)
        else:
            self.gateways.add(identity)
            self.front.send_multipart([identity, schema.encode(self.models_info())])

    def submit(self, submit: schema.Submit) -> None:
        if submit.request_id in self.requests:
            return self.fail(submit, errors.ALREADY_EXISTS, f"request id {submit.request_id} is already in flight")
        if not any(w.info.model == submit.model for w in self.workers.values()):
            return self.fail(submit, errors.UNAVAILABLE, f"no worker serves model {submit.model!r} right now")
        state = self.requests[submit.request_id] = RequestState(submit)
        if self.tracing:
            state.span = telemetry.start_span(SCOPE, "inflight.scheduler.schedule", submit.traceparent,
                                              attributes={"gen_ai.request.model": submit.model})
        if not len(self.queue) and self.dispatch(submit):
            return
        if not self.queue.offer(submit):
            self.fail(submit, errors.RESOURCE_EXHAUSTED, f"the admission queue is full ({self.config.max_queued} waiting); retry later")

    def dispatch(self, submit: schema.Submit) -> bool:
        candidates = [w for w in self.workers.values() if w.info.model == submit.model]
        worker, matched = route_by_prefix(submit.prompt_token_ids, candidates, self.config.balance_slack,
                                          self.config.cache_threshold)
        if worker is None:
            return False
        worker.inflight.add(submit.request_id)
        state = self.requests[submit.request_id]
        state.worker = worker.identity
        waited = time.monotonic() - state.arrived
        self.metrics.queue_time.observe(waited)
        self.metrics.routed.labels("prefix" if matched else "load").inc()
        if state.span:
            state.span.set_attributes({"inflight.worker_id": worker.info.worker_id, "inflight.prefix_blocks_matched": matched,
                                       "inflight.queue_time_s": waited})
            state.span.end()
            submit.traceparent = state.span.traceparent
            state.span = None
        self.back.send_multipart([worker.identity, schema.encode(submit)])
        log.debug("routed %s to %s (%d prefix blocks cached)", submit.request_id, worker.info.worker_id, matched)
        return True

    def drain_queue(self) -> None:
        for submit in self.queue.waiting():
            if self.dispatch(submit):
                self.queue.remove(submit.request_id)

    def abort(self, request_ids: list[str]) -> None:
        by_worker: dict[bytes, list[str]] = {}
        for rid in request_ids:
            state = self.requests.pop(rid, None)
            if state is None:
                continue
            self.queue.remove(rid)
            if state.span:
                state.span.set_error(errors.CANCELLED, "aborted while queued")
                state.span.end()
            if state.worker is not None and state.worker in self.workers:
                self.workers[state.worker].inflight.discard(rid)
                by_worker.setdefault(state.worker, []).append(rid)
        for identity, rids in by_worker.items():
            self.back.send_multipart([identity, schema.encode(schema.Abort(rids))])
        if by_worker:
            self.drain_queue()

    # Worker side.

    def on_worker(self, identity: bytes, raw: bytes) -> None:
        try:
            msg = schema.worker_to_scheduler.decode(raw)
        except msgspec.DecodeError as e:
            log.error("undecodable message from worker %r: %s", identity, e)
            return
        worker = self.workers.get(identity)
        if isinstance(msg, schema.WorkerHello):
            if worker is not None:  # the periodic re-announcement of a worker we know
                worker.last_seen = time.monotonic()
                return
            capacity = max(1, int(msg.max_batch_size * self.config.worker_queue_factor))
            self.workers[identity] = WorkerState(identity, msg, capacity)
            log.info("worker %s joined: %s, %d KV blocks of %d tokens", msg.worker_id, msg.model, msg.kv_blocks_total, msg.tokens_per_block)
            self.broadcast_models()
            self.drain_queue()
            return
        if worker is None:
            return  # unknown (declared dead, or we restarted): its next hello registers it
        worker.last_seen = time.monotonic()
        if isinstance(msg, schema.Heartbeat):
            worker.stats = msg.stats
            name = worker.info.worker_id
            for state_name in ("free", "in_use", "cached"):
                self.metrics.kv_blocks.labels(name, state_name).set(getattr(msg.stats, f"kv_blocks_{state_name}"))
            self.metrics.hit_rate.labels(name).set(msg.stats.prefix_cache_hit_rate)
            worker.cached.difference_update(msg.removed_hashes)
            worker.cached.update(msg.stored_hashes)
            return
        finished = False
        for item in msg.items:
            state = self.requests.get(item.request_id)
            if state is None:
                continue
            state.delivered += len(item.token_ids)
            if item.finish_reason is not None or item.error_code is not None:
                del self.requests[item.request_id]
                worker.inflight.discard(item.request_id)
                finished = True
        self.front.send_multipart([msg.gateway, raw])
        if finished:
            self.drain_queue()

    def sweep(self) -> None:
        now = time.monotonic()
        for identity, w in list(self.workers.items()):
            if now - w.last_seen > self.config.worker_timeout:
                log.error("worker %s silent for %.0fs; failing its %d requests", w.info.worker_id, now - w.last_seen, len(w.inflight))
                del self.workers[identity]
                for rid in list(w.inflight):
                    state = self.requests.get(rid)
                    if state:
                        self.fail(state.submit, errors.UNAVAILABLE, f"worker {w.info.worker_id} stopped responding")
                self.broadcast_models()
        for submit in self.queue.expired(time.time()):
            self.fail(submit, errors.DEADLINE_EXCEEDED, "deadline passed while queued")
        self.metrics.queued.set(len(self.queue))
        self.metrics.running.set(len(self.requests) - len(self.queue))
        alive: dict[str, int] = {}
        for w in self.workers.values():
            alive[w.info.model] = alive.get(w.info.model, 0) + 1
        for model, n in alive.items():
            self.metrics.workers.labels(model).set(n)
        for model in self._models_seen - alive.keys():
            self.metrics.workers.labels(model).set(0)
        self._models_seen |= alive.keys()

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.front, zmq.POLLIN)
        poller.register(self.back, zmq.POLLIN)
        next_sweep = time.monotonic() + 0.5
        while self.running:
            for sock, _ in poller.poll(500):
                for _ in range(1000):  # bounded, so one side cannot starve the other
                    try:
                        identity, raw = sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    (self.on_gateway if sock is self.front else self.on_worker)(identity, raw)
            if time.monotonic() >= next_sweep:
                self.sweep()
                next_sweep = time.monotonic() + 0.5
        self.front.close()
        self.back.close()


def run(config: SchedulerConfig) -> None:
    tracing = telemetry.setup_tracing("inflight-scheduler")
    sched = Scheduler(config, SchedulerMetrics(), tracing)
    serve_http("", config.metrics_port, ready=lambda: True)
    log.info("scheduler: gateways on %s, workers on %s, max %d queued", config.gateway_address, config.worker_address, config.max_queued)
    run_until_signalled(sched)
