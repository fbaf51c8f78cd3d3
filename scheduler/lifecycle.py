"""RequestLifecycle: every request's life in the scheduler, from a gateway's Submit to its
end, without sockets or a clock of its own, so that it can be unit-tested.

Admission (queue when no worker has room, RESOURCE_EXHAUSTED when the queue is full),
routing, worker registration and heartbeats, cancellation, queued deadlines, failing
the requests of a worker gone silent, and aborting those of a gateway gone silent (every
gateway is its own peer, several behind one port too). It takes decoded messages (the
loop in scheduler/main.py decodes) and sends encoded ones through the two functions it is
given; a worker's TokenBatch goes on to its gateway as the bytes that arrived."""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from typing import Callable

from inflight import errors, schema, telemetry
from scheduler.admission import AdmissionQueue
from scheduler.config import SchedulerConfig
from scheduler.metrics import SchedulerMetrics
from scheduler.routing import WorkerState, route_by_prefix

log = logging.getLogger("inflight.scheduler")
SCOPE = telemetry.scope_of("inflight.scheduler")

Send = Callable[[bytes, bytes], None]  # (the peer's identity, an encoded schema message)


@dataclasses.dataclass
class RequestState:
    submit: schema.Submit
    arrived: float  # monotonic
    worker: bytes | None = None
    span: telemetry.OwnSpan | telemetry.Unrecorded | None = None
    dispatched: bool = False
    delivered: list[int] = dataclasses.field(default_factory=list)  # tokens relayed to the gateway: where another worker goes on


