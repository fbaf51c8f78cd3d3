"""Spans exported from the child process are the spans the serving process ended: the
OTLP request built from the rebuilt spans equals the one built from the originals."""

from __future__ import annotations

import msgspec
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Status, StatusCode

from inflight import span_export, telemetry


def test_a_span_survives_the_trip_to_the_child_unchanged():
    resource = Resource.create({"service.name": "test"})
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("inflight.test", "1.2")
    client = telemetry.context_from("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    server = tracer.start_span("server", context=client, kind=trace.SpanKind.SERVER,
                               attributes={"s": "x", "i": 7, "f": 0.5, "b": True, "list": ["length"]})
    server.add_event("first_token", {"n": 1})
    server.set_status(Status(StatusCode.ERROR, "INVALID_ARGUMENT: bad"))
    child = tracer.start_span("child", context=trace.set_span_in_context(server), links=[trace.Link(server.get_span_context(), {"k": 1})])
    child.end()
    server.end()
    tracer.start_span("root").end()  # no parent

    spans = memory.get_finished_spans()
    wire = msgspec.msgpack.encode([span_export.record_of(s) for s in spans])
    records = msgspec.msgpack.Decoder(list[span_export.SpanRecord | span_export.BuildRequest]).decode(wire)
    rebuilt = [span_export.span_of(r, resource, {}) for r in records]
    assert encode_spans(rebuilt) == encode_spans(spans)
