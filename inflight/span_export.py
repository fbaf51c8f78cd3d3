"""Span export from a child process, so that no OTLP work runs in a serving process.

The SDK's BatchSpanProcessor encodes spans as OTLP protobuf in Python on a thread of the
process that made them. Our processes each move tokens on one Python thread, and that
export thread takes the GIL from it: most of what tracing cost was there (BENCHMARKS.md,
"Where it went"). Here an ended span becomes a compact msgspec record, a thread sends
what has gathered as one ZeroMQ message every SEND_INTERVAL (one message per span would
wake ZeroMQ's I/O thread per span, which costs more than the record), and a child process
started for it rebuilds the spans and hands them to the standard BatchSpanProcessor and
OTLP exporter, configured as ever by the OTEL_* variables.

None of our own spans is an SDK span in a serving process: the gateway's server span and
the scheduler's span, whose ids other processes need, are telemetry.OwnSpans (ids and
sampling decided by the SDK's generator and sampler at start, one record sent at the
end), and the spans whose ids nothing needs (the worker's, the gateway's tokenize span)
are sketched after the fact (telemetry.build_elsewhere) and built here with the SDK.

    python -m inflight.span_export ENDPOINT RESOURCE_JSON   (started by ChildProcessSpanProcessor)
"""

from __future__ import annotations

import collections
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import msgspec
import zmq
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, SpanProcessor
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

from inflight.spans import VERSION, SpanSketch, context_from

log = logging.getLogger(__name__)

# Spans waiting to leave the process at most; past it they are dropped, as the SDK's own
# queue drops them, rather than a stuck exporter growing the serving process.
MAX_QUEUED = 65536
SEND_INTERVAL = 0.05  # seconds between batches sent to the child
RESTART_INTERVAL = 10.0  # seconds at least between starts of a dying export process


class EventRecord(msgspec.Struct, array_like=True):
    name: str
    time: int
    attributes: dict


class LinkRecord(msgspec.Struct, array_like=True):
    trace_id: bytes
    span_id: int
    trace_flags: int
    attributes: dict


class SpanRecord(msgspec.Struct, array_like=True, tag=True):
    """One ended span: everything the OTLP encoder reads from it but the resource, which
    is the same for every span of a process and goes to the child once."""

    scope: tuple[str, str | None, str | None]  # name, version, schema URL
    name: str
    trace_id: bytes  # 16 bytes: msgpack integers stop at 64 bits
    span_id: int
    trace_flags: int
    trace_state: str  # W3C tracestate header, "" if none
    parent_id: int | None
    parent_remote: bool
    kind: int
    start: int
    end: int
    attributes: dict
    events: list[EventRecord]
    links: list[LinkRecord]
    status: int
    status_message: str | None


class BuildRequest(msgspec.Struct, array_like=True, tag=True):
    """A span for the child to build (telemetry.build_elsewhere)."""

    scope: str
    traceparent: str | None
    sketch: SpanSketch


def record_of(span: ReadableSpan) -> SpanRecord:
    ctx, parent, scope = span.context, span.parent, span.instrumentation_scope
    return SpanRecord(
        (scope.name, scope.version, scope.schema_url) if scope else ("", None, None),
        span.name, ctx.trace_id.to_bytes(16, "big"), ctx.span_id, int(ctx.trace_flags),
        ctx.trace_state.to_header() if ctx.trace_state else "",
        parent.span_id if parent else None, bool(parent and parent.is_remote),
        span.kind.value, span.start_time, span.end_time, dict(span.attributes),
        [EventRecord(e.name, e.timestamp, dict(e.attributes)) for e in span.events],
        [LinkRecord(ln.context.trace_id.to_bytes(16, "big"), ln.context.span_id, int(ln.context.trace_flags), dict(ln.attributes))
         for ln in span.links],
        span.status.status_code.value, span.status.description,
    )


