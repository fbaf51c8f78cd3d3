"""Spans on their way from a serving process to its export process: the sketch of a span
described after the fact (`SpanSketch`), our instrumentation version, and the parent
context a `traceparent` names. Both sides import this; neither imports the other's code
but telemetry, which starts the export process."""

from __future__ import annotations

import msgspec
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

VERSION = "0.1.0"
_propagator = TraceContextTextMapPropagator()


def context_from(traceparent: str | None):
    """The parent context a `traceparent` header names (None: start a new trace)."""
    if not traceparent:
        return None
    return _propagator.extract({"traceparent": traceparent})


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
