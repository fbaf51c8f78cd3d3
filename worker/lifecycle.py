"""WorkerRequests: the requests one worker holds, between the scheduler's messages and the
engine's outputs, without a socket or a clock of its own, so that it can be unit-tested.

It keeps each request's owning gateway, deadline and trace record; hands Submits and
Aborts to the engine; runs engine steps (failing every request it holds with INTERNAL
when a step raises); queues each output for its gateway, one TokenBatch per gateway per
step; and builds the hello and heartbeat. What it sends goes through the function it is
given, as encoded schema messages. The loop in worker/main.py decodes, keeps the time."""

from __future__ import annotations

import logging
import uuid
from typing import Callable

from inflight import schema
from inflight.errors import CANCELLED, DEADLINE_EXCEEDED, INTERNAL, RequestError
from inflight.schema import RequestOutput, error_output
from worker.engine_api import Engine
from worker.metrics import WorkerMetrics
from worker.tracing import RequestTrace

log = logging.getLogger("inflight.worker")

Outbox = dict[bytes, list[RequestOutput]]  # gateway identity -> outputs for its next TokenBatch


# Engine steps failing one after another before the worker takes its engine for broken and
# stops (a sticky device error: it would otherwise fail every request routed to it, looking
# idle and drawing more); its supervisor (`inflight serve`, Kubernetes) starts it afresh.
MAX_FAILED_STEPS = 3


class WorkerRequests:
    def __init__(self, engine: Engine, send: Callable[[bytes], None], worker_id: str, model: str,
                 max_batch_size: int, metrics: WorkerMetrics, tracing: bool):
        self.engine = engine
        self.send = send  # an encoded schema message to the scheduler
        self.worker_id = worker_id
        self.model = model
        self.max_batch_size = max_batch_size
        self.metrics = metrics
        self.tracing = tracing
        self.owner: dict[str, bytes] = {}  # request id -> owning gateway identity
        self.deadlines: dict[str, float] = {}  # request id -> unix time nobody waits past
        self.traces: dict[str, RequestTrace] = {}
        self.incarnation = uuid.uuid4().hex[:12]  # this process, told apart from a restart under the same id
        self.failed_steps = 0  # engine steps failed in a row

    def hello(self) -> None:
        """Announce the worker. The loop repeats it every few seconds, so that a restarted
        scheduler (or one that declared this worker dead) registers it again."""
        stats = self.engine.stats()
        self.send(schema.encode(schema.WorkerHello(
            worker_id=self.worker_id, model=self.model, max_seq_len=self.engine.max_seq_len,
            vocab_size=self.engine.vocab_size, tokens_per_block=stats.tokens_per_block,
            kv_blocks_total=stats.kv_blocks_total, max_batch_size=self.max_batch_size, incarnation=self.incarnation,
        )))

    def leaving(self, gone: bool) -> None:
        """Tell the scheduler the worker is draining (route nothing new here), or, with
        `gone`, that it stops now (move what it still holds)."""
        self.send(schema.encode(schema.Leaving(self.worker_id, gone)))

    def heartbeat(self) -> None:
        stats = self.engine.stats()
        stored, removed = self.engine.kv_events()
        self.send(schema.encode(schema.Heartbeat(self.worker_id, stats, stored, removed)))
        self.metrics.update(stats)

    def handle(self, msg: schema.SchedulerToWorker, out: Outbox) -> None:
        if isinstance(msg, schema.Submit):
            try:
                self.engine.submit(msg.request_id, msg.prompt_token_ids, msg.params, msg.output_token_ids)
            except RequestError as e:
                out.setdefault(msg.gateway, []).append(error_output(msg.request_id, e.code, e.message))
                return
            self.owner[msg.request_id] = msg.gateway
            if msg.deadline is not None:
                self.deadlines[msg.request_id] = msg.deadline
            if self.tracing:
                self.traces[msg.request_id] = RequestTrace(msg.traceparent, msg.model, msg.params.max_tokens)
            self.metrics.submitted.inc()
        elif isinstance(msg, schema.Reannounce):
            self.hello()
        else:
            for rid in msg.request_ids:
                self.drop(rid, CANCELLED, "aborted")

    def drop(self, rid: str, code: str, message: str) -> None:
        self.engine.abort(rid)
        self.owner.pop(rid, None)
        self.deadlines.pop(rid, None)
        rt = self.traces.pop(rid, None)
        if rt:
            rt.finish(self.worker_id, None, code, message)

    def expire(self, now: float, out: Outbox) -> None:
        """Drop requests whose deadline (unix time) is past `now`; their gateway may be
        gone too."""
        for rid in [r for r, d in self.deadlines.items() if d <= now]:
            gateway = self.owner.get(rid)
            self.drop(rid, DEADLINE_EXCEEDED, "deadline passed in the worker")
            if gateway is not None:
                out.setdefault(gateway, []).append(error_output(rid, DEADLINE_EXCEEDED, "deadline passed in the worker"))

    def deliver(self, o: RequestOutput, out: Outbox) -> int:
        """Queue an output, as the engine made it, for its gateway; returns the tokens it
        carries (the caller counts a step's tokens in one metric update)."""
        gateway = self.owner.get(o.request_id)
        if gateway is None:
            return 0
        out.setdefault(gateway, []).append(o)
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

    def step(self, out: Outbox) -> None:
        """One engine step, every output queued for its gateway."""
        try:
            outputs = self.engine.step()
            self.failed_steps = 0
        except Exception:  # an engine bug must not take every request down silently
            self.failed_steps += 1
            log.exception("engine step failed (%d in a row); failing its requests", self.failed_steps)
            outputs = [error_output(rid, INTERNAL, "engine step failed") for rid in self.owner]
            for o in outputs:
                self.engine.abort(o.request_id)
        deliver = self.deliver
        # one counter update a step, not one a request: each takes a lock
        self.metrics.generated_tokens.inc(sum(deliver(o, out) for o in outputs))

    @property
    def engine_broken(self) -> bool:
        return self.failed_steps >= MAX_FAILED_STEPS

    def flush(self, out: Outbox) -> None:
        """One TokenBatch per gateway with what this loop turn queued."""
        for gateway, items in out.items():
            self.send(schema.encode(schema.TokenBatch(items, gateway)))
