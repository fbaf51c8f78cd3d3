"""The worker process: one per GPU (or one on the CPU). Its config, loading the engine, its
socket to the scheduler and the loop: take submissions and aborts between engine steps,
run a step, send one TokenBatch per gateway carrying every new token, heartbeat.

What happens to each request (owning gateway, deadline, trace record, engine-step
failures) and what the hello and heartbeat carry live in worker/lifecycle.py."""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import socket
import sys
import time

import zmq

from inflight import schema, sockets, telemetry
from inflight.http_endpoints import serve_http
from inflight.process import run_until_signalled
from inflight.schema import RequestOutput
from models.config import served_model_name
from worker.engine_api import Engine, EngineConfig, EngineConfigError
from worker.lifecycle import WorkerRequests
from worker.metrics import WorkerMetrics

log = logging.getLogger("inflight.worker")

HELLO_INTERVAL = 5.0  # seconds between re-announcements to the scheduler
MAX_INTAKE = 1024  # messages taken between two steps at most


@dataclasses.dataclass
class WorkerConfig:
    scheduler_address: str = dataclasses.field(default=sockets.WORKER_ADDRESS, metadata={"help": "the scheduler's ZeroMQ address for workers"})
    worker_id: str = dataclasses.field(default="", metadata={"help": "name in logs, traces and routing; unset means host-pid"})
    engine: str = dataclasses.field(default="embedded", metadata={"help": "embedded (ours, PyTorch; also on the CPU), trtllm (TensorRT-LLM's LLM API on NVIDIA GPUs: pip install 'inflight[trtllm]'), or module:Class of another Engine implementation (testing.engine_double:InstantEngine)"})
    served_model_name: str = dataclasses.field(default="", metadata={"help": "name clients use for the model; unset means the model directory's name"})
    heartbeat_interval: float = dataclasses.field(default=0.5, metadata={"help": "seconds between heartbeats with engine stats"})
    curve_secret_key: str = dataclasses.field(default="", metadata={"help": "CURVE: this worker's key pair file (*.key_secret), for a scheduler on another host"})
    curve_server_key: str = dataclasses.field(default="", metadata={"help": "CURVE: the scheduler's public key file (*.key)"})
    launch_wait: bool = dataclasses.field(default=False, metadata={"help": "while the device still runs the queued step, keep taking in requests until just before the next step must launch (the engine predicts when, from the CUDA graph timings taken at start-up), so that they join it rather than the one after; off (the default until it is measured on a GPU): launch at once"})
    drain_timeout: float = dataclasses.field(default=30.0, metadata={"help": "on SIGTERM, seconds to finish the requests held before stopping (the scheduler moves what is left to other workers; a second signal stops at once)"})
    metrics_host: str = dataclasses.field(default="127.0.0.1", metadata={"help": "address /metrics, /health and /ready listen on; 0.0.0.0 for every interface"})
    metrics_port: int = dataclasses.field(default=9402, metadata={"help": "HTTP port for /metrics, /health and /ready; 0 means off"})
    engine_config: EngineConfig = dataclasses.field(default_factory=EngineConfig, metadata={"flatten": True})


def load_engine(config: WorkerConfig) -> Engine:
    if config.engine == "embedded":
        if config.engine_config.tensor_parallel_size != 1:
            raise EngineConfigError("tensor_parallel_size: the embedded engine runs on one device; --engine trtllm spans several GPUs")
        from worker.embedded.engine import EmbeddedEngine

        return EmbeddedEngine(config.engine_config)
    if config.engine == "trtllm":
        from worker.trtllm.engine import TrtllmEngine

        return TrtllmEngine(config.engine_config)
    module, _, attr = config.engine.partition(":")
    if not attr:
        raise EngineConfigError(f"--engine must be embedded, trtllm or module:Class, got {config.engine!r}")
    return getattr(importlib.import_module(module), attr)(config.engine_config)


def model_name(config: WorkerConfig, engine: Engine) -> str:
    if config.served_model_name:
        return config.served_model_name
    model_dir = getattr(engine, "model_dir", None) or config.engine_config.model
    return served_model_name(model_dir) if model_dir else "default"


