"""SchedulerClient: the gateway's one DEALER socket to the scheduler.

Submits and aborts go out; token batches come back and are handed to the handler that
each request registered. A hello every few seconds keeps the model list fresh and
re-announces the gateway to a restarted scheduler."""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

import zmq
import zmq.asyncio

from inflight import schema, sockets
from inflight.schema import RequestOutput

log = logging.getLogger("inflight.gateway")

Handler = Callable[[RequestOutput], None]


class SchedulerClient:
    def __init__(self, address: str, gateway_id: str, on_models: Callable[[dict[str, schema.ModelInfo]], None] | None = None):
        self.address = address
        self.gateway_id = gateway_id
        self.ctx = zmq.asyncio.Context.instance()
        self.sock = sockets.dealer(self.ctx, gateway_id, address)
        self.handlers: dict[str, Handler] = {}
        self.models: dict[str, schema.ModelInfo] = {}
        self.on_models = on_models
        self._tasks: list[asyncio.Task] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._read()), asyncio.create_task(self._hello_loop())]

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        self.sock.close()

    def submit(self, submit: schema.Submit, handler: Handler) -> None:
        self.handlers[submit.request_id] = handler
        self.sock.send(schema.encode(submit), zmq.NOBLOCK)

    def abort(self, request_ids: list[str]) -> None:
        live = [rid for rid in request_ids if self.handlers.pop(rid, None) is not None]
        if live:
            self.sock.send(schema.encode(schema.Abort(live)), zmq.NOBLOCK)

    async def _hello_loop(self) -> None:
        while True:
            await self.sock.send(schema.encode(schema.GatewayHello(self.gateway_id)))
            await asyncio.sleep(0.5 if not self.models else 3.0)

    async def _read(self) -> None:
        while True:
            raw = await self.sock.recv()
            msg = sockets.decode_or_log(schema.scheduler_to_gateway, raw, "the scheduler")
            if msg is None:
                continue
            if isinstance(msg, schema.ModelsInfo):
                self.models = {m.name: m for m in msg.models}
                if self.on_models:
                    self.on_models(self.models)
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
                    log.exception("handling tokens of %s failed", item.request_id)
