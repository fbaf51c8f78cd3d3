"""Checks of a running compose.yaml stack, shared by tests/test_compose_stack.py (podman, local
images, the OTLP receiver double) and this module's command line, which runs the same checks
against the official images on a machine that can pull them:

    python -m testing.compose_stack            # docker compose up --build --wait, check, down -v
    python -m testing.compose_stack --keep     # leave it running after the checks
    COMPOSE="podman compose" python -m testing.compose_stack

Requests go through the published gRPC port (each on a connection of its own, so both gateway
replicas serve); each request's trace must hold spans of the gateway, scheduler and worker
(from Jaeger's API here, from the receiver double in the test); Prometheus must scrape every
process and count the requests at both gateways; Grafana must serve the provisioned dashboard
and reach its data source; a worker killed with SIGKILL must come back and serve.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import secrets
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SERVICES_TRACED = {"inflight-gateway", "inflight-scheduler", "inflight-worker"}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def http_json(url: str, auth: tuple[str, str] | None = None):
    req = urllib.request.Request(url)
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def prom(port: int, query: str) -> list[dict]:
    body = http_json(f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": query}))
    assert body["status"] == "success", body
    return body["data"]["result"]


def wait_for(what: str, probe, timeout: float = 60.0, every: float = 1.0):
    """probe() until it returns something true (returned), else fail naming the last answer."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = probe()
            if last:
                return last
        except Exception as e:  # noqa: BLE001 - retried until the deadline, then reported
            last = e
        time.sleep(every)
    raise AssertionError(f"{what}: not within {timeout} s (last: {last!r})")


async def one_request(port: int, trace_id: str, prompt: str):
    """(text, Finished) of one request sent with a sampled traceparent of trace_id."""
    from inflight.client import Client

    traceparent = f"00-{trace_id}-{secrets.token_hex(8)}-01"
    # a connection of its own, so the load balancer hands each request to the next gateway
    async with Client(f"127.0.0.1:{port}", metadata=[("traceparent", traceparent)],
                      options=[("grpc.use_local_subchannel_pool", 1)]) as client:
        text, finished = "", None
        async for part in client.generate(text=prompt, max_tokens=12, temperature=0):
            if type(part).__name__ == "Finished":
                finished = part
            else:
                text += part.text
    return text, finished


def send_requests(port: int, n: int = 6) -> list[str]:
    """n requests through the published port; their trace ids."""
    trace_ids = [secrets.token_hex(16) for _ in range(n)]

    async def send():
        return await asyncio.gather(*(one_request(port, tid, f"Fact {i}: the sky is") for i, tid in enumerate(trace_ids)))

    for text, finished in asyncio.run(send()):
        assert text and finished is not None and finished.usage.completion_tokens > 0, (text, finished)
    return trace_ids


def check_traces(trace_ids: list[str], spans_of) -> None:
    """spans_of(trace_id) -> [{"service", "span_id", "parent_span_id"}]: every trace holds spans
    of all three processes, one tree under the client's span."""
    for tid in trace_ids:
        def whole():
            spans = spans_of(tid)
            return spans if SERVICES_TRACED <= {s["service"] for s in spans} else None
        spans = wait_for(f"trace {tid} from gateway, scheduler and worker", whole, timeout=60)
        ids = {s["span_id"] for s in spans}
        parents_outside = {s["parent_span_id"] for s in spans if s["parent_span_id"] not in ids}
        assert len(parents_outside) == 1, spans


def receiver_spans(port: int):
    return lambda tid: http_json(f"http://127.0.0.1:{port}/spans?trace_id={tid}")


def jaeger_spans(port: int):
    def spans_of(tid):
        try:
            data = http_json(f"http://127.0.0.1:{port}/api/traces/{tid}")["data"]
        except urllib.error.HTTPError:
            return []
        out = []
        for trace in data:
            for s in trace["spans"]:
                parent = next((r["spanID"] for r in s.get("references", []) if r["refType"] == "CHILD_OF"), "")
                out.append({"service": trace["processes"][s["processID"]]["serviceName"],
                            "span_id": s["spanID"], "parent_span_id": parent})
        return out
    return spans_of


def check_prometheus(port: int, requests: int) -> None:
    up = wait_for("gateways, scheduler and worker scraped", lambda: (lambda r: r if len(r) == 4 else None)(
        prom(port, 'up{job=~"gateway|scheduler|worker"} == 1')), timeout=90)
    assert sorted(r["metric"]["job"] for r in up) == ["gateway", "gateway", "scheduler", "worker"], up
    wait_for("requests counted at both gateways", lambda: (lambda r: r if len(r) == 2 and sum(
        float(x["value"][1]) for x in r) >= requests else None)(
        prom(port, 'sum by (instance) (inflight_gateway_requests_total{code="OK"}) > 0')), timeout=90)
    wait_for("tokens generated at the worker", lambda: prom(port, "inflight_worker_generation_tokens_total > 0"))
    wait_for("time to first token observed", lambda: prom(
        port, f"sum(inflight_gateway_time_to_first_token_seconds_count) >= {requests}"))


def check_grafana(port: int) -> None:
    auth = ("admin", os.environ.get("GRAFANA_PASSWORD", "admin"))
    dash = wait_for("dashboard provisioned", lambda: http_json(f"http://127.0.0.1:{port}/api/dashboards/uid/inflight", auth))
    assert len(dash["dashboard"]["panels"]) >= 10
    health = http_json(f"http://127.0.0.1:{port}/api/datasources/uid/prometheus/health", auth)
    assert health.get("status") == "OK", health


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep", action="store_true", help="leave the stack running")
    ap.add_argument("--no-build", action="store_true", help="use the images as they are")
    args = ap.parse_args(argv)
    compose = shlex.split(os.environ.get("COMPOSE", "docker compose"))
    engine = compose[0]
    port = int(os.environ.get("INFLIGHT_PORT", "50051"))

    def run(*cmd, check=True):
        log(" ".join(cmd))
        return subprocess.run([*cmd], cwd=ROOT, check=check, capture_output=True, text=True).stdout

    t0 = time.monotonic()
    run(*compose, "up", "-d", "--wait", "--wait-timeout", "900", *(() if args.no_build else ("--build",)))
    log(f"up and healthy in {time.monotonic() - t0:.0f} s")
    try:
        trace_ids = send_requests(port)
        check_traces(trace_ids, jaeger_spans(int(os.environ.get("JAEGER_PORT", "16686"))))
        log("traces whole at Jaeger")
        check_prometheus(int(os.environ.get("PROMETHEUS_PORT", "9090")), len(trace_ids))
        log("metrics at Prometheus")
        check_grafana(int(os.environ.get("GRAFANA_PORT", "3000")))
        log("dashboard and data source at Grafana")
        [worker] = run(*compose, "ps", "-q", "worker").split()
        before = int(run(engine, "inspect", "-f", "{{.RestartCount}}", worker).strip() or 0)
        run(engine, "kill", "-s", "KILL", worker)
        wait_for("worker restarted", lambda: int(run(engine, "inspect", "-f", "{{.RestartCount}}", worker).strip() or 0) > before,
                 timeout=120)
        wait_for("worker healthy", lambda: run(engine, "inspect", "-f", "{{.State.Health.Status}}", worker).strip() == "healthy",
                 timeout=300, every=3)
        text, finished = asyncio.run(one_request(port, secrets.token_hex(16), "After the restart,"))
        assert text and finished is not None
        log("killed worker came back and serves")
    finally:
        if not args.keep:
            run(*compose, "down", "-v", check=False)
    log(f"all checks passed in {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
