"""The scheduler process: its two ROUTER sockets and the loop between them.

Every request's lifecycle (admission, routing, worker registration and heartbeats,
cancellation, deadlines, failing a silent worker's requests, relaying token batches to
the owning gateway) lives in scheduler/lifecycle.py; its policies in admission.py and
routing.py; its config in config.py. This loop decodes what arrives, hands it to the lifecycle, and has it sweep
twice a second."""

from __future__ import annotations

import logging
import time

import zmq

from inflight import schema, sockets, telemetry
from inflight.http_endpoints import serve_http
from inflight.process import run_until_signalled
from scheduler.config import SchedulerConfig
from scheduler.lifecycle import RequestLifecycle
from scheduler.metrics import SchedulerMetrics

log = logging.getLogger("inflight.scheduler")


class Scheduler:
    def __init__(self, config: SchedulerConfig, metrics: SchedulerMetrics | None = None, tracing: bool = False):
        ctx = zmq.Context.instance()
        curve = sockets.CurveServer.load(config.curve_secret_key, config.curve_authorized_keys)
        self.authenticator = curve.start_authenticator(ctx) if curve else None
        front = self.front = sockets.router(ctx, config.gateway_address, curve)
        back = self.back = sockets.router(ctx, config.worker_address, curve)
        self.lifecycle = RequestLifecycle(config, metrics or SchedulerMetrics(), tracing,
                                          to_gateway=lambda identity, raw: front.send_multipart([identity, raw]),
                                          to_worker=lambda identity, raw: back.send_multipart([identity, raw]))
        self.running = True

    def on_gateway(self, identity: bytes, raw: bytes) -> None:
        msg = sockets.decode_or_log(schema.gateway_to_scheduler, raw, f"gateway {identity!r}")
        if msg is not None:
            self.lifecycle.on_gateway_message(identity, msg)

    def on_worker(self, identity: bytes, raw: bytes) -> None:
        msg = sockets.decode_or_log(schema.worker_to_scheduler, raw, f"worker {identity!r}")
        if msg is not None:
            self.lifecycle.on_worker_message(identity, msg, raw)

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.front, zmq.POLLIN)
        poller.register(self.back, zmq.POLLIN)
        next_sweep = time.monotonic() + 0.5
        while self.running:
            for sock, _ in poller.poll(500):
                for _ in range(1000):  # bounded, so one side cannot starve the other
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    if len(frames) != 2:  # identity and one message: anything else is not a peer of ours
                        log.error("dropped a message of %d frames from %r", len(frames), frames[0])
                        continue
                    try:
                        (self.on_gateway if sock is self.front else self.on_worker)(*frames)
                    except Exception:  # one bad message must not stop every request
                        log.exception("handling a message from %r failed; dropped it", frames[0])
            if time.monotonic() >= next_sweep:
                self.lifecycle.sweep(time.monotonic(), time.time())
                next_sweep = time.monotonic() + 0.5
        self.front.close()
        self.back.close()
        if self.authenticator:
            self.authenticator.stop()


def run(config: SchedulerConfig) -> None:
    tracing = telemetry.setup_tracing("inflight-scheduler")
    sched = Scheduler(config, SchedulerMetrics(), tracing)
    serve_http(config.metrics_host, config.metrics_port, ready=lambda: True)
    log.info("scheduler: gateways on %s, workers on %s, max %d queued", config.gateway_address, config.worker_address, config.max_queued)
    run_until_signalled(sched)
