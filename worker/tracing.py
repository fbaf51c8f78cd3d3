"""The worker's part of a request's trace: one span from submission to the end, with
child spans for time queued, prefill and decode, and an event at the first token.
Spans are written once, when the request ends, from timestamps kept meanwhile; with
tracing off nothing is kept at all."""

from __future__ import annotations

import time

from opentelemetry import trace

from inflight import telemetry


class RequestTrace:
    __slots__ = ("parent", "submitted_ns", "scheduled_ns", "first_token_ns", "tokens", "prompt_tokens", "cached_tokens", "model", "max_tokens")

    def __init__(self, traceparent: str | None, model: str, max_tokens: int):
        self.parent = telemetry.context_from(traceparent)
        self.submitted_ns = time.time_ns()
        self.scheduled_ns: int | None = None
        self.first_token_ns: int | None = None
        self.tokens = 0
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.model = model
        self.max_tokens = max_tokens

    def on_output(self, new_tokens: int, scheduled_at: float | None, prompt_tokens: int, cached_tokens: int) -> None:
        if self.first_token_ns is None and new_tokens:
            self.first_token_ns = time.time_ns()
        if self.scheduled_ns is None and scheduled_at is not None:
            self.scheduled_ns = int(scheduled_at * 1e9)
        self.tokens += new_tokens
        self.prompt_tokens = prompt_tokens or self.prompt_tokens
        self.cached_tokens = cached_tokens or self.cached_tokens

    def finish(self, tracer: trace.Tracer, worker_id: str, finish_reason: str | None, error_code: str | None, error_message: str = "") -> None:
        end = time.time_ns()
        span = tracer.start_span("inflight.worker.request", context=self.parent, start_time=self.submitted_ns, attributes={
            "gen_ai.request.model": self.model,
            "gen_ai.request.max_tokens": self.max_tokens,
            "gen_ai.usage.input_tokens": self.prompt_tokens,
            "gen_ai.usage.output_tokens": self.tokens,
            "inflight.worker_id": worker_id,
            "inflight.cached_prompt_tokens": self.cached_tokens,
        })
        if finish_reason:
            span.set_attribute("gen_ai.response.finish_reasons", [finish_reason])
        if error_code:
            telemetry.end_with_error(span, error_code, error_message)
        ctx = trace.set_span_in_context(span)
        scheduled = self.scheduled_ns or end
        tracer.start_span("queued", context=ctx, start_time=self.submitted_ns).end(end_time=scheduled)
        if self.first_token_ns is not None:
            prefill = tracer.start_span("prefill", context=ctx, start_time=scheduled,
                                        attributes={"inflight.prompt_tokens": self.prompt_tokens, "inflight.cached_prompt_tokens": self.cached_tokens})
            prefill.end(end_time=self.first_token_ns)
            span.add_event("first_token", timestamp=self.first_token_ns)
            decode = tracer.start_span("decode", context=ctx, start_time=self.first_token_ns, attributes={"gen_ai.usage.output_tokens": self.tokens})
            decode.end(end_time=end)
        span.end(end_time=end)