class Worker:
    def __init__(self, config: WorkerConfig, engine: Engine, worker_id: str, metrics: WorkerMetrics, tracing: bool,
                 curve: sockets.CurveClient | None = None):
        self.config = config
        self.engine = engine
        self.sock = sockets.dealer(zmq.Context.instance(), worker_id, config.scheduler_address, curve)
        self.lifecycle = WorkerRequests(engine, self.sock.send, worker_id, model_name(config, engine),
                                        config.engine_config.max_batch_size, metrics, tracing)
        self.running = True
        self.signals = 0  # SIGTERM/SIGINT received (inflight.process)

    @property
    def broken(self) -> bool:
        """Stopped because its engine kept failing: the process exits 1."""
        return self.lifecycle.engine_broken

    def run(self) -> None:
        lifecycle, engine, sock = self.lifecycle, self.engine, self.sock
        lifecycle.hello()
        next_hello = time.monotonic() + HELLO_INTERVAL
        next_heartbeat = 0.0
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        drain_until = None  # set when told to stop: finish what is held, until then
        launch_wait = getattr(engine, "launch_wait", None) if self.config.launch_wait else None
        while True:
            if not self.running:
                if drain_until is None:
                    drain_until = time.monotonic() + self.config.drain_timeout
                    log.info("draining %d requests (at most %.0fs)", len(lifecycle.owner), self.config.drain_timeout)
                    lifecycle.leaving(gone=False)
                if not engine.has_work() or time.monotonic() >= drain_until or self.signals > 1:
                    break
            out: dict[bytes, list[RequestOutput]] = {}
            busy = engine.has_work()
            wait = launch_wait() if busy and launch_wait is not None else 0.0
            timeout = wait * 1000 if busy else max(0, next_heartbeat - time.monotonic()) * 1000
            deadline = time.monotonic() + wait
            while poller.poll(timeout):
                for _ in range(MAX_INTAKE):  # what arrived before this step, bounded: steps and heartbeats go on under a flood
                    try:
                        raw = sock.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    msg = sockets.decode_or_log(schema.scheduler_to_worker, raw, "the scheduler")
                    if msg is not None:
                        lifecycle.handle(msg, out)
                # While the device still runs the queued step, more requests may join the next.
                timeout = (deadline - time.monotonic()) * 1000
                if not busy or timeout < 0.1:
                    break
            if engine.has_work():
                lifecycle.step(out)
            heartbeat_due = time.monotonic() >= next_heartbeat
            if heartbeat_due:
                lifecycle.expire(time.time(), out)
            lifecycle.flush(out)
            if lifecycle.engine_broken:
                log.error("the engine failed %d steps in a row; stopping, for a fresh start", lifecycle.failed_steps)
                break
            if heartbeat_due:
                lifecycle.heartbeat()
                next_heartbeat = time.monotonic() + self.config.heartbeat_interval
                if time.monotonic() >= next_hello:
                    lifecycle.hello()
                    next_hello = time.monotonic() + HELLO_INTERVAL
        lifecycle.leaving(gone=True)
        # The last outputs and the goodbye still go out: closing with a linger only queues
        # them, and the context's I/O thread, which sends them, ends with the process unless
        # the context is terminated, which waits for them (2 s at most; destroy closes any
        # other socket left open with the same linger, so that it cannot hold the exit).
        sock.close(linger=2000)
        zmq.Context.instance().destroy(linger=2000)


def run(config: WorkerConfig) -> None:
    worker_id = config.worker_id or f"{socket.gethostname()}-{os.getpid()}"
    tracing = telemetry.setup_tracing("inflight-worker", **{"inflight.worker_id": worker_id})
    metrics = WorkerMetrics()
    worker: Worker | None = None
    curve = sockets.CurveClient.load(config.curve_secret_key, config.curve_server_key)  # before the model: a bad key fails fast
    serve_http(config.metrics_host, config.metrics_port, ready=lambda: worker is not None)  # /health answers while the model loads
    # OpenMP threads that spin while they wait starve every other process on the cores, this
    # worker's own event loop and heartbeats among them (RELIABILITY.md, the soak); libgomp
    # reads this once, when torch loads it, so it is set before the engine is imported.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    engine = load_engine(config)
    worker = Worker(config, engine, worker_id, metrics, tracing, curve)
    log.info("worker %s serving %s, scheduler at %s", worker_id, worker.lifecycle.model, config.scheduler_address)
    run_until_signalled(worker)
    if worker.broken:
        sys.exit(1)
