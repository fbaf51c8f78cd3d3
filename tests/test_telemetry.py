"""One trace per request across the three processes, exported over OTLP/gRPC to a real
receiver started here; Prometheus metrics that move by exactly what was sent; probes."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from concurrent import futures

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from inflight.client import Client
from inflight.v1 import pb
from testing.stack import Stack, children_of, free_port

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP trace receiver: keeps every span with its service name."""

    def __init__(self):
        self.spans: list[tuple[str, object]] = []
        self.lock = threading.Lock()

    def Export(self, request, context):  # noqa: N802 (the OTLP service's name)
        with self.lock:
            for rs in request.resource_spans:
                attrs = {a.key: a.value for a in rs.resource.attributes}
                service = attrs["service.name"].string_value
                for ss in rs.scope_spans:
                    for span in ss.spans:
                        self.spans.append((service, span, attrs))
        return trace_service_pb2.ExportTraceServiceResponse()

    def trace(self, trace_id: bytes) -> list:
        with self.lock:
            return [(svc, s, a) for svc, s, a in self.spans if s.trace_id == trace_id]


@pytest.fixture(scope="module")
def traced_stack():
    receiver = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    stack = Stack(env={
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    })
    yield stack, receiver
    stack.stop_later(then=lambda: server.stop(None))  # it ends while the next tests run; the receiver outlives it


def generate(stack, metadata=None, max_tokens=5, text="Hello there", timeout=60.0):
    async def go():
        async with Client(stack.target, metadata) as client:
            return [p async for p in client.generate(text=text, max_tokens=max_tokens, ignore_eos=True)]

    return asyncio.run(asyncio.wait_for(go(), timeout))  # a hang fails the test instead of stalling the run


def wait_for_trace(receiver, trace_id: bytes, names: set[str], timeout=15.0) -> dict[str, tuple]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        spans = {s.name: (svc, s, a) for svc, s, a in receiver.trace(trace_id)}
        if names <= spans.keys():
            return spans
        time.sleep(0.1)
    raise AssertionError(f"spans of trace {trace_id.hex()}: {sorted(spans)}; wanted {sorted(names)}")


NAMES = {"inflight.v1.Inference/Generate", "tokenize", "inflight.scheduler.schedule", "inflight.worker.request", "queued", "prefill", "decode"}


