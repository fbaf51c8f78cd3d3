"""GenerateStream: one Generate call's open requests and the events waiting to be sent.

Events of several requests go out in one message; a request's deltas that piled up
while the client was slow are merged into one, so a slow reader gets fewer, larger
messages rather than a growing backlog. A client that sends without reading stalls its
own stream: past BACKLOG_EVENTS unsent events the stream reads no more requests."""

from __future__ import annotations

import asyncio

import grpc

from gateway.output import OutputProcessor
from inflight.schema import RequestOutput
from inflight.v1 import pb

# Each refused start adds an event; without a bound a client that never reads could make
# the gateway hold any number of them.
BACKLOG_EVENTS = 1024
FINISH = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH}


def status_code(name: str) -> int:
    return grpc.StatusCode[name].value[0]


def logprobs_pb(lps) -> list[pb.TokenLogprob]:
    return [pb.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob,
                            top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in lp.top]) for lp in lps or ()]


def finished_pb(proc: OutputProcessor) -> pb.Finished:
    return pb.Finished(
        reason=FINISH[proc.finish_reason],
        usage=pb.Usage(prompt_tokens=proc.prompt_tokens, completion_tokens=proc.completion_tokens, cached_tokens=proc.cached_tokens),
        stop=proc.matched_stop,
    )


class GenerateStream:
    def __init__(self):
        self.open: dict = {}  # client request id -> its Generation (request_path.py)
        self._events: list[pb.Event] = []
        self._deltas: dict[str, pb.Delta] = {}  # unsent delta per request, to merge into
        self._wake = asyncio.Event()
        self._drained = asyncio.Event()
        self._reader_done = False
        self.failure: tuple[str, str] | None = None  # (code, message) that ends the whole call
        self.draining = False  # the gateway is stopping: the stream ends once nothing is open

    def push(self, request_id: str, out: RequestOutput, text: str, proc: OutputProcessor) -> None:
        """An output and the text it added (OutputProcessor.process)."""
        if out.new_token_ids or text or out.logprobs:
            delta = self._deltas.get(request_id)
            if delta is None:
                event = pb.Event(request_id=request_id, delta=pb.Delta())
                self._events.append(event)
                delta = self._deltas[request_id] = event.delta
            delta.token_ids.extend(out.new_token_ids)
            delta.text += text
            if out.logprobs:
                delta.logprobs.extend(logprobs_pb(out.logprobs))
        if out.error_code:
            self.error(request_id, out.error_code, out.error_message or "")
        elif proc.finish_reason:
            self.open.pop(request_id, None)
            self._deltas.pop(request_id, None)
            self._events.append(pb.Event(request_id=request_id, finished=finished_pb(proc)))
        self._wake.set()

    def error(self, request_id: str, code: str, message: str, ends_request: bool = True) -> None:
        """An error event; ends_request=False for refusing a duplicate start, whose id
        belongs to a request that goes on."""
        if ends_request:
            self.open.pop(request_id, None)
            self._deltas.pop(request_id, None)
        self._events.append(pb.Event(request_id=request_id, error=pb.Error(code=status_code(code), message=message)))
        self._wake.set()

    def drain(self) -> None:
        """End the stream as soon as its open requests have ended."""
        self.draining = True
        self._wake.set()

    def reader_done(self, failure: tuple[str, str] | None = None) -> None:
        """No more requests; `failure` (code, message) ends the call, open requests or not."""
        self._reader_done = True
        self.failure = failure
        self._wake.set()

    async def room(self) -> None:
        """Returns once the client has taken enough events for the stream to read on."""
        while len(self._events) >= BACKLOG_EVENTS:
            self._drained.clear()
            await self._drained.wait()

    async def take(self) -> list[pb.Event] | None:
        """Every event ready now (waiting for one); None once the stream is complete."""
        while not self._events:
            if (self._reader_done or self.draining) and (self.failure or not self.open):
                return None
            self._wake.clear()
            await self._wake.wait()
        events, self._events = self._events, []
        self._deltas.clear()
        self._drained.set()
        return events