def record_of_own(span, end: int) -> SpanRecord:
    """The record of a telemetry.OwnSpan that ended at `end` (unix ns). Its parent, if
    any, is remote: it came from another process's traceparent."""
    return SpanRecord(span.scope, span.name, span.trace_id.to_bytes(16, "big"), span.span_id, span.flags, span.trace_state,
                      span.parent_id, span.parent_id is not None, span.kind, span.start, end, span.attributes,
                      [EventRecord(name, t, {}) for name, t in span.events], [],
                      (StatusCode.ERROR if span.error is not None else StatusCode.UNSET).value, span.error)


def span_of(r: SpanRecord, resource: Resource, scopes: dict) -> ReadableSpan:
    """The span again, as the exporter reads it (`scopes` caches scope objects). The SDK
    asks users not to make ReadableSpans; this one replays a span the SDK made."""
    trace_id = int.from_bytes(r.trace_id, "big")
    state = TraceState.from_header([r.trace_state]) if r.trace_state else None
    scope = scopes.get(r.scope)
    if scope is None:
        scope = scopes[r.scope] = InstrumentationScope(*r.scope)
    return ReadableSpan(
        r.name,
        context=SpanContext(trace_id, r.span_id, False, TraceFlags(r.trace_flags), state),
        parent=SpanContext(trace_id, r.parent_id, r.parent_remote) if r.parent_id is not None else None,  # only its id and remoteness are exported
        resource=resource,
        attributes=r.attributes,
        events=[Event(e.name, e.attributes, e.time) for e in r.events],
        links=[Link(SpanContext(int.from_bytes(ln.trace_id, "big"), ln.span_id, False, TraceFlags(ln.trace_flags)), ln.attributes)
               for ln in r.links],
        kind=SpanKind(r.kind),
        status=Status(StatusCode(r.status), r.status_message),
        start_time=r.start,
        end_time=r.end,
        instrumentation_scope=scope,
    )


