"""The worker's part of a request's trace: one span from submission to the end, with
child spans for time queued, prefill and decode, and an event at the first token.
Timestamps are kept meanwhile and the spans described once, when the request ends; the
export process builds them (nothing here needs their ids), so the worker loop pays a
sketch a request for them, not SDK spans. With tracing off nothing is kept at all."""

from __future__ import annotations

import time

from inflight import telemetry
from inflight.telemetry import SpanSketch


class RequestTrace:
    __slots__ = ("traceparent", "submitted_ns", "scheduled_ns", "first_token_ns", "tokens", "prompt_tokens", "cached_tokens", "model", "max_tokens")

    def __init__(self, traceparent: str | None, model: str, max_tokens: int):
        self.traceparent = traceparent
        self.submitted_ns = time.time_ns()
        self.scheduled_ns: int | None = None
        self.first_token_ns: int | None = None
        self.tokens = 0
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.model = model
        self.max_tokens = max_tokens

    def first_output(self, scheduled_at: float | None, prompt_tokens: int, cached_tokens: int) -> None:
        """Once, at the request's first tokens. After that the worker loop only adds to
        `tokens`, since it does so for every running request on every step."""
        self.first_token_ns = time.time_ns()
        if scheduled_at is not None:
            self.scheduled_ns = int(scheduled_at * 1e9)
        self.prompt_tokens = prompt_tokens
        self.cached_tokens = cached_tokens

    def finish(self, worker_id: str, finish_reason: str | None, error_code: str | None, error_message: str = "",
               prompt_tokens: int = 0, cached_tokens: int = 0) -> None:
        end = time.time_ns()
        self.prompt_tokens = prompt_tokens or self.prompt_tokens  # the last count holds (a preempted prompt is cached anew)
        self.cached_tokens = cached_tokens or self.cached_tokens
        attributes = {
            "gen_ai.request.model": self.model,
            "gen_ai.request.max_tokens": self.max_tokens,
            "gen_ai.usage.input_tokens": self.prompt_tokens,
            "gen_ai.usage.output_tokens": self.tokens,
            "inflight.worker_id": worker_id,
            "inflight.cached_prompt_tokens": self.cached_tokens,
        }
        if finish_reason:
            attributes["gen_ai.response.finish_reasons"] = [finish_reason]
        span = SpanSketch("inflight.worker.request", self.submitted_ns, end, attributes)
        if error_code:
            attributes["rpc.grpc.status_code"] = error_code
            span.error = telemetry.error_description(error_code, error_message)
        scheduled = self.scheduled_ns or end
        span.children.append(SpanSketch("queued", self.submitted_ns, scheduled, {}))
        if self.first_token_ns is not None:
            span.events.append(("first_token", self.first_token_ns))
            span.children.append(SpanSketch("prefill", scheduled, self.first_token_ns, {
                "inflight.prompt_tokens": self.prompt_tokens, "inflight.cached_prompt_tokens": self.cached_tokens}))
            span.children.append(SpanSketch("decode", self.first_token_ns, end, {"gen_ai.usage.output_tokens": self.tokens}))
        telemetry.build_elsewhere("inflight.worker", self.traceparent, span)
