"""`inflight serve`: the whole stack on one machine as child processes.

Starts the scheduler, N workers and M gateways (all on the one gRPC port and the one HTTP
port: SO_REUSEPORT lets the kernel spread new connections over them), waits until every
gateway is ready, prints where it listens, and stops every child on Ctrl-C or SIGTERM. A child that dies
once the stack serves is started again (after a pause that doubles while it keeps dying
soon after each start, up to MAX_BACKOFF): workers rejoin the scheduler by themselves,
and the scheduler moves a dead worker's requests to the others. A child that dies before
the stack serves stops it: that is a setting or a model that cannot work. Settings not
named here reach the children through INFLIGHT_* variables; every worker flag (the engine's
among them: --quantization, --max-batch-size, --engine) is taken here too and passed on to
each worker."""

from __future__ import annotations

import ctypes
import dataclasses
import http.client
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.main import TlsConfig
from inflight import sockets


# WorkerConfig fields that serve sets for each worker itself (or, for the CURVE keys, that a
# stack on one machine has no use for): they are not among serve's worker flags.
WORKER_FLAGS_SERVE_SETS = frozenset({"scheduler_address", "worker_id", "metrics_host", "metrics_port", "curve_secret_key",
                                     "curve_server_key", "served_model_name", "engine_config.model", "engine_config.device"})


@dataclasses.dataclass
class ServeConfig:
    workers: int = dataclasses.field(default=1, metadata={"help": "worker processes: one per GPU, or several on the CPU"})
    gateways: int | None = dataclasses.field(default=None, metadata={"help": "gateway processes, all on the one --listen port (SO_REUSEPORT: the kernel spreads new connections over them, and a connection stays with its process); one tops out at some 22-28k streamed tokens a second; unset: one per 2 CPU cores, 1 to 8"})
    listen: str = dataclasses.field(default="localhost:50051", metadata={"help": "host:port for gRPC clients"})
    http_listen: str = dataclasses.field(default="localhost:8000", metadata={"help": "host:port for the OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, /v1/models; server-sent events), served by every gateway process on the one port like --listen; empty turns it off"})
    model: str | None = dataclasses.field(default=None, metadata={"help": "model directory; unset means the built-in SmolLM2-135M-Instruct"})
    device: str = dataclasses.field(default="auto", metadata={"help": "auto, cpu or cuda"})
    served_model_name: str = dataclasses.field(default="", metadata={"help": "name clients use for the model, at the workers and the gateways; unset means the model directory's name"})
    gateway_address: str = dataclasses.field(default=sockets.GATEWAY_ADDRESS, metadata={"help": "scheduler address for gateways"})
    worker_address: str = dataclasses.field(default=sockets.WORKER_ADDRESS, metadata={"help": "scheduler address for workers"})
    max_queued: int = dataclasses.field(default=1024, metadata={"help": "requests waiting for a worker at most"})
    metrics_port: int = dataclasses.field(default=9400, metadata={"help": "HTTP /metrics, /health, /ready: the (first) gateway on this port, the scheduler on +1, worker i on +2+i, gateway j>0 after the last worker (+1+workers+j); 0 means off"})
    metrics_host: str = dataclasses.field(default="127.0.0.1", metadata={"help": "address every child's /metrics, /health and /ready listen on; 0.0.0.0 for every interface"})
    tls: TlsConfig = dataclasses.field(default_factory=TlsConfig)  # every gateway's
    auth_token_file: str = dataclasses.field(default="", metadata={"help": "file of bearer tokens, one a line, that the gateway requires on every Inference call"})
    ready_timeout: float = dataclasses.field(default=600.0, metadata={"help": "seconds to wait for the stack to serve"})
    stop_timeout: float = dataclasses.field(default=45.0, metadata={"help": "on Ctrl-C or SIGTERM, seconds each stage (gateway, workers, scheduler) may take to drain and stop before it is killed; a second Ctrl-C or SIGTERM kills what is left at once"})


def _die_with_parent() -> None:
    # Linux: the child gets SIGTERM if `inflight serve` dies, so nothing is orphaned.
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
    except OSError:
        pass


def _gpu_count() -> int:
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))


def gateway_metrics_offset(j: int, workers: int) -> int:
    """Gateway j's HTTP port, from --metrics-port: the first on it (the scheduler is on +1,
    worker i on +2+i), the others after the last worker."""
    return 0 if j == 0 else 1 + workers + j


MIN_BACKOFF, MAX_BACKOFF = 1.0, 30.0  # seconds before a dead child is started again
STABLE_AFTER = 30.0  # a child up this long that dies starts again after MIN_BACKOFF