class ChildProcessSpanProcessor(SpanProcessor):
    """Sends every ended span, and every span to build (`build`), to an exporting child
    process it starts."""

    def __init__(self, resource: Resource):
        self._dir = tempfile.mkdtemp(prefix="inflight-spans-")
        endpoint = f"ipc://{self._dir}/spans"
        self._ctx = zmq.Context(1)
        self._sock = self._ctx.socket(zmq.PUSH)
        self._sock.connect(endpoint)  # connecting first queues spans until the child binds
        self._encode = msgspec.msgpack.Encoder().encode
        self._pending: collections.deque[SpanRecord | BuildRequest] = collections.deque()
        self._dropped = 0
        resource_json = msgspec.json.encode({"attributes": dict(resource.attributes), "schema_url": resource.schema_url})
        self._child_args = [sys.executable, "-m", __name__, endpoint, resource_json]
        self._child = self._start_child()
        self._restart_at = 0.0  # monotonic time before which a dead child is not started again
        self._send_lock = threading.Lock()  # a socket is not thread-safe
        self._stop = threading.Event()
        self._sender = threading.Thread(target=self._send_every, name="span-sender", daemon=True)
        self._sender.start()

    def on_end(self, span: ReadableSpan) -> None:
        self._queue(record_of(span))

    def own(self, span, end: int) -> None:
        """An ended telemetry.OwnSpan."""
        self._queue(record_of_own(span, end))

    def build(self, scope: str, traceparent: str | None, sketch: SpanSketch) -> None:
        self._queue(BuildRequest(scope, traceparent, sketch))

    def _queue(self, item: SpanRecord | BuildRequest) -> None:
        if self._stop.is_set():
            return
        if len(self._pending) >= MAX_QUEUED:
            self._dropped += 1
            if self._dropped == 1:
                log.warning("span export is %d spans behind; dropping spans", MAX_QUEUED)
            return
        self._pending.append(item)

    def _send_every(self) -> None:
        # One message per interval, not per span: waking ZeroMQ's I/O thread costs more
        # CPU than encoding a span, and the encoding of a batch is one call into C.
        while not self._stop.wait(SEND_INTERVAL):
            if self._child.poll() is not None and not self._restart():
                continue  # spans wait in the queue (and past MAX_QUEUED are dropped)
            self.force_flush()

    def _start_child(self) -> subprocess.Popen:
        # Its own session: a Ctrl-C meant for the stack reaches the parent, which then
        # tells the child to flush and stop.
        return subprocess.Popen(self._child_args, start_new_session=True)

    def _restart(self) -> bool:
        """A dead export process is started again, at most once every RESTART_INTERVAL:
        tracing comes back by itself, and a child that dies at once does not spin."""
        now = time.monotonic()
        if now < self._restart_at:
            return False
        log.error("the span export process exited with code %s; starting another (spans it held are lost)", self._child.returncode)
        self._restart_at = now + RESTART_INTERVAL
        self._child = self._start_child()
        return True

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Hand every ended span to the child (which exports on its own schedule)."""
        with self._send_lock:
            batch = [self._pending.popleft() for _ in range(len(self._pending))]
            if batch and not self._sock.closed:
                try:
                    self._sock.send(self._encode(batch), zmq.NOBLOCK)
                except zmq.Again:  # the child is gone or hopelessly behind
                    self._dropped += len(batch)
        return True

    def shutdown(self) -> None:
        self._stop.set()
        self._sender.join()
        if self._child.poll() is None:
            self.force_flush()
            with self._send_lock:
                self._sock.setsockopt(zmq.SNDTIMEO, 5000)
                try:
                    self._sock.send(b"")  # the end: the child exports what it holds and exits
                except zmq.Again:
                    log.warning("the span export process is not taking spans; stopping it")
                    self._child.terminate()
            try:
                self._child.wait(30)  # its exporter gives up on an unreachable endpoint before that
            except subprocess.TimeoutExpired:
                self._child.kill()
        self._sock.close(linger=0)
        self._ctx.term()
        shutil.rmtree(self._dir, ignore_errors=True)
        if self._dropped:
            log.warning("%d spans dropped: export could not keep up", self._dropped)


def _exporter():
    protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    return OTLPSpanExporter()


def build(tracer: trace.Tracer, sketch: SpanSketch, context) -> None:
    span = tracer.start_span(sketch.name, context=context, attributes=sketch.attributes, start_time=sketch.start)
    for name, time_ns in sketch.events:
        span.add_event(name, timestamp=time_ns)
    if sketch.error is not None:
        span.set_status(Status(StatusCode.ERROR, sketch.error))
    if sketch.children:
        inside = trace.set_span_in_context(span)
        for child in sketch.children:
            build(tracer, child, inside)
    span.end(end_time=sketch.end)


def main(endpoint: str, resource_json: str) -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    spec = msgspec.json.decode(resource_json)
    resource = Resource(spec["attributes"], spec["schema_url"])
    processor = BatchSpanProcessor(_exporter())
    provider = TracerProvider(resource=resource)  # builds the BuildRequests' spans, sampler from the environment as in the parent
    provider.add_span_processor(processor)
    decode = msgspec.msgpack.Decoder(list[SpanRecord | BuildRequest]).decode
    scopes: dict = {}
    parent = os.getppid()
    sock = zmq.Context(1).socket(zmq.PULL)
    sock.setsockopt(zmq.RCVTIMEO, 1000)
    sock.bind(endpoint)
    while True:
        try:
            raw = sock.recv()
        except zmq.Again:
            if os.getppid() != parent:  # the parent died without saying goodbye, or cleaning up
                shutil.rmtree(os.path.dirname(endpoint.removeprefix("ipc://")), ignore_errors=True)
                break
            continue
        if not raw:
            break
        for item in decode(raw):
            if isinstance(item, SpanRecord):
                processor.on_end(span_of(item, resource, scopes))
            else:
                build(provider.get_tracer(item.scope, VERSION), item.sketch, context_from(item.traceparent))
    provider.shutdown()
    sock.close(linger=0)


if __name__ == "__main__":
    main(*sys.argv[1:3])
