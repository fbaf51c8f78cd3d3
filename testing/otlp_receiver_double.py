"""OTLP receiver double: takes the OpenTelemetry collector's place in the podman test of
compose.yaml (tests/test_compose_stack.py), where the collector's image cannot be pulled.

It accepts OTLP/gRPC trace exports on :4317 the way a collector does and keeps every span;
GET :13133/health answers 200 (the collector's health_check port), GET :13133/spans?trace_id=HEX
returns that trace's spans as JSON: [{"service", "name", "trace_id", "span_id", "parent_span_id"}].
It forwards nothing. Runs with only the packages the inflight image has (grpcio, opentelemetry-proto).
"""

from __future__ import annotations

import json
import os
import signal
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

_lock = threading.Lock()
_spans: list[dict] = []


class TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def Export(self, request, context):
        got = []
        for rs in request.resource_spans:
            service = next((a.value.string_value for a in rs.resource.attributes if a.key == "service.name"), "")
            for ss in rs.scope_spans:
                for s in ss.spans:
                    got.append({"service": service, "name": s.name, "trace_id": s.trace_id.hex(),
                                "span_id": s.span_id.hex(), "parent_span_id": s.parent_span_id.hex()})
        with _lock:
            _spans.extend(got)
        return trace_service_pb2.ExportTraceServiceResponse()


class Http(BaseHTTPRequestHandler):
    def do_GET(self):
        url = urlparse(self.path)
        if url.path == "/health":
            body = b"ok"
        elif url.path == "/spans":
            trace_id = parse_qs(url.query).get("trace_id", [""])[0].lower()
            with _lock:
                body = json.dumps([s for s in _spans if not trace_id or s["trace_id"] == trace_id]).encode()
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def main() -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(TraceService(), server)
    server.add_insecure_port("0.0.0.0:4317")
    server.start()
    print("OTLP receiver double: gRPC :4317, spans at :13133/spans", flush=True)
    # As a container's PID 1 it has no default SIGTERM action: stop at once on `podman stop`.
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    ThreadingHTTPServer(("0.0.0.0", 13133), Http).serve_forever()


if __name__ == "__main__":
    main()
