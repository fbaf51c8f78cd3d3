"""Starts the real stack (`inflight serve`: scheduler, workers, gateway as processes) on
free loopback ports, for a test or a benchmark, and reads its processes' metrics over HTTP."""

from __future__ import annotations

import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent  # the children import cli/, and testing/ for the engine double


_handed_out: set[int] = set()


def free_port() -> int:
    """A port free now and not handed out before in this process: the kernel gives a port
    just released back soon, and a stack's ports are all picked before any is bound (a
    gateway's metrics port once came back as the scheduler's gateway port)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def children_of(pid: int) -> list[int]:
    """A process's children, whichever of its threads started them (Linux /proc)."""
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return out


def free_port_range(n: int) -> int:
    """A first port such that it and the n-1 after it are free."""
    while True:
        base = free_port()
        if _handed_out.intersection(range(base + 1, base + n)):
            continue
        try:
            socks = []
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("0.0.0.0", p))
            _handed_out.update(range(base, base + n))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()


class Stack:
    """`inflight serve` as a child process, serving at `.target` once the constructor
    returns; `.stop()` (or leaving a `with` block) ends it. Its output collects in `.log`.

    `env` is laid over this process's environment, from which OTEL_* variables are dropped:
    tracing reaches the stack only through `env`. `extra` flags go to `inflight serve`
    last; `gateways` sets `--gateways` (metrics: "gateway" or "gateway-0" is the first,
    "gateway-j" the others). Tests use the defaults; the benchmarks pick a model
    directory, a device, an engine (INFLIGHT_ENGINE in `env`), the 127.0.0.1 host their
    clients dial, and metrics off (`metrics=False`: no HTTP ports, and no wait for every
    worker)."""

    def __init__(self, workers: int = 1, env: dict | None = None, extra: list[str] | None = None, *, gateways: int = 1,
                 model: str | os.PathLike | None = None, device: str = "cpu", host: str = "localhost",
                 metrics: bool = True, tokens_per_block: int | None = 16, timeout: float = 180, own_group: bool = False):
        self.port = free_port()
        self.target = f"{host}:{self.port}"
        self.http_target = f"{host}:{free_port()}"  # the OpenAI HTTP API
        self.base_url = f"http://{self.http_target}/v1"
        # HTTP endpoints: gateway on base, scheduler on base + 1, worker i on base + 2 + i,
        # gateway j > 0 on base + 1 + workers + j.
        self.metrics_base = free_port_range(1 + workers + gateways) if metrics else None
        self.workers, self.gateways = workers, gateways
        self.gateway_address, self.worker_address = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"  # the scheduler's
        cmd = [sys.executable, "-m", "cli", "--log-level", "WARNING", "serve", "--workers", str(workers),
               "--listen", self.target, "--http-listen", self.http_target, "--device", device, *(["--model", str(model)] if model else []),
               "--gateway-address", self.gateway_address, "--worker-address", self.worker_address,
               "--metrics-port", str(self.metrics_base or 0), *(["--gateways", str(gateways)] if gateways != 1 else []), *(extra or [])]
        base = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        # Small blocks by default so that the tests' short prompts fill whole ones.
        block = {"INFLIGHT_KV_CACHE_TOKENS_PER_BLOCK": str(tokens_per_block)} if tokens_per_block else {}
        path = {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        # own_group: a process group of its own, as a shell gives a command it starts in a
        # terminal, so that ctrl_c() can signal it as a terminal's Ctrl-C does (a Ctrl-C given
        # to the tests then no longer reaches it: their teardown stops it).
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                                     env={**base, **path, **block, **(env or {})}, process_group=0 if own_group else None)
        self.log: list[str] = []
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not sel.select(timeout=1):
                continue
            line = self.proc.stdout.readline()
            if not line:
                break
            self.log.append(line)
            if "serving on" in line:
                # A drained pipe: one nobody reads would fill and stall the stack.
                self.drainer = threading.Thread(target=self._drain, daemon=True)  # ends once every process has exited
                self.drainer.start()
                # The gateway serves once one worker is up; wait for all of them.
                while metrics and time.monotonic() < deadline and self.workers_alive() < workers:
                    time.sleep(0.2)
                return
        self.stop()
        raise RuntimeError("the stack did not start:\n" + "".join(self.log))

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _drain(self) -> None:
        for line in self.proc.stdout:
            self.log.append(line)

    def http_port(self, process: str | int) -> int:
        """Port of "gateway" (the first), "gateway-j", "scheduler" or worker i."""
        if isinstance(process, int):
            return self.metrics_base + 2 + process
        if process.startswith("gateway-"):
            j = int(process.removeprefix("gateway-"))
            return self.metrics_base + (0 if j == 0 else 1 + self.workers + j)
        return self.metrics_base + {"gateway": 0, "scheduler": 1}[process]

    def http_get(self, process: str | int, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port(process)}{path}", timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def metrics(self, process: str | int) -> dict[str, float]:
        """Every sample of a process's /metrics, keyed 'name{label=value,...}'."""
        status, text = self.http_get(process, "/metrics")
        assert status == 200
        out = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return out

    def worker_metrics(self, i: int = 0) -> dict[str, float]:
        return self.metrics(i)

    def workers_alive(self) -> float:
        """Workers the scheduler counts as alive, over every model served."""
        return sum(v for k, v in self.metrics("scheduler").items() if k.startswith("inflight_scheduler_workers_alive{"))

    def wait_metric(self, process: str | int, name: str, predicate, timeout: float = 10.0) -> float:
        deadline = time.monotonic() + timeout
        value = None
        while time.monotonic() < deadline:
            value = self.metrics(process).get(name)
            if value is not None and predicate(value):
                return value
            time.sleep(0.1)
        raise AssertionError(f"{name} stayed at {value}")

    def ctrl_c(self) -> None:
        """SIGINT to serve's process group (a stack started with own_group): what a Ctrl-C
        in serve's terminal does."""
        assert os.getpgid(self.proc.pid) == self.proc.pid, "ctrl_c() needs a Stack(own_group=True)"
        os.killpg(self.proc.pid, signal.SIGINT)

    def stop(self, timeout: float = 30) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def stop_later(self, then=None) -> None:
        """SIGTERM now, without waiting for the stack to drain and end (a second or more):
        for a test's or fixture's stack that nothing looks at again, whose ending then
        overlaps what runs next. `Stack.wait_stopped()` waits for every one stopped so
        (and kills one that does not end in time), then calls its `then()` (what must
        outlive the stack, such as the receiver its exporters flush to)."""
        _stopping.append((self, then))
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    @staticmethod
    def wait_stopped(timeout: float = 30) -> None:
        while _stopping:
            stack, then = _stopping.pop(0)
            stack.stop(timeout)
            if then is not None:
                then()


_stopping: list = []  # (stack, then) told to stop by stop_later, maybe not ended yet


def count_children(pid: int) -> int:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return len(re.findall(r"\d+", out))
