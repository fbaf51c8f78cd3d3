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
import urllib.request

from prometheus_client.parser import text_string_to_metric_families


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stack:
    def __init__(self, workers: int = 1, env: dict | None = None, extra: list[str] | None = None):
        self.port = free_port()
        self.target = f"localhost:{self.port}"
        self.metrics_base = free_port()
        while any(self.metrics_base + i == self.port for i in range(workers)):
            self.metrics_base = free_port()
        self.workers = workers
        cmd = [sys.executable, "-m", "inflight.cli", "--log-level", "WARNING", "serve", "--workers", str(workers),
               "--listen", self.target, "--device", "cpu",
               "--gateway-address", f"tcp://127.0.0.1:{free_port()}", "--worker-address", f"tcp://127.0.0.1:{free_port()}",
               "--worker-metrics-port", str(self.metrics_base), *(extra or [])]
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
                return
        self.stop()
        raise RuntimeError("the stack did not start:\n" + "".join(self.log))

    def _drain(self) -> None:
        for line in self.proc.stdout:
            self.log.append(line)

    def worker_metrics(self, i: int = 0) -> dict[str, float]:
        """Every sample of worker i's /metrics, keyed 'name{label=value}'."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_base + i}/metrics", timeout=5) as r:
            text = r.read().decode()
        out = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return out

    def wait_metric(self, i: int, name: str, predicate, timeout: float = 10.0) -> float:
        deadline = time.monotonic() + timeout
        value = None
        while time.monotonic() < deadline:
            value = self.worker_metrics(i).get(name)
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