class RequestLifecycle:
    def __init__(self, config: SchedulerConfig, metrics: SchedulerMetrics, tracing: bool,
                 to_gateway: Send, to_worker: Send, clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.metrics = metrics
        self.tracing = tracing
        self.to_gateway = to_gateway
        self.to_worker = to_worker
        self.clock = clock  # monotonic seconds: arrival, dispatch and last-seen times
        self.workers: dict[bytes, WorkerState] = {}
        self.gateways: dict[bytes, float] = {}  # every gateway that said hello: when it was last heard
        self.requests: dict[str, RequestState] = {}  # queued and dispatched, until their end
        self.queue = AdmissionQueue(config.max_queued)
        self._models_seen: set[str] = set()
        self.incarnation = uuid.uuid4().hex[:12]  # told to gateways, so that they know a restart

    # Messages to gateways.

    def fail(self, submit: schema.Submit, code: str, message: str) -> None:
        """End a request the scheduler holds, telling its gateway why."""
        state = self.requests.pop(submit.request_id, None)
        if state and state.span:
            state.span.set_error(code, message)
            state.span.end()
        self.refuse(submit, code, message)

    def refuse(self, submit: schema.Submit, code: str, message: str) -> None:
        """Tell a submit's gateway that it ended with `code`."""
        if code in (errors.RESOURCE_EXHAUSTED, errors.UNAVAILABLE, errors.ALREADY_EXISTS):
            self.metrics.rejected.labels(code).inc()
        item = schema.error_output(submit.request_id, code, message)
        self.to_gateway(submit.gateway, schema.encode(schema.TokenBatch([item])))

    def serving(self) -> list[WorkerState]:
        """The workers that take new requests: registered and not leaving."""
        return [w for w in self.workers.values() if not w.leaving]

    def models_info(self) -> schema.ModelsInfo:
        models: dict[str, schema.ModelInfo] = {}
        for w in self.serving():
            m = models.get(w.info.model)
            if m is None:
                models[w.info.model] = schema.ModelInfo(w.info.model, w.info.max_seq_len, w.info.vocab_size, 1)
            else:
                m.workers += 1
                m.max_seq_len = min(m.max_seq_len, w.info.max_seq_len)
        return schema.ModelsInfo(list(models.values()), self.incarnation)

    def broadcast_models(self) -> None:
        raw = schema.encode(self.models_info())
        for g in self.gateways:
            self.to_gateway(g, raw)

    # Gateway side.

    def on_gateway_message(self, identity: bytes, msg: schema.GatewayToScheduler) -> None:
        if identity in self.gateways:
            self.gateways[identity] = self.clock()
        if isinstance(msg, schema.Submit):
            msg.gateway = identity
            self.submit(msg)
        elif isinstance(msg, schema.Abort):
            self.abort(msg.request_ids)
        else:
            self.gateways[identity] = self.clock()
            self.to_gateway(identity, schema.encode(self.models_info()))

    def lose_gateway(self, identity: bytes, silent: float) -> None:
        """Forget a gateway gone silent and abort its requests, whose tokens would reach
        nobody; each ends with UNAVAILABLE toward it, which matters only to a gateway that
        was stopped rather than dead and comes back."""
        del self.gateways[identity]
        submits = [s.submit for s in self.requests.values() if s.submit.gateway == identity]
        log.error("gateway %s silent for %.0fs; aborting its %d requests", identity.decode(errors="replace"), silent, len(submits))
        self.abort([s.request_id for s in submits])
        for submit in submits:
            item = schema.error_output(submit.request_id, errors.UNAVAILABLE, "the scheduler lost contact with this gateway")
            self.to_gateway(identity, schema.encode(schema.TokenBatch([item])))

    def submit(self, submit: schema.Submit) -> None:
        if submit.request_id in self.requests:
            # The request in flight under that id goes on: only the newcomer is refused.
            return self.refuse(submit, errors.ALREADY_EXISTS, f"request id {submit.request_id} is already in flight")
        if not any(w.info.model == submit.model for w in self.serving()):
            return self.fail(submit, errors.UNAVAILABLE, f"no worker serves model {submit.model!r} right now")
        state = self.requests[submit.request_id] = RequestState(submit, self.clock())
        if self.tracing:
            state.span = telemetry.start_span(SCOPE, "inflight.scheduler.schedule", submit.traceparent,
                                              attributes={"gen_ai.request.model": submit.model})
        # Behind the queued requests of its model; those of other models do not hold it up.
        if not self.queue.waiting_for(submit.model) and self.dispatch(submit):
            return
        if not self.queue.offer(submit):
            self.fail(submit, errors.RESOURCE_EXHAUSTED, f"the admission queue is full ({self.config.max_queued} waiting); retry later")

    def dispatch(self, submit: schema.Submit) -> bool:
        candidates = [w for w in self.workers.values() if w.info.model == submit.model]
        worker, matched = route_by_prefix(submit.prompt_token_ids, candidates, self.config.balance_slack,
                                          self.config.cache_threshold)
        if worker is None:
            return False
        if not worker.requests:
            worker.last_progress = self.clock()  # its progress deadline runs from its first request
        worker.requests.add(submit.request_id)
        state = self.requests[submit.request_id]
        state.worker = worker.identity
        waited = self.clock() - state.arrived
        if not state.dispatched:  # a request moved off a lost worker was counted when it first left
            state.dispatched = True
            self.metrics.queue_time.observe(waited)
            self.metrics.routed.labels("prefix" if matched else "load").inc()
        if state.span:
            state.span.set_attributes({"inflight.worker_id": worker.info.worker_id, "inflight.prefix_blocks_matched": matched,
                                       "inflight.queue_time_s": waited})
            state.span.end()
            submit.traceparent = state.span.traceparent
            state.span = None
        self.to_worker(worker.identity, schema.encode(submit))
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
                self.workers[state.worker].requests.discard(rid)
                by_worker.setdefault(state.worker, []).append(rid)
        for identity, rids in by_worker.items():
            self.to_worker(identity, schema.encode(schema.Abort(rids)))
        if by_worker:
            self.drain_queue()

    # Worker side.

    def on_worker_message(self, identity: bytes, msg: schema.WorkerToScheduler, raw: bytes) -> None:
        """`raw` is `msg` as it arrived: a TokenBatch goes on to its gateway as it is."""
        worker = self.workers.get(identity)
        if isinstance(msg, schema.WorkerHello):
            if worker is not None and msg.incarnation == worker.info.incarnation:  # its periodic re-announcement
                worker.last_seen = self.clock()
                return
            capacity = max(1, int(msg.max_batch_size * self.config.worker_queue_factor))
            now = self.clock()
            self.workers[identity] = WorkerState(identity, msg, capacity, last_seen=now, last_progress=now)
            log.info("worker %s joined: %s, %d KV blocks of %d tokens", msg.worker_id, msg.model, msg.kv_blocks_total, msg.tokens_per_block)
            if worker is not None:  # restarted under the same name: what the old process held goes on here or elsewhere
                log.error("worker %s restarted; moving the %d requests it held", msg.worker_id, len(worker.requests))
                self.move_requests(worker, "restarted")
            self.broadcast_models()
            self.drain_queue()
            return
        if worker is None:  # taken for lost, or this scheduler restarted: ask it to join again now
            self.to_worker(identity, schema.encode(schema.Reannounce()))
            return
        worker.last_seen = self.clock()
        if isinstance(msg, schema.Leaving):
            if msg.gone:
                log.info("worker %s stopped; moving the %d requests it still held", worker.info.worker_id, len(worker.requests))
                self.lose_worker(identity, "drained")
            else:
                log.info("worker %s is draining its %d requests", worker.info.worker_id, len(worker.requests))
                worker.leaving = True
                self.broadcast_models()
                self.fail_queued_without_worker(worker.info.model)
            return
        if isinstance(msg, schema.Heartbeat):
            name = worker.info.worker_id
            for state_name in ("free", "in_use", "cached"):
                self.metrics.kv_blocks.labels(name, state_name).set(getattr(msg.stats, f"kv_blocks_{state_name}"))
            self.metrics.hit_rate.labels(name).set(msg.stats.prefix_cache_hit_rate)
            worker.cached.difference_update(msg.removed_hashes)
            worker.cached.update(msg.stored_hashes)
            return
        finished = False
        stale: list[str] = []
        for item in msg.items:
            state = self.requests.get(item.request_id)
            if state is None or state.worker != identity:  # ended, or moved to another worker: not this one's to answer
                stale.append(item.request_id)
                continue
            state.delivered += item.new_token_ids
            if item.finished:
                del self.requests[item.request_id]
                worker.requests.discard(item.request_id)
                finished = True
        if len(stale) < len(msg.items):
            worker.last_progress = self.clock()
            if stale:  # rare: a worker that came back from a stall; pass on only what is still its own
                gone = set(stale)
                raw = schema.encode(schema.TokenBatch([i for i in msg.items if i.request_id not in gone], msg.gateway))
            self.to_gateway(msg.gateway, raw)
        if stale:
            self.to_worker(identity, schema.encode(schema.Abort(stale)))
        if finished:
            self.drain_queue()

    def lose_worker(self, identity: bytes, why: str) -> None:
        """Take a worker out of rotation and move its requests. A worker that comes back
        says hello and joins anew; what it still sends for the moved requests is dropped
        (and aborted)."""
        w = self.workers.pop(identity)
        self.broadcast_models()
        self.move_requests(w, why)
        self.fail_queued_without_worker(w.info.model)

    def fail_queued_without_worker(self, model: str) -> None:
        """Where no worker serves `model` any more, its queued requests end with UNAVAILABLE
        now, as a new one would, instead of waiting for a worker that may never come."""
        if any(w.info.model == model for w in self.serving()):
            return
        for submit in self.queue.waiting():
            if submit.model == model:
                self.queue.remove(submit.request_id)
                self.fail(submit, errors.UNAVAILABLE, f"no worker serves model {model!r} any more")

    def move_requests(self, w: WorkerState, why: str) -> None:
        """Continue each request `w` held on another worker, from its prompt and the tokens
        already delivered; where no worker serves the model any more, it ends with
        UNAVAILABLE."""
        serving = any(o.info.model == w.info.model for o in self.serving())
        for rid in sorted(w.requests, key=lambda r: (self.requests[r].arrived if r in self.requests else 0.0, r)):  # oldest first
            state = self.requests.get(rid)
            if state is None:
                continue
            state.worker = None
            if not serving:
                self.fail(state.submit, errors.UNAVAILABLE, f"worker {w.info.worker_id} stopped responding and no other serves "
                                                           f"model {w.info.model!r}")
                continue
            self.metrics.moved.labels(why).inc()
            state.submit.output_token_ids = list(state.delivered)
            if not self.dispatch(state.submit):
                self.queue.readmit(state.submit)

    def sweep(self, now_monotonic: float, now_unix: float) -> None:
        """Drop workers silent past the timeout (moving or failing their requests) and
        gateways silent past theirs (aborting their requests), fail queued requests whose
        deadline passed, and refresh the gauges."""
        for identity, w in list(self.workers.items()):
            silent = now_monotonic - w.last_seen
            stalled = now_monotonic - w.last_progress if w.requests else 0.0
            if silent > self.config.worker_timeout:
                log.error("worker %s silent for %.0fs; moving its %d requests", w.info.worker_id, silent, len(w.requests))
                self.lose_worker(identity, "silent")
            elif stalled > self.config.progress_timeout:
                log.error("worker %s made no progress for %.0fs holding %d requests; moving them", w.info.worker_id,
                          stalled, len(w.requests))
                self.to_worker(identity, schema.encode(schema.Abort(list(w.requests))))
                self.lose_worker(identity, "stalled")
        for identity, seen in list(self.gateways.items()):
            if now_monotonic - seen > self.config.gateway_timeout:
                self.lose_gateway(identity, now_monotonic - seen)
        self.metrics.gateways.set(len(self.gateways))
        for submit in self.queue.expired(now_unix):
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
