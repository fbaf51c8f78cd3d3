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


class RecordingExporterDouble:
    """Stands in for the export process's sender: keeps the records of ended OwnSpans."""

    def __init__(self):
        self.records = []

    def own(self, span, end):
        self.records.append(span_export.record_of_own(span, end))


def own_spans_setup(monkeypatch, sampler=None):
    from opentelemetry.sdk.trace.sampling import ParentBased, ALWAYS_ON

    provider = TracerProvider(resource=Resource.create({"service.name": "test"}), sampler=sampler or ParentBased(ALWAYS_ON))
    monkeypatch.setattr(telemetry.trace, "get_tracer_provider", lambda: provider)
    exporter = RecordingExporterDouble()
    monkeypatch.setattr(telemetry, "_exporter", exporter)
    return exporter


def test_an_own_span_exports_as_the_sdk_would_have_it(monkeypatch):
    exporter = own_spans_setup(monkeypatch)
    client = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    span = telemetry.start_span(telemetry.scope_of("inflight.test"), "server", client, telemetry.SpanKind.SERVER, {"s": "x"})
    assert span.recording and span.traceparent.startswith("00-4bf92f3577b34da6a3ce929d0e0e4736-")
    span.add_event("first_token")
    span.set_attributes({"n": 3, "list": ["length"]})
    span.set_error("RESOURCE_EXHAUSTED", "queue full")
    span.end()
    span.end()  # once only
    [record] = msgspec.msgpack.Decoder(list[span_export.SpanRecord]).decode(msgspec.msgpack.encode(exporter.records))
    got = span_export.span_of(record, Resource.create({}), {})
    assert got.name == "server" and got.kind == trace.SpanKind.SERVER
    assert got.context.trace_id == 0x4bf92f3577b34da6a3ce929d0e0e4736
    assert f"{got.context.span_id:016x}" == span.traceparent.split("-")[2]
    assert got.parent.span_id == 0x00f067aa0ba902b7 and got.parent.is_remote
    assert got.status.status_code == StatusCode.ERROR and got.status.description == "RESOURCE_EXHAUSTED: queue full"
    assert dict(got.attributes) == {"s": "x", "n": 3, "list": ["length"], "rpc.grpc.status_code": "RESOURCE_EXHAUSTED"}
    assert [e.name for e in got.events] == ["first_token"]
    assert got.instrumentation_scope.name == "inflight.test" and got.start_time <= got.end_time
    encode_spans([got])  # the OTLP encoder takes it


def test_a_new_trace_and_an_unsampled_one(monkeypatch):
    exporter = own_spans_setup(monkeypatch)
    root = telemetry.start_span(telemetry.scope_of("t"), "root", None)
    root.end()
    [record] = exporter.records
    assert record.parent_id is None and root.traceparent.endswith("-01")
    dropped = telemetry.start_span(telemetry.scope_of("t"), "s", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00")
    dropped.set_error("INTERNAL", "x")
    dropped.end()
    assert not dropped.recording and len(exporter.records) == 1
    # The decision goes downstream: same trace, not sampled.
    assert dropped.traceparent.startswith("00-4bf92f3577b34da6a3ce929d0e0e4736-") and dropped.traceparent.endswith("-00")


def test_the_sampler_from_the_environment_decides(monkeypatch):
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

    exporter = own_spans_setup(monkeypatch, sampler=ALWAYS_OFF)
    span = telemetry.start_span(telemetry.scope_of("t"), "root", None)
    span.end()
    assert not span.recording and exporter.records == []


def test_the_resource_follows_the_standard_variables(monkeypatch):
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=staging,service.name=ignored")
    attrs = telemetry.resource_of("inflight-worker", **{"inflight.worker_id": "w-3", "unset": ""}).attributes
    assert attrs["service.name"] == "inflight-worker"  # ours over OTEL_RESOURCE_ATTRIBUTES'
    assert attrs["deployment.environment"] == "staging"
    assert attrs["inflight.worker_id"] == "w-3" and "unset" not in attrs
    assert attrs["service.version"] == telemetry.VERSION
    monkeypatch.setenv("OTEL_SERVICE_NAME", "llm-fleet")
    assert telemetry.resource_of("inflight-worker").attributes["service.name"] == "llm-fleet"
