"""HTTP endpoints every process serves for operators: /metrics (Prometheus), /health (the
process is alive) and /ready (it can do its job), for Kubernetes probes and scrapes."""

from __future__ import annotations

import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

log = logging.getLogger(__name__)


def serve_http(host: str, port: int, ready: Callable[[], bool]) -> ThreadingHTTPServer | None:
    """Start the endpoints on a daemon thread; port 0 means off. `host` is the address to
    bind: each process's --metrics-host, loopback unless told otherwise ("" is every interface)."""
    if not port:
        return None

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._reply(200, generate_latest(REGISTRY), CONTENT_TYPE_LATEST)
            elif path == "/health":
                self._reply(200, b"ok\n")
            elif path == "/ready":
                ok = ready()
                self._reply(200 if ok else 503, b"ready\n" if ok else b"not ready\n")
            else:
                self._reply(404, b"not found: try /metrics, /health or /ready\n")

        def _reply(self, code: int, body: bytes, content_type: str = "text/plain; charset=utf-8"):
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # scrapes every few seconds would flood the log
            pass

    ThreadingHTTPServer.allow_reuse_address = True
    try:
        server = ThreadingHTTPServer((host, port), Handler)
    except OSError as e:
        raise SystemExit(f"error: cannot serve /metrics, /health and /ready on {host or '0.0.0.0'} port {port}: {e.strerror}; "
                         "choose another with --metrics-host or --metrics-port (0 turns them off)") from None
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="http-endpoints", daemon=True).start()
    log.info("metrics and probes on http://%s:%d/metrics, /health, /ready", host or "0.0.0.0", port)
    return server
