"""Tracing: one OpenTelemetry tracer provider per process, set up from the standard
OTEL_* variables. With no exporter endpoint set (or OTEL_SDK_DISABLED=true) nothing is
installed and every span is the API's no-op, which costs next to nothing.

A request is one trace: the gateway continues the client's `traceparent` (gRPC
metadata) or starts one, and the W3C context travels inside the ZeroMQ messages."""

from __future__ import annotations

import logging
import os
import time

from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

log = logging.getLogger(__name__)
_propagator = TraceContextTextMapPropagator()

VERSION = "0.1.0"


def enabled_by_env() -> bool:
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    return any(os.environ.get(v) for v in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def setup_tracing(service_name: str, **attributes) -> bool:
    """Install an OTLP-exporting tracer provider when the environment asks for one."""
    if not enabled_by_env():
        return False
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    attrs = {"service.name": os.environ.get("OTEL_SERVICE_NAME", service_name), "service.version": VERSION}
    attrs.update({k: v for k, v in attributes.items() if v})
    provider = TracerProvider(resource=Resource.create(attrs))  # the sampler comes from OTEL_TRACES_SAMPLER
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    log.info("tracing to %s over %s as %s", os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"), protocol, attrs["service.name"])
    return True


def shutdown_tracing() -> None:
    provider = trace.get_tracer_provider()
    if hasattr(provider, "shutdown"):
        provider.shutdown()


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


def now_ns() -> int:
    return time.time_ns()


def end_with_error(span: Span, code: str, message: str) -> None:
    span.set_attribute("rpc.grpc.status_code", code)
    span.set_status(Status(StatusCode.ERROR, f"{code}: {message}"))


__all__ = ["SpanKind", "context_from", "end_with_error", "now_ns", "setup_tracing", "tracer", "traceparent_of"]