class Child:
    def __init__(self, name: str, args: list[str], env: dict | None):
        self.name, self.args, self.env = name, args, env or {}
        self.proc: subprocess.Popen | None = None
        self.started = 0.0
        self.backoff = MIN_BACKOFF
        self.restart_at: float | None = None  # when it died: the time to start it again

    def start(self) -> None:
        cmd = [sys.executable, "-m", "cli", *self.args]
        # A session of its own: a terminal's Ctrl-C (SIGINT to the foreground process group)
        # reaches serve only, which stops the stages in order.
        self.proc = subprocess.Popen(cmd, env={**os.environ, **self.env}, preexec_fn=_die_with_parent, start_new_session=True)
        self.started = time.monotonic()
        self.restart_at = None


class Stack:
    def __init__(self, config: ServeConfig, worker_args: list[str] | tuple = ()):
        self.config = config
        self.worker_args = list(worker_args)  # flags every worker gets (given_argv)
        self.children: list[Child] = []
        self.signals = 0  # Ctrl-C or SIGTERM received: 1 stops in order, 2 kills what is left

    def on_signal(self, signum, frame) -> None:
        self.signals += 1
        if self.signals == 1:
            print(f"inflight: stopping: each stage drains for up to {self.config.stop_timeout:.0f}s "
                  f"(Ctrl-C again kills what is left)", file=sys.stderr, flush=True)
        elif self.signals == 2:
            print("inflight: killing what is left", file=sys.stderr, flush=True)

    def spawn(self, name: str, args: list[str], env: dict | None = None) -> None:
        child = Child(name, args, env)
        child.start()
        self.children.append(child)

    def start(self) -> None:
        c = self.config
        model = ["--model", c.model] if c.model else []
        if c.served_model_name:
            model += ["--served-model-name", c.served_model_name]
        port = lambda offset: str(c.metrics_port + offset if c.metrics_port else 0)  # noqa: E731
        self.spawn("scheduler", ["scheduler", "--gateway-address", c.gateway_address, "--worker-address", c.worker_address,
                                 "--max-queued", str(c.max_queued), "--metrics-port", port(1), "--metrics-host", c.metrics_host])
        gpus = _gpu_count() if c.device in ("auto", "cuda") else 0
        for i in range(c.workers):
            env = {}
            if gpus:
                env["CUDA_VISIBLE_DEVICES"] = str(i % gpus)
            else:  # share the cores instead of every worker taking all of them
                env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // c.workers))
            device = c.device if gpus or c.device != "auto" else "cpu"
            self.spawn(f"worker-{i}", ["worker", "--scheduler-address", c.worker_address, "--worker-id", f"worker-{i}",
                                       "--device", device, "--metrics-port", port(2 + i), "--metrics-host", c.metrics_host, *model,
                                       *self.worker_args], env)
        for j in range(c.gateways):
            self.spawn(f"gateway-{j}", ["gateway", "--listen", c.listen, "--http-listen", c.http_listen, "--scheduler-address", c.gateway_address,
                                        "--metrics-port", port(gateway_metrics_offset(j, c.workers)), "--metrics-host", c.metrics_host,
                                        "--tls-cert", c.tls.cert, "--tls-key", c.tls.key, "--tls-client-ca", c.tls.client_ca,
                                        "--auth-token-file", c.auth_token_file, *model])

    def dead_child(self) -> str | None:
        for child in self.children:
            if child.proc.poll() is not None:
                return f"{child.name} exited with code {child.proc.returncode}"
        return None

    def restart_dead(self) -> None:
        """Start again every child that died, each after its backoff."""
        now = time.monotonic()
        for child in self.children:
            if child.proc.poll() is None:
                continue
            if child.restart_at is None:
                if now - child.started >= STABLE_AFTER:
                    child.backoff = MIN_BACKOFF
                child.restart_at = now + child.backoff
                print(f"inflight: {child.name} exited with code {child.proc.returncode}; starting it again in "
                      f"{child.backoff:.0f}s", file=sys.stderr, flush=True)
                child.backoff = min(MAX_BACKOFF, child.backoff * 2)
            elif now >= child.restart_at:
                child.start()

    def wait_ready(self) -> str | None:
        """None once the gateways serve; otherwise why not. With metrics on: every gateway's
        HTTP /ready says ready (a worker serves its model: the condition of its gRPC health
        service). With them off (plaintext only): the gRPC health service on the port says
        SERVING, answered by whichever gateway the connection reached, since a connection
        cannot pick its process."""
        c = self.config
        deadline = time.monotonic() + c.ready_timeout
        pending = [c.metrics_port + gateway_metrics_offset(j, c.workers) for j in range(c.gateways)] if c.metrics_port else []
        with grpc.insecure_channel(c.listen) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.signals:
                    return "stopped while starting"
                dead = self.dead_child()
                if dead:
                    return dead
                pending = [p for p in pending if not self._http_ready(p)]
                if (not pending) if c.metrics_port else self._grpc_serving(health):
                    return None
                time.sleep(0.2)
        return f"not serving after {c.ready_timeout:.0f}s"

    @staticmethod
    def _grpc_serving(health: health_pb2_grpc.HealthStub) -> bool:
        try:
            return health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.SERVING
        except grpc.RpcError:
            return False

    def _http_ready(self, port: int) -> bool:
        host = self.config.metrics_host if self.config.metrics_host not in ("", "0.0.0.0") else "127.0.0.1"
        conn = http.client.HTTPConnection(host, port, timeout=1)  # no proxy, unlike urllib
        try:
            conn.request("GET", "/ready")
            return conn.getresponse().status == 200
        except (OSError, http.client.HTTPException):
            return False
        finally:
            conn.close()

    def stop(self) -> None:
        """In order, each stage drained before the next is told: the gateways (they finish
        their streams, which needs the workers), then the workers, then the scheduler. A
        second signal meanwhile kills every child still running."""
        stages = [[c for c in self.children if c.name.startswith("gateway-")], [c for c in self.children if c.name.startswith("worker-")],
                  [c for c in self.children if c.name == "scheduler"]]
        for stage in stages:
            for child in stage:
                if child.proc.poll() is None:
                    child.proc.terminate()
            deadline = time.monotonic() + self.config.stop_timeout
            while self.signals < 2 and time.monotonic() < deadline and any(c.proc.poll() is None for c in stage):
                time.sleep(0.05)
            for child in stage:
                if child.proc.poll() is None:
                    if self.signals < 2:
                        print(f"inflight: {child.name} did not stop in time; killing it", file=sys.stderr)
                    child.proc.kill()
                    child.proc.wait()


