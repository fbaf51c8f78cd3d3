"""The gateway process: grpc.aio on uvloop. Stateless: any number can run behind one
load balancer or on one port (SO_REUSEPORT)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import socket
import ssl
import uuid
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gateway.openai_api import HttpServer, OpenAIApi
from gateway.request_path import RequestPath
from gateway.scheduler_client import SCHEDULER_TIMEOUT, SchedulerClient
from gateway.servicer import InferenceServicer, TokenCheck, add_to_server
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
class TlsConfig:
    """The gRPC port's TLS (flags --tls-cert, --tls-key, --tls-client-ca); the gateway's and
    `inflight serve`'s, which hands it on."""

    cert: str = dataclasses.field(default="", metadata={"help": "PEM certificate chain of the gRPC port; with --tls-key turns TLS on (unset: plaintext)"})
    key: str = dataclasses.field(default="", metadata={"help": "PEM private key of --tls-cert"})
    client_ca: str = dataclasses.field(default="", metadata={"help": "PEM CA certificates for mutual TLS: every client must present a certificate they signed"})


@dataclasses.dataclass
class GatewayConfig:
    listen: str = dataclasses.field(default="localhost:50051", metadata={"help": "host:port for gRPC clients"})
    http_listen: str = dataclasses.field(default="localhost:8000", metadata={"help": "host:port for the OpenAI-compatible HTTP API (POST /v1/chat/completions, POST /v1/completions, GET /v1/models; server-sent events with stream: true), served beside gRPC by the same process with the same TLS and bearer tokens; several gateway processes share it (SO_REUSEPORT); empty turns it off"})
    scheduler_address: str = dataclasses.field(default=sockets.GATEWAY_ADDRESS, metadata={"help": "the scheduler's ZeroMQ address for gateways"})
    model: str | None = dataclasses.field(default=None, metadata={"help": "model directory whose tokenizer and chat template to use; unset means the built-in SmolLM2-135M-Instruct"})
    served_model_name: str = dataclasses.field(default="", metadata={"help": "name clients use for the model; unset means the one the workers derive"})
    gateway_id: str = dataclasses.field(default="", metadata={"help": "identity toward the scheduler; unset means host-pid-random"})
    metrics_port: int = dataclasses.field(default=9400, metadata={"help": "HTTP port for /metrics, /health and /ready; 0 means off"})
    metrics_host: str = dataclasses.field(default="127.0.0.1", metadata={"help": "address /metrics, /health and /ready listen on; 0.0.0.0 for every interface"})
    tls: TlsConfig = dataclasses.field(default_factory=TlsConfig)
    # A file, not the token itself: a flag's value shows in `ps`.
    auth_token_file: str = dataclasses.field(default="", metadata={"help": "file of bearer tokens, one a line: every Inference call must carry `authorization: Bearer <one of them>` (health and reflection stay open)"})
    # gRPC's own default, stated: a request within every other limit (1 MiB of prompt text,
    # max_seq_len token ids) is well under it, and a bigger one is only more bytes to refuse.
    max_receive_message_bytes: int = dataclasses.field(default=4 << 20, metadata={"help": "largest request message gRPC accepts (a bigger one gets RESOURCE_EXHAUSTED), and largest HTTP request body (413)"})
    # Each open request holds memory here, in the scheduler and on a worker; a client that
    # needs more concurrency opens more streams, which a load balancer can spread.
    max_open_requests_per_stream: int = dataclasses.field(default=1024, metadata={"help": "open requests one Generate stream may hold; one more start gets RESOURCE_EXHAUSTED"})
    curve_secret_key: str = dataclasses.field(default="", metadata={"help": "CURVE: this gateway's key pair file (*.key_secret), for a scheduler on another host"})
    curve_server_key: str = dataclasses.field(default="", metadata={"help": "CURVE: the scheduler's public key file (*.key)"})
    drain_timeout: float = dataclasses.field(default=30.0, metadata={"help": "on SIGTERM, seconds for the requests in flight to finish (health says NOT_SERVING and new ones get UNAVAILABLE meanwhile) before the rest are cancelled"})