def test_one_trace_across_three_processes_continuing_the_clients(traced_stack):
    stack, receiver = traced_stack
    generate(stack, [("traceparent", f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01")])
    spans = wait_for_trace(receiver, bytes.fromhex(CLIENT_TRACE), NAMES)
    by = {name: s for name, (_, s, _) in spans.items()}
    service = {name: svc for name, (svc, _, _) in spans.items()}
    assert service["inflight.v1.Inference/Generate"] == service["tokenize"] == "inflight-gateway"
    assert service["inflight.scheduler.schedule"] == "inflight-scheduler"
    assert {service[n] for n in ("inflight.worker.request", "queued", "prefill", "decode")} == {"inflight-worker"}
    # Parenting: client -> gateway -> (tokenize, scheduler -> worker -> queued/prefill/decode).
    assert by["inflight.v1.Inference/Generate"].parent_span_id == bytes.fromhex(CLIENT_SPAN)
    gw = by["inflight.v1.Inference/Generate"].span_id
    assert by["tokenize"].parent_span_id == gw
    assert by["inflight.scheduler.schedule"].parent_span_id == gw
    assert by["inflight.worker.request"].parent_span_id == by["inflight.scheduler.schedule"].span_id
    for child in ("queued", "prefill", "decode"):
        assert by[child].parent_span_id == by["inflight.worker.request"].span_id
    assert by["inflight.v1.Inference/Generate"].kind == 2  # SPAN_KIND_SERVER
    attrs = {a.key: a.value for a in by["inflight.v1.Inference/Generate"].attributes}
    assert attrs["gen_ai.operation.name"].string_value == "text_completion"
    assert attrs["gen_ai.request.model"].string_value == "SmolLM2-135M-Instruct"
    assert attrs["gen_ai.request.max_tokens"].int_value == 5
    assert attrs["gen_ai.usage.output_tokens"].int_value == 5
    assert list(attrs["gen_ai.response.finish_reasons"].array_value.values)[0].string_value == "length"
    worker_attrs = {a.key: a.value for a in by["inflight.worker.request"].attributes}
    assert worker_attrs["inflight.worker_id"].string_value == "worker-0"
    assert [e.name for e in by["inflight.worker.request"].events] == ["first_token"]
    resource = spans["inflight.worker.request"][2]
    assert resource["service.version"].string_value and resource["inflight.worker_id"].string_value == "worker-0"


def test_a_traced_load_splits_each_time_to_first_token_into_hops_in_causal_order(traced_stack):
    """bench.serving_load --breakdown's path: run_load sends a traceparent per stream
    (Client.session's metadata), the spans come back under those ids, and each request's
    moments, taken in four processes, follow each other: no hop is negative."""
    from bench.load import Target, run_load, span_row
    from bench.path_breakdown import HOPS, served_breakdown

    stack, receiver = traced_stack
    requests = [([1, 2, 3, 4, 5, 6, 7, 8 + i], 4) for i in range(6)]
    records = run_load({"": Target(stack.target)}, 2, requests=requests, trace=0x5EED)[""]["records"]
    assert len(records) == 6
    deadline = time.monotonic() + 15
    while True:
        with receiver.lock:
            traces = {}
            for svc, span, _ in receiver.spans:
                traces.setdefault(span.trace_id.hex(), []).append(span_row(svc, span))
        got = served_breakdown(records, traces, 0x5EED)
        if got["traced"] == 6 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert got["traced"] == 6, got
    hops = got["hops"]
    assert set(hops) == {name for name, _ in HOPS}
    assert all(h["p50"] >= 0 and h["p99"] >= 0 for h in hops.values()), hops  # every request's, since p99 is the max of 6
    assert hops["first steps"]["p50"] > 0.1  # a forward pass of the real model on the CPU
    mean_ttft = 1000 * sum(r[0] for r in records) / len(records)
    assert sum(h["mean"] for h in hops.values()) == pytest.approx(mean_ttft, abs=0.01)  # unix seconds as floats: 0.2 us steps


def test_without_traceparent_a_new_trace_still_spans_all_processes(traced_stack):
    stack, receiver = traced_stack
    before = {s.trace_id for _, s, _ in receiver.spans}
    generate(stack, text="A fresh request")
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        fresh = {s.trace_id for _, s, _ in receiver.spans if s.name == "inflight.v1.Inference/Generate"} - before
        if fresh:
            break
        time.sleep(0.1)
    [trace_id] = fresh
    spans = wait_for_trace(receiver, trace_id, NAMES)
    assert spans["inflight.v1.Inference/Generate"][1].parent_span_id == b""


def test_a_trace_the_client_did_not_sample_is_recorded_nowhere(traced_stack):
    # The default sampler follows the parent: flags 00 means no process records a span,
    # yet the request is served.
    stack, receiver = traced_stack
    unsampled, sampled = "5bf92f3577b34da6a3ce929d0e0e4737", "6bf92f3577b34da6a3ce929d0e0e4738"
    got = generate(stack, [("traceparent", f"00-{unsampled}-{CLIENT_SPAN}-00")], max_tokens=3)
    assert sum(len(p.token_ids) for p in got if isinstance(p, pb.Delta)) == 3
    generate(stack, [("traceparent", f"00-{sampled}-{CLIENT_SPAN}-01")], max_tokens=3)
    # Each process exports in order, so once the later trace is in from all three, the
    # earlier one would be too.
    wait_for_trace(receiver, bytes.fromhex(sampled), NAMES)
    assert receiver.trace(bytes.fromhex(unsampled)) == []


def test_errors_set_span_status_with_the_grpc_code(traced_stack):
    stack, receiver = traced_stack
    trace_id = "11112222333344445555666677778888"

    async def go():
        async with Client(stack.target, [("traceparent", f"00-{trace_id}-{CLIENT_SPAN}-01")]) as client:
            with pytest.raises(Exception):
                [p async for p in client.generate(text="hi", top_p=5.0)]

    asyncio.run(go())
    spans = wait_for_trace(receiver, bytes.fromhex(trace_id), {"inflight.v1.Inference/Generate"})
    span = spans["inflight.v1.Inference/Generate"][1]
    assert span.status.code == 2  # STATUS_CODE_ERROR
    assert "INVALID_ARGUMENT" in span.status.message and "sampling.top_p" in span.status.message


def test_counters_move_by_exactly_what_was_sent(traced_stack, tokenizer):
    stack, _ = traced_stack
    ok = "inflight_gateway_requests_total{code=OK,finish_reason=length,protocol=grpc}"
    gen = "inflight_gateway_generation_tokens_total{protocol=grpc}"
    prompt = "inflight_gateway_prompt_tokens_total{protocol=grpc}"
    wgen = "inflight_worker_generation_tokens_total"
    wdone = "inflight_worker_requests_finished_total{finish_reason=length}"
    routed = "inflight_scheduler_requests_routed_total{by=load}"
    before = {**stack.metrics("gateway"), **stack.metrics(0), **stack.metrics("scheduler")}
    texts = ["one two three", "Counting sheep at night", "x"]
    for t in texts:
        generate(stack, text=t, max_tokens=7)
    after_gw = stack.metrics("gateway")
    after_w = stack.metrics(0)
    after_s = stack.metrics("scheduler")
    assert after_gw[ok] - before.get(ok, 0) == 3
    assert after_gw[gen] - before.get(gen, 0) == 21
    assert after_gw[prompt] - before.get(prompt, 0) == sum(len(tokenizer.encode(t)) for t in texts)
    assert after_w[wgen] - before.get(wgen, 0) == 21
    assert after_w[wdone] - before.get(wdone, 0) == 3
    assert after_s[routed] - before.get(routed, 0) == 3
    ttft = "inflight_gateway_time_to_first_token_seconds_count{protocol=grpc}"
    assert after_gw[ttft] - before.get(ttft, 0) == 3
    assert after_s["inflight_scheduler_workers_alive{model=SmolLM2-135M-Instruct}"] == 1
    # One request at a time, 7 tokens each: at least 7 forward passes a request, its
    # prefill eager (engine totals reach the metrics at the next heartbeat).
    graph, eager = (f"inflight_worker_engine_steps_total{{mode={m}}}" for m in ("graph", "eager"))
    stack.wait_metric(0, eager, lambda v: v - before.get(eager, 0) >= 3)
    stack.wait_metric(0, eager, lambda v: v + stack.metrics(0).get(graph, 0) - before.get(eager, 0) - before.get(graph, 0) >= 21)


def test_every_process_reports_its_collector_pauses(traced_stack):
    # Each process settles its collector once started, with a full collection that the
    # pause histogram (installed first) has seen.
    stack, _ = traced_stack
    for process in ("gateway", "scheduler", 0):
        metrics = stack.metrics(process)
        assert metrics["inflight_gc_pause_seconds_count{generation=2}"] >= 1, process
        assert metrics["inflight_gc_pause_seconds_sum{generation=2}"] > 0, process


def test_health_and_ready_on_every_process(traced_stack):
    stack, _ = traced_stack
    for process in ("gateway", "scheduler", 0):
        assert stack.http_get(process, "/health") == (200, "ok\n")
        assert stack.http_get(process, "/ready")[0] == 200
    assert stack.http_get("gateway", "/nope")[0] == 404


def test_gateway_without_a_worker_is_alive_but_not_ready(model_dir):
    """A gateway whose scheduler has no worker for its model answers /health 200 and
    /ready 503, so Kubernetes keeps traffic away until a worker joins."""
    import subprocess
    import sys
    import urllib.error
    import urllib.request

    http = free_port()
    cmd = [sys.executable, "-m", "cli", "--log-level", "WARNING", "gateway", "--listen", f"127.0.0.1:{free_port()}",
           "--scheduler-address", f"tcp://127.0.0.1:{free_port()}", "--metrics-port", str(http), "--model", str(model_dir)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def get(path):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http}{path}", timeout=2) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                health = get("/health")
                break
            except (urllib.error.URLError, ConnectionError):
                assert proc.poll() is None, proc.stderr.read()
                assert time.monotonic() < deadline, "gateway's HTTP endpoint never came up"
                time.sleep(0.2)
        assert health == 200
        assert get("/ready") == 503
    finally:
        proc.terminate()
        proc.wait(30)


class HttpReceiver(Receiver):
    """An OTLP/HTTP trace receiver (POST /v1/traces, protobuf), keeping spans as Receiver does."""

    def __init__(self):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        super().__init__()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                ok = self.path == "/v1/traces" and self.headers.get("Content-Type") == "application/x-protobuf"
                if ok:
                    receiver.Export(trace_service_pb2.ExportTraceServiceRequest.FromString(body), None)
                self.send_response(200 if ok else 400)
                self.send_header("Content-Type", "application/x-protobuf")
                self.end_headers()
                self.wfile.write(trace_service_pb2.ExportTraceServiceResponse().SerializeToString() if ok else b"")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def export_children(root: int) -> list[tuple[int, int]]:
    """(parent pid, pid) of every span-export process under `root`."""
    out = []
    for c in children_of(root):
        try:
            with open(f"/proc/{c}/cmdline", "rb") as f:
                if b"inflight.span_export" in f.read():
                    out.append((root, c))
        except OSError:
            continue
        out.extend(export_children(c))
    return out


def span_export_processes(root: int) -> int:
    """How many span-export processes run under the process `root`."""
    return len(export_children(root))


def test_the_http_protobuf_protocol_reaches_an_otlp_http_receiver():
    receiver = HttpReceiver()
    stack = Stack(env={"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.port}", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
                       "OTEL_BSP_SCHEDULE_DELAY": "100"})
    try:
        trace_id = "7bf92f3577b34da6a3ce929d0e0e4739"
        generate(stack, [("traceparent", f"00-{trace_id}-{CLIENT_SPAN}-01")], max_tokens=3)
        spans = wait_for_trace(receiver, bytes.fromhex(trace_id), NAMES)
        assert {svc for svc, _, _ in spans.values()} == {"inflight-gateway", "inflight-scheduler", "inflight-worker"}
        assert span_export_processes(stack.proc.pid) == 3  # one a process
    finally:
        stack.stop_later(then=receiver.server.shutdown)  # it ends while the next tests run; the receiver outlives it


def test_otel_sdk_disabled_turns_tracing_off_even_with_an_endpoint():
    receiver = HttpReceiver()
    stack = Stack(env={"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.port}", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
                       "OTEL_SDK_DISABLED": "true"})
    try:
        got = generate(stack, [("traceparent", f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01")], max_tokens=3)
        assert sum(len(p.token_ids) for p in got if isinstance(p, pb.Delta)) == 3
        assert span_export_processes(stack.proc.pid) == 0  # nothing to export spans with
    finally:
        stack.stop()
        receiver.server.shutdown()
    assert receiver.spans == []


def test_a_killed_export_process_is_replaced_and_tracing_goes_on(traced_stack):
    import signal

    stack, receiver = traced_stack
    before = export_children(stack.proc.pid)
    assert len(before) == 3
    for _, pid in before:  # every process's exporter at once
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        after = export_children(stack.proc.pid)
        if len(after) == 3 and not {pid for _, pid in after} & {pid for _, pid in before}:
            break
        time.sleep(0.1)
    assert sorted(parent for parent, _ in after) == sorted(parent for parent, _ in before)
    trace_id = "8bf92f3577b34da6a3ce929d0e0e4730"
    generate(stack, [("traceparent", f"00-{trace_id}-{CLIENT_SPAN}-01")], max_tokens=3)
    wait_for_trace(receiver, bytes.fromhex(trace_id), NAMES)


def test_a_collector_that_is_down_costs_requests_nothing():
    # Nothing listens on the endpoint: the export processes retry and drop, the serving
    # processes never wait on them. The exporter gives up on a batch after
    # OTEL_EXPORTER_OTLP_TIMEOUT (seconds in this SDK; 10 by default), which stopping the
    # stack waits for: 2 still leaves it a retry.
    stack = Stack(env={"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{free_port()}", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
                       "OTEL_EXPORTER_OTLP_INSECURE": "true", "OTEL_BSP_SCHEDULE_DELAY": "100", "OTEL_EXPORTER_OTLP_TIMEOUT": "2"})
    try:
        for i in range(3):
            got = generate(stack, [("traceparent", f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01")], max_tokens=4, text=f"request {i}")
            assert sum(len(p.token_ids) for p in got if isinstance(p, pb.Delta)) == 4
        assert span_export_processes(stack.proc.pid) == 3
    finally:
        stack.stop_later()  # its exporters' last retry takes seconds; nothing looks at it again


def test_http_requests_continue_the_clients_trace_too(traced_stack):
    """The OpenAI HTTP API's `traceparent` header, as the gRPC metadata: one trace across
    the three processes under the client's span."""
    import json
    import urllib.request

    stack, receiver = traced_stack
    trace_id = "9999aaaabbbbccccddddeeeeffff0000"
    body = json.dumps({"model": "SmolLM2-135M-Instruct", "prompt": "Hello there", "max_tokens": 3}).encode()
    req = urllib.request.Request(f"{stack.base_url}/completions", body, {"Content-Type": "application/json",
                                                                          "traceparent": f"00-{trace_id}-{CLIENT_SPAN}-01"})
    with urllib.request.urlopen(req, timeout=60) as r:
        assert json.loads(r.read())["usage"]["completion_tokens"] >= 1
    name = "POST /v1/completions"
    spans = wait_for_trace(receiver, bytes.fromhex(trace_id), {name, "tokenize", "inflight.scheduler.schedule", "inflight.worker.request"})
    by = {n: s for n, (_, s, _) in spans.items()}
    assert by[name].parent_span_id == bytes.fromhex(CLIENT_SPAN)
    assert by["inflight.scheduler.schedule"].parent_span_id == by[name].span_id
    attrs = {a.key: a.value for a in by[name].attributes}
    assert attrs["http.request.method"].string_value == "POST" and attrs["gen_ai.operation.name"].string_value == "text_completion"