def default_gateways(cores: int | None) -> int:
    """One gateway process per 2 cores, 1 to 8: a small GPU model streams more tokens a
    second than one gateway process carries. On a 16-core H200 host at 256 closed-loop
    streams, 4 gateways added 47 ms to the median time to first token (a new stream waited
    for a busy event loop), 6 and 8 added 12 (BENCHMARKS.md, closed loop, run 18); an idle
    gateway costs little."""
    return max(1, min(8, (cores or 1) // 2))


def run(config: ServeConfig, worker_args: list[str] | tuple = ()) -> int:
    """The stack until Ctrl-C or SIGTERM; `worker_args`: flags for every worker."""
    if config.gateways is None:
        config.gateways = default_gateways(os.cpu_count())
    if config.gateways < 1:
        print(f"inflight serve: error: --gateways {config.gateways}: at least 1 gateway process is needed", file=sys.stderr)
        return 2
    if config.model:  # one line here rather than each child's own
        from models.config import ModelConfig
        from models.errors import ModelError

        try:
            ModelConfig.from_dir(Path(config.model))
        except ModelError as e:
            print(f"inflight serve: error: {e}", file=sys.stderr)
            return 2
    if config.tls.cert and not config.metrics_port:
        print("inflight serve: error: with --tls-cert, serve waits for the gateways' HTTP /ready: "
              "--metrics-port must not be 0", file=sys.stderr)
        return 2
    stack = Stack(config, worker_args)
    signal.signal(signal.SIGINT, stack.on_signal)
    signal.signal(signal.SIGTERM, stack.on_signal)
    stack.start()
    try:
        problem = stack.wait_ready()
        if problem and not stack.signals:
            print(f"inflight: the stack did not start: {problem}", file=sys.stderr)
            return 1
        if not stack.signals:
            http = f"; OpenAI HTTP API at http{'s' if config.tls.cert else ''}://{config.http_listen}/v1" if config.http_listen else ""
            print(f"inflight: serving on {config.listen} with {config.gateways} gateway process(es) and {config.workers} worker(s)"
                  f"{http}; try `inflight chat \"Hello\"` (Ctrl-C stops)", flush=True)
        while not stack.signals:
            stack.restart_dead()
            time.sleep(0.2)
        return 0
    finally:
        stack.stop()
