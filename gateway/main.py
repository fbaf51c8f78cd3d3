"""The gateway process: grpc.aio on uvloop. Stateless: any number can run behind one
load balancer or on one port (SO_REUSEPORT)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import socket
import uuid

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gateway.scheduler_client import SchedulerClient
from gateway.servicer import InferenceServicer, add_to_server
from gateway.telemetry import GatewayMetrics
from gateway.tokenizer import TextTokenizer
from inflight import sockets, telemetry
from inflight.http_endpoints import serve_http
from inflight.process import settle_gc
from inflight.v1 import pb
from models.config import served_model_name
from models.locate import locate_model

log = logging.getLogger("inflight.gateway")

SERVICE = pb.DESCRIPTOR.services_by_name["Inference"].full_name


@dataclasses.dataclass
class GatewayConfig:
    listen: str = dataclasses.field(default="localhost:50051", metadata={"help": "host:port for gRPC clients"})
    scheduler_address: str = dataclasses.field(default=sockets.GATEWAY_ADDRESS, metadata={"help": "the scheduler's ZeroMQ address for gateways"})
    model: str | None = dataclasses.field(default=None, metadata={"help": "model directory whose tokenizer and chat template to use; unset means the built-in SmolLM2-135M-Instruct"})
    served_model_name: str = dataclasses.field(default="", metadata={"help": "name clients use for the model; unset means the one the workers derive"})
    gateway_id: str = dataclasses.field(default="", metadata={"help": "identity toward the scheduler; unset means host-pid-random"})
    metrics_port: int = dataclasses.field(default=9400, metadata={"help": "HTTP port for /metrics, /health and /ready; 0 means off"})
    # gRPC's own default, stated: a request within every other limit (1 MiB of prompt text,
    # max_seq_len token ids) is well under it, and a bigger one is only more bytes to refuse.
    max_receive_message_bytes: int = dataclasses.field(default=4 << 20, metadata={"help": "largest request message gRPC accepts; a bigger one gets RESOURCE_EXHAUSTED"})
    # Each open request holds memory here, in the scheduler and on a worker; a client that
    # needs more concurrency opens more streams, which a load balancer can spread.
    max_open_requests_per_stream: int = dataclasses.field(default=1024, metadata={"help": "open requests one Generate stream may hold; one more start gets RESOURCE_EXHAUSTED"})
    drain_timeout: float = dataclasses.field(default=30.0, metadata={"help": "on SIGTERM, seconds for the requests in flight to finish (health says NOT_SERVING and new ones get UNAVAILABLE meanwhile) before the rest are cancelled"})


def resolve_model(config: GatewayConfig) -> tuple[TextTokenizer, str]:
    model_dir = locate_model(config.model)
    return TextTokenizer.from_dir(model_dir), config.served_model_name or served_model_name(model_dir)


async def serve(config: GatewayConfig, ready: asyncio.Event | None = None) -> None:
    tokenizer, model_name = resolve_model(config)
    gateway_id = config.gateway_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    health_servicer = health.aio.HealthServicer()
    loop = asyncio.get_running_loop()

    def on_models(models) -> None:
        serving = model_name in models and not servicer.draining
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE):
            loop.create_task(health_servicer.set(name, status))

    client = SchedulerClient(config.scheduler_address, gateway_id, on_models)
    server = grpc.aio.server(options=[("grpc.so_reuseport", 1), ("grpc.max_receive_message_length", config.max_receive_message_bytes)])
    servicer = InferenceServicer(client, tokenizer, model_name, gateway_id, GatewayMetrics(), config.max_open_requests_per_stream)
    add_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    for name in ("", SERVICE):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    port = server.add_insecure_port(config.listen)
    if port == 0:
        raise SystemExit(f"error: cannot listen on {config.listen}")
    await server.start()
    client.start()
    serve_http("", config.metrics_port, ready=lambda: model_name in client.models)
    settle_gc()
    log.info("gateway %s listening on %s for model %s (scheduler %s)", gateway_id, config.listen, model_name, config.scheduler_address)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    # Drain: say NOT_SERVING (load balancers stop sending), refuse new requests, let the
    # ones in flight finish; a second signal cuts it short.
    log.info("gateway draining %d requests in flight (at most %.0fs)", servicer.in_flight(), config.drain_timeout)
    servicer.drain()
    for name in ("", SERVICE):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    stop.clear()
    deadline = loop.time() + config.drain_timeout
    while servicer.in_flight() and loop.time() < deadline and not stop.is_set():
        await asyncio.sleep(0.05)
    log.info("gateway shutting down")
    await server.stop(grace=1.0)  # the streams send their last events and end
    await client.close()


def run(config: GatewayConfig) -> None:
    import uvloop

    telemetry.setup_tracing("inflight-gateway")
    try:
        uvloop.run(serve(config))
    finally:
        telemetry.shutdown_tracing()
