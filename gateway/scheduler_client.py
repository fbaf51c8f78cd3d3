"""SchedulerClient: the gateway's one DEALER socket to the scheduler.

Submits and aborts go out; token batches come back and are handed to the handler that
each request registered. A hello every second keeps the model list fresh, re-announces
the gateway to a restarted scheduler, and tells whether the scheduler is there: it
answers each one. With no word from it for SCHEDULER_TIMEOUT, or an answer from a new
scheduler (a restart: it never knew our requests), the requests in flight end with
UNAVAILABLE rather than wait for tokens that will not come."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

import zmq
import zmq.asyncio

from inflight import errors, schema, sockets
from inflight.schema import RequestOutput, error_output

log = logging.getLogger("inflight.gateway")

Handler = Callable[[RequestOutput], None]

HELLO_INTERVAL = 1.0  # seconds between hellos, each answered with the models served
SCHEDULER_TIMEOUT = 3.0  # seconds without an answer before the scheduler counts as gone


class SchedulerClient:
    def __init__(self, address: str, gateway_id: str, on_models: Callable[[dict[str, schema.ModelInfo]], None] | None = None,
                 curve: sockets.CurveClient | None = None):
        self.address = address
        self.gateway_id = gateway_id
        self.ctx = zmq.asyncio.Context.instance()
        self.sock = sockets.dealer(self.ctx, gateway_id, address, curve)
        self.handlers: dict[str, Handler] = {}
        self.models: dict[str, schema.ModelInfo] = {}
        self.on_models = on_models
        self._tasks: list[asyncio.Task] = []
        self.last_heard: float | None = None  # monotonic time of the scheduler's last message
        self.scheduler = ""  # the incarnation of the scheduler last heard
        self.answered = asyncio.Event()  # set by the scheduler's first answer

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._read()), asyncio.create_task(self._hello_loop())]

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        self.sock.close()

    def submit(self, submit: schema.Submit, handler: Handler) -> None:
        raw = schema.encode(submit)  # first: a submit that cannot be encoded leaves no handler behind
        self.handlers[submit.request_id] = handler
        self.sock.send(raw, zmq.NOBLOCK)

    def abort(self, request_ids: list[str]) -> None:
        live = [rid for rid in request_ids if self.handlers.pop(rid, None) is not None]
        if live:
            self.sock.send(schema.encode(schema.Abort(live)), zmq.NOBLOCK)

    async def _hello_loop(self) -> None:
        while True:
            await self.sock.send(schema.encode(schema.GatewayHello(self.gateway_id)))
            await asyncio.sleep(HELLO_INTERVAL)
            if self.last_heard is not None and time.monotonic() - self.last_heard > SCHEDULER_TIMEOUT:
                if self.models:
                    log.error("no word from the scheduler at %s for %.0fs", self.address, time.monotonic() - self.last_heard)
                    self._set_models({})
                self.fail_all(f"lost contact with the scheduler for {SCHEDULER_TIMEOUT:.0f}s")

    def fail_all(self, message: str) -> None:
        """End every request in flight with UNAVAILABLE."""
        handlers, self.handlers = self.handlers, {}
        for rid, handler in handlers.items():
            try:
                handler(error_output(rid, errors.UNAVAILABLE, message))
            except Exception:
                log.exception("ending %s failed", rid)

    def _set_models(self, models: dict[str, schema.ModelInfo]) -> None:
        self.models = models
        if self.on_models:
            self.on_models(models)

    async def _read(self) -> None:
        while True:
            raw = await self.sock.recv()
            msg = sockets.decode_or_log(schema.scheduler_to_gateway, raw, "the scheduler")
            if msg is None:
                continue
            self.last_heard = time.monotonic()
            if isinstance(msg, schema.ModelsInfo):
                if msg.scheduler != self.scheduler:
                    if self.scheduler and self.handlers:
                        log.error("the scheduler restarted; ending the %d requests in flight", len(self.handlers))
                        self.fail_all("the scheduler restarted; the request was lost")
                    self.scheduler = msg.scheduler
                self._set_models({m.name: m for m in msg.models})
                self.answered.set()
                continue
            for item in msg.items:
                handler = self.handlers.get(item.request_id)
                if handler is None:
                    continue  # aborted here already
                if item.finished:
                    del self.handlers[item.request_id]
                try:
                    handler(item)
                except Exception:
                    # The request ends here, with INTERNAL, rather than stay open with its
                    # stream waiting for an end that will not come.
                    log.exception("handling tokens of %s failed; ending it", item.request_id)
                    if not item.finished:
                        self.abort([item.request_id])
                    try:
                        handler(error_output(item.request_id, errors.INTERNAL, "the gateway failed to handle this request's output"))
                    except Exception:
                        log.exception("ending %s failed", item.request_id)
