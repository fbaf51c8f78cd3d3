"""What the gateway records per request: its server span (with a child span for the chat
template and tokenization) and the latency and token metrics users feel."""

from __future__ import annotations

import time
from contextlib import contextmanager

import prometheus_client as prom

from inflight import telemetry
from inflight.spans import SpanSketch

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
ITL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)
TOKEN_BUCKETS = (1, 8, 32, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
SCOPE = telemetry.scope_of("inflight.gateway")
PROTOCOL_ATTRIBUTES = {"grpc": {"rpc.system": "grpc"}, "http": {"http.request.method": "POST"}}


PROTOCOLS = ("grpc", "http")


class GatewayMetrics:
    """Every metric labelled by the protocol the request came in on (`grpc`, `http`), both
    present from the start so that a dashboard sees zeros rather than nothing."""

    def __init__(self):
        by = ["protocol"]
        self.ttft = prom.Histogram("inflight_gateway_time_to_first_token_seconds", "from request arrival to its first token", by, buckets=LATENCY_BUCKETS)
        self.itl = prom.Histogram("inflight_gateway_inter_token_latency_seconds", "time between tokens after the first, per token", by, buckets=ITL_BUCKETS)
        self.e2e = prom.Histogram("inflight_gateway_request_duration_seconds", "from request arrival to its end", by, buckets=LATENCY_BUCKETS)
        self.prompt_len = prom.Histogram("inflight_gateway_prompt_length_tokens", "prompt tokens per request", by, buckets=TOKEN_BUCKETS)
        self.gen_len = prom.Histogram("inflight_gateway_generation_length_tokens", "generated tokens per request", by, buckets=TOKEN_BUCKETS)
        self.requests = prom.Counter("inflight_gateway_requests", "requests ended, by protocol, finish reason and gRPC status", ["protocol", "finish_reason", "code"])
        self.prompt_tokens = prom.Counter("inflight_gateway_prompt_tokens", "prompt tokens of ended requests", by)
        self.generation_tokens = prom.Counter("inflight_gateway_generation_tokens", "tokens streamed to clients", by)
        self.running = prom.Gauge("inflight_gateway_requests_running", "requests open on this gateway", by)
        self.protocols = {p: ProtocolMetrics(self, p) for p in PROTOCOLS}


class ProtocolMetrics:
    """GatewayMetrics' children for one protocol, looked up once rather than per token."""

    def __init__(self, m: GatewayMetrics, protocol: str):
        self.protocol = protocol
        self.ttft, self.itl, self.e2e = m.ttft.labels(protocol), m.itl.labels(protocol), m.e2e.labels(protocol)
        self.prompt_len, self.gen_len = m.prompt_len.labels(protocol), m.gen_len.labels(protocol)
        self.prompt_tokens, self.generation_tokens = m.prompt_tokens.labels(protocol), m.generation_tokens.labels(protocol)
        self.running = m.running.labels(protocol)
        self._requests = m.requests

    def requests(self, finish_reason: str, code: str):
        return self._requests.labels(self.protocol, finish_reason, code)


class RequestTelemetry:
    """One request's span and timings. `operation` is "chat" or "text_completion",
    `protocol` "grpc" or "http"; with `tracing` off, the client's traceparent (if any) is
    passed on as it came."""

    __slots__ = ("metrics", "span", "traceparent", "start", "last", "tokens", "ended")

    def __init__(self, metrics: GatewayMetrics, name: str, traceparent: str | None, operation: str, tracing: bool,
                 protocol: str = "grpc"):
        self.metrics = metrics = metrics.protocols[protocol]
        self.start = self.last = time.monotonic()
        self.tokens = 0
        self.ended = False
        self.span = telemetry.start_span(SCOPE, name, traceparent, telemetry.SpanKind.SERVER,
                                         {"gen_ai.operation.name": operation, **PROTOCOL_ATTRIBUTES[protocol]}) if tracing else telemetry.Unrecorded(traceparent)
        self.traceparent = self.span.traceparent  # for the scheduler and the tokenize span
        metrics.running.inc()

    @contextmanager
    def preparing(self):
        """The chat template and tokenization, as a child span that the export process
        builds (its id is needed nowhere here)."""
        start = time.time_ns()
        error = None
        try:
            yield
        except Exception as e:
            error = f"{type(e).__name__}: {e}"  # as the SDK describes a span's exception
            raise
        finally:
            if self.span.recording:
                telemetry.build_elsewhere("inflight.gateway", self.traceparent,
                                          SpanSketch("tokenize", start, time.time_ns(), {}, error=error))

    def submitted(self, model: str, prompt_tokens: int, max_tokens: int, temperature: float) -> str | None:
        self.span.set_attributes({"gen_ai.request.model": model, "gen_ai.request.max_tokens": max_tokens,
                                  "gen_ai.request.temperature": temperature, "gen_ai.usage.input_tokens": prompt_tokens})
        return self.traceparent

    def on_tokens(self, n: int) -> None:
        """`n` tokens reached the client's stream."""
        if not n:
            return
        now = time.monotonic()
        if self.tokens == 0:
            self.metrics.ttft.observe(now - self.start)
            self.span.add_event("first_token")
        else:
            self.metrics.itl.observe((now - self.last) / n)  # one sample per delta: its tokens' mean gap
        self.tokens += n
        self.last = now
        self.metrics.generation_tokens.inc(n)

    def end(self, finish_reason: str | None, code: str, message: str = "", prompt_tokens: int = 0) -> None:
        if self.ended:
            return
        self.ended = True
        m = self.metrics
        m.running.dec()
        m.requests(finish_reason or "none", code).inc()
        m.e2e.observe(time.monotonic() - self.start)
        if prompt_tokens:
            m.prompt_len.observe(prompt_tokens)
            m.prompt_tokens.inc(prompt_tokens)
        m.gen_len.observe(self.tokens)
        attrs = {"gen_ai.usage.output_tokens": self.tokens, "rpc.grpc.status_code": code}
        if finish_reason:
            attrs["gen_ai.response.finish_reasons"] = [finish_reason]
        self.span.set_attributes(attrs)
        if code != "OK":
            self.span.set_error(code, message)
        self.span.end()
