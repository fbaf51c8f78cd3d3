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

import msgspec
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

log = logging.getLogger(__name__)
_propagator = TraceContextTextMapPropagator()
_exporter = None  # the ChildProcessSpanProcessor while tracing

VERSION = "0.1.0"


def enabled_by_env() -> bool:
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    return any(os.environ.get(v) for v in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def setup_tracing(service_name: str, **attributes) -> bool:
    """Install an OTLP-exporting tracer provider when the environment asks for one."""
    global _exporter
    if not enabled_by_env():
        return False
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider

    from inflight.span_export import ChildProcessSpanProcessor

    attrs = {"service.name": os.environ.get("OTEL_SERVICE_NAME", service_name), "service.version": VERSION}
    attrs.update({k: v for k, v in attributes.items() if v})
    resource = Resource.create(attrs)
    provider = TracerProvider(resource=resource)  # the sampler comes from OTEL_TRACES_SAMPLER
    _exporter = ChildProcessSpanProcessor(resource)
    provider.add_span_processor(_exporter)
    trace.set_tracer_provider(provider)
    log.info("tracing to %s as %s", os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"),
             attrs["service.name"])
    return True


def shutdown_tracing() -> None:
    global _exporter
    provider = trace.get_tracer_provider()
    if hasattr(provider, "shutdown"):
        provider.shutdown()
    _exporter = None


def tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name, VERSION)


def context_from(traceparent: str | None):
    """The parent context a `traceparent` header names (None: start a new trace)."""
    if not traceparent:
        return None
    return _propagator.extract({"traceparent": traceparent})


def traceparent_of(span: Span) -> str | None:
    ctx = span.get_span_context()
    if not ctx.is_valid:
        return None
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


class SpanSketch(msgspec.Struct, array_like=True):
    """A span described after the fact, from timestamps kept meanwhile: what
    `build_elsewhere` takes. `error` is the description of an ERROR status."""

    name: str
    start: int  # unix ns
    end: int
    attributes: dict
    events: list[tuple[str, int]] = []  # name, unix ns
    error: str | None = None
    children: list[SpanSketch] = []


def build_elsewhere(scope: str, traceparent: str | None, sketch: SpanSketch) -> None:
    """Have the export process build this span and its children with the SDK (sampler,
    ids and all), under the span `traceparent` names: for spans whose ids nothing in this
    process needs, which then cost this process a few µs instead of some 40 a span."""
    if _exporter is not None:
        _exporter.build(scope, traceparent, sketch)


def now_ns() -> int:
    return time.time_ns()


def error_description(code: str, message: str) -> str:
    """An ERROR status's description, for SDK spans and sketches alike."""
    return f"{code}: {message}"


def end_with_error(span: Span, code: str, message: str) -> None:
    span.set_attribute("rpc.grpc.status_code", code)
    span.set_status(Status(StatusCode.ERROR, error_description(code, message)))


__all__ = ["SpanKind", "SpanSketch", "build_elsewhere", "context_from", "end_with_error", "error_description", "now_ns", "setup_tracing", "tracer", "traceparent_of"]
