"""Tracing: one OpenTelemetry tracer provider per process, set up from the standard
OTEL_* variables. With no exporter endpoint set (or OTEL_SDK_DISABLED=true) nothing is
installed and every span is the API's no-op, which costs next to nothing. With one, spans
are encoded and exported by a child process (inflight/span_export.py), not by the
serving process's own threads.

A request is one trace: the gateway continues the client's `traceparent` (gRPC
metadata) or starts one, and the W3C context travels inside the ZeroMQ messages."""

from __future__ import annotations

import logging
import os
import time

from opentelemetry import trace
from opentelemetry.trace import SpanKind

from inflight.spans import VERSION, SpanSketch, context_from

log = logging.getLogger(__name__)
_exporter = None  # the ChildProcessSpanProcessor while tracing


def enabled_by_env() -> bool:
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    return any(os.environ.get(v) for v in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def setup_tracing(service_name: str, **attributes) -> bool:
    """Install an OTLP-exporting tracer provider when the environment asks for one."""
    global _exporter
    if not enabled_by_env():
        return False
    from opentelemetry.sdk.trace import TracerProvider

    from inflight.span_export import ChildProcessSpanProcessor

    resource = resource_of(service_name, **attributes)
    provider = TracerProvider(resource=resource)  # the sampler comes from OTEL_TRACES_SAMPLER
    _exporter = ChildProcessSpanProcessor(resource)
    provider.add_span_processor(_exporter)
    trace.set_tracer_provider(provider)
    log.info("tracing to %s as %s", os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"),
             resource.attributes["service.name"])
    return True


def resource_of(service_name: str, **attributes):
    """The process's resource: its service name (OTEL_SERVICE_NAME, when set, wins, as the
    specification has it), version and `attributes`, over OTEL_RESOURCE_ATTRIBUTES."""
    from opentelemetry.sdk.resources import Resource

    attrs = {"service.name": os.environ.get("OTEL_SERVICE_NAME") or service_name, "service.version": VERSION}
    attrs.update({k: v for k, v in attributes.items() if v})
    return Resource.create(attrs)  # merges OTEL_RESOURCE_ATTRIBUTES under these


def shutdown_tracing() -> None:
    global _exporter
    provider = trace.get_tracer_provider()
    if hasattr(provider, "shutdown"):
        provider.shutdown()
    _exporter = None


class Unrecorded:
    """What `start_span` gives where nothing is recorded: tracing off, or a trace the
    sampler leaves out. It still passes a traceparent on, so a process downstream sees
    the same trace (and its sampled flag)."""

    __slots__ = ("traceparent",)
    recording = False

    def __init__(self, traceparent: str | None):
        self.traceparent = traceparent

    def set_attributes(self, attributes: dict) -> None:
        pass

    def add_event(self, name: str) -> None:
        pass

    def set_error(self, code: str, message: str) -> None:
        pass

    def end(self) -> None:
        pass


class OwnSpan:
    """A span whose id this process needs (other processes' spans are its children), made
    without the SDK's span machinery: its ids come from the SDK's id generator and the
    decision to record it from the SDK's sampler (OTEL_TRACES_SAMPLER), both at start, and
    at its end one record goes to the export process: a fraction of what an SDK span costs
    the serving loop (BENCHMARKS.md, "Tracing cost on the serving path"). Its parent is
    always remote (a traceparent from another process), and it has no links."""

    __slots__ = ("scope", "name", "kind", "trace_id", "span_id", "parent_id", "flags", "trace_state", "start",
                 "attributes", "events", "error", "traceparent", "ended")
    recording = True

    def __init__(self, scope, name, kind, trace_id, span_id, parent_id, flags, trace_state, attributes):
        self.scope, self.name, self.kind = scope, name, kind
        self.trace_id, self.span_id, self.parent_id, self.flags = trace_id, span_id, parent_id, flags
        self.trace_state = trace_state
        self.start = time.time_ns()
        self.attributes = attributes
        self.events: list[tuple[str, int]] = []
        self.error: str | None = None
        self.ended = False
        self.traceparent = f"00-{trace_id:032x}-{span_id:016x}-{flags:02x}"

    def set_attributes(self, attributes: dict) -> None:
        self.attributes.update(attributes)

    def add_event(self, name: str) -> None:
        self.events.append((name, time.time_ns()))

    def set_error(self, code: str, message: str) -> None:
        self.attributes["rpc.grpc.status_code"] = code
        self.error = error_description(code, message)

    def end(self) -> None:
        if not self.ended:
            self.ended = True
            if _exporter is not None:
                _exporter.own(self, time.time_ns())


def start_span(scope: tuple[str, str, None], name: str, traceparent: str | None, kind: SpanKind = SpanKind.INTERNAL,
               attributes: dict | None = None) -> OwnSpan | Unrecorded:
    """A span under the one `traceparent` names (None: the root of a new trace), as an
    `OwnSpan` if tracing is on and the sampler records it. `scope` is the instrumentation
    scope: (name, version, schema URL)."""
    if _exporter is None:
        return Unrecorded(traceparent)
    provider = trace.get_tracer_provider()
    parent = context_from(traceparent)
    parent_ctx = trace.get_current_span(parent).get_span_context() if parent is not None else None
    if parent_ctx is not None and parent_ctx.is_valid:
        trace_id, parent_id = parent_ctx.trace_id, parent_ctx.span_id
    else:
        trace_id, parent_id = provider.id_generator.generate_trace_id(), None
    span_id = provider.id_generator.generate_span_id()
    attributes = attributes or {}
    sampled = provider.sampler.should_sample(parent, trace_id, name, kind, attributes)
    if not sampled.decision.is_sampled():  # RECORD_ONLY too: only sampled spans are exported
        return Unrecorded(f"00-{trace_id:032x}-{span_id:016x}-00")
    if sampled.attributes:
        attributes = {**attributes, **sampled.attributes}
    state = sampled.trace_state.to_header() if sampled.trace_state else ""
    return OwnSpan(scope, name, kind.value, trace_id, span_id, parent_id, 1, state, attributes)


def build_elsewhere(scope: str, traceparent: str | None, sketch: SpanSketch) -> None:
    """Have the export process build this span and its children with the SDK (sampler,
    ids and all), under the span `traceparent` names: for spans whose ids nothing in this
    process needs, which then cost this process a record instead of an SDK span."""
    if _exporter is not None:
        _exporter.build(scope, traceparent, sketch)


def error_description(code: str, message: str) -> str:
    """An ERROR status's description, for SDK spans and sketches alike."""
    return f"{code}: {message}"


def scope_of(name: str) -> tuple[str, str, None]:
    """An instrumentation scope for `start_span`: (name, our version, no schema URL), as
    the SDK's `get_tracer(name, VERSION)` would make it."""
    return (name, VERSION, None)


def tracing() -> bool:
    """Whether this process exports spans (setup_tracing installed the export process)."""
    return _exporter is not None


__all__ = ["OwnSpan", "SpanKind", "SpanSketch", "Unrecorded", "build_elsewhere", "context_from", "error_description",
           "resource_of", "scope_of", "setup_tracing", "start_span", "tracing"]
