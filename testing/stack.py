"""Starts the real stack (`inflight serve`: scheduler, workers, gateway as processes) on
free loopback ports for a test, and reads worker metrics over HTTP."""

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

from prometheus_client.parser import text_string_to_metric_families


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
        try:
            socks = []
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("0.0.0.0", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()


class Stack:
    def __init__(self, workers: int = 1, env: dict | None = None, extra: list[str] | None = None):
        self.port = free_port()
        self.target = f"localhost:{self.port}"
        # HTTP endpoints: gateway on base, scheduler on base + 1, worker i on base + 2 + i.
        self.metrics_base = free_port_range(2 + workers)
        self.workers = workers
        cmd = [sys.executable, "-m", "cli", "--log-level", "WARNING", "serve", "--workers", str(workers),
               "--listen", self.target, "--device", "cpu",
               "--gateway-address", f"tcp://127.0.0.1:{free_port()}", "--worker-address", f"tcp://127.0.0.1:{free_port()}",
               "--metrics-port", str(self.metrics_base), *(extra or [])]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, "INFLIGHT_KV_CACHE_TOKENS_PER_BLOCK": "16", **(env or {})})
        self.log: list[str] = []
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if not sel.select(timeout=1):
                continue
            line = self.proc.stdout.readline()
            if not line:
                break
            self.log.append(line)
            if "serving on" in line:
                threading.Thread(target=self._drain, daemon=True).start()
                # The gateway serves once one worker is up; wait for all of them.
                alive = "inflight_scheduler_workers_alive{model=SmolLM2-135M-Instruct}"
                while time.monotonic() < deadline and self.metrics("scheduler").get(alive, 0) < workers:
                    time.sleep(0.2)
                return
        self.stop()
        raise RuntimeError("the stack did not start:\n" + "".join(self.log))

    def _drain(self) -> None:
        for line in self.proc.stdout:
            self.log.append(line)

    def http_port(self, process: str | int) -> int:
        """Port of "gateway", "scheduler" or worker i."""
        return self.metrics_base + {"gateway": 0, "scheduler": 1}.get(process, 2 + (process if isinstance(process, int) else 0))

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

    def wait_metric(self, process: str | int, name: str, predicate, timeout: float = 10.0) -> float:
        deadline = time.monotonic() + timeout
        value = None
        while time.monotonic() < deadline:
            value = self.metrics(process).get(name)
            if value is not None and predicate(value):
                return value
            time.sleep(0.1)
        raise AssertionError(f"{name} stayed at {value}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def count_children(pid: int) -> int:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return len(re.findall(r"\d+", out))