def _read(path: str, flag: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise SystemExit(f"error: {flag} {path}: {e.strerror}") from None


def server_credentials(tls: TlsConfig) -> grpc.ServerCredentials | None:
    """TLS (mutual with --tls-client-ca) for the gRPC port, its files checked up front; None
    means plaintext."""
    if not (tls.cert or tls.key or tls.client_ca):
        return None
    if not (tls.cert and tls.key):
        raise SystemExit("error: TLS needs both --tls-cert and --tls-key")
    chain, key = _read(tls.cert, "--tls-cert"), _read(tls.key, "--tls-key")
    if b"-----BEGIN CERTIFICATE-----" not in chain:
        raise SystemExit(f"error: --tls-cert {tls.cert}: no PEM certificate in it")
    if b"PRIVATE KEY-----" not in key:
        raise SystemExit(f"error: --tls-key {tls.key}: no PEM private key in it")
    try:  # gRPC would only fail at each handshake; OpenSSL says now
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(tls.cert, tls.key, password=lambda: b"")
    except ssl.SSLError as e:
        if e.reason == "KEY_VALUES_MISMATCH":
            raise SystemExit(f"error: --tls-key {tls.key} is not the key of the certificate in --tls-cert {tls.cert}") from None
        raise SystemExit(f"error: --tls-cert {tls.cert} with --tls-key {tls.key}: unusable "
                         f"({e.reason or e}; an encrypted key is not supported)") from None
    client_ca = None
    if tls.client_ca:
        client_ca = _read(tls.client_ca, "--tls-client-ca")
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=client_ca.decode("ascii", "replace"))
        except ssl.SSLError as e:
            raise SystemExit(f"error: --tls-client-ca {tls.client_ca}: no usable PEM CA certificate ({e.reason or e})") from None
    return grpc.ssl_server_credentials([(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None)


def bearer_tokens(config: GatewayConfig) -> list[str]:
    """The tokens in --auth-token-file, one a line (blank lines skipped); none means no check."""
    if not config.auth_token_file:
        return []
    try:
        text = _read(config.auth_token_file, "--auth-token-file").decode("ascii")
    except UnicodeDecodeError:
        raise SystemExit(f"error: --auth-token-file {config.auth_token_file}: tokens must be ASCII") from None
    tokens = [line.strip() for line in text.splitlines() if line.strip()]
    if not tokens:
        raise SystemExit(f"error: --auth-token-file {config.auth_token_file}: no token in it")
    if any(not t.isprintable() or " " in t for t in tokens):
        raise SystemExit(f"error: --auth-token-file {config.auth_token_file}: a token holds a space or a control character")
    return tokens


def resolve_model(config: GatewayConfig) -> tuple[TextTokenizer, str]:
    model_dir = locate_model(config.model)
    return TextTokenizer.from_dir(model_dir), config.served_model_name or served_model_name(model_dir)


async def serve(config: GatewayConfig, ready: asyncio.Event | None = None) -> None:
    credentials, tokens = server_credentials(config.tls), bearer_tokens(config)
    tokenizer, model_name = resolve_model(config)
    gateway_id = config.gateway_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    health_servicer = health.aio.HealthServicer()
    loop = asyncio.get_running_loop()

    def on_models(models) -> None:
        serving = model_name in models and not servicer.draining
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE):
            loop.create_task(health_servicer.set(name, status))

    curve = sockets.CurveClient.load(config.curve_secret_key, config.curve_server_key)
    client = SchedulerClient(config.scheduler_address, gateway_id, on_models, curve)
    # SO_REUSEPORT (grpc's default on Linux, stated): several gateway processes share --listen
    # (`inflight serve --gateways N`), the kernel spreading new connections over them.
    server = grpc.aio.server(options=[("grpc.so_reuseport", 1), ("grpc.max_receive_message_length", config.max_receive_message_bytes)],
                             interceptors=[TokenCheck(tokens)] if tokens else None)
    path = RequestPath(client, tokenizer, model_name, gateway_id, GatewayMetrics())
    servicer = InferenceServicer(path, config.max_open_requests_per_stream)
    add_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    for name in ("", SERVICE):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    # Before the gRPC server starts: a port that cannot be had ends the process with one line.
    serve_http(config.metrics_host, config.metrics_port, ready=lambda: model_name in client.models)
    try:
        port = server.add_secure_port(config.listen, credentials) if credentials else server.add_insecure_port(config.listen)
    except RuntimeError:  # grpc.aio raises where grpc returns 0
        port = 0
    if port == 0:
        raise SystemExit(f"error: cannot listen on {config.listen}")
    http = None
    if config.http_listen:  # one process, one loop: uvicorn beside grpc.aio
        api = OpenAIApi(path, config.max_receive_message_bytes, TokenCheck(tokens).problem if tokens else None)
        http = HttpServer(api.app, config.http_listen, *((config.tls.cert, config.tls.key, config.tls.client_ca) if credentials else ()))
    # The port listens from here on, and beside other gateways on it (SO_REUSEPORT) gets its
    # share of new connections at once: they wait unanswered until the scheduler has said
    # what it serves (or for SCHEDULER_TIMEOUT), rather than meet UNAVAILABLE.
    client.start()
    try:
        await asyncio.wait_for(client.answered.wait(), SCHEDULER_TIMEOUT)
    except asyncio.TimeoutError:
        pass
    await server.start()
    if http is not None:
        await http.start()
    settle_gc()
    security = ("mutual TLS" if config.tls.client_ca else "TLS" if credentials else "plaintext") + (", bearer token" if tokens else "")
    log.info("gateway %s listening on %s (gRPC) and %s (HTTP) (%s) for model %s (scheduler %s)", gateway_id, config.listen,
             config.http_listen or "nothing", security, model_name, config.scheduler_address)
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
    if http is not None:
        await http.stop()
    await server.stop(grace=1.0)  # the streams send their last events and end
    await client.close()


def run(config: GatewayConfig) -> None:
    import uvloop

    telemetry.setup_tracing("inflight-gateway")
    try:
        uvloop.run(serve(config))
    finally:
        telemetry.shutdown_tracing()
