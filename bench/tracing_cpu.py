"""CPU time tracing costs each serving process per request: the span code of the gateway,
scheduler and worker driven directly in this process, with no load in between, tracing on
(exporting over OTLP/gRPC to a receiver started here) minus tracing off. It counts this
process's CPU time, all its threads included, so work that tracing moves into another
process does not count: that is the point, since the serving loops are what tracing must
not slow down.

    python -m bench.tracing_cpu --requests 3000 --out tracing_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import time

from bench.load import start_trace_receiver
from gateway.telemetry import GatewayMetrics
from scheduler.metrics import SchedulerMetrics
from worker.metrics import WorkerMetrics

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
TOKENS = 128  # per request; the worker's per-token bookkeeping counts too
# One of each, shared by tracing on and off: Prometheus takes a metric name once.
GATEWAY_METRICS, SCHEDULER_METRICS, WORKER_METRICS = GatewayMetrics(), SchedulerMetrics(), WorkerMetrics()


def gateway_requests(tracing: bool):
    from gateway.telemetry import RequestTelemetry

    def one(i: int) -> None:
        tm = RequestTelemetry(GATEWAY_METRICS, "inflight.v1.Inference/Generate", None, "text_completion", tracing)
        with tm.preparing():
            pass
        tm.submitted("bench", 16, TOKENS, 1.0)
        tm.on_tokens(1)
        tm.on_tokens(1)
        tm.end("length", "OK", prompt_tokens=16)

    return one


def scheduler_requests(tracing: bool):
    from inflight import schema
    from inflight.sampling_params import SamplingParams
    from scheduler.config import SchedulerConfig
    from scheduler.lifecycle import RequestLifecycle
    from scheduler.routing import WorkerState

    sched = RequestLifecycle(SchedulerConfig(), SCHEDULER_METRICS, tracing,
                             to_gateway=lambda identity, raw: None, to_worker=lambda identity, raw: None)
    hello = schema.WorkerHello("w", "bench", 8192, 49152, 16, 1024, 512)
    sched.workers[b"w"] = WorkerState(b"w", hello, 1 << 30)  # what is routed to it goes nowhere
    params = SamplingParams(max_tokens=TOKENS)

    def one(i: int) -> None:
        sched.submit(schema.Submit(f"g/{i}", "bench", [1] * 16, params, traceparent=TRACEPARENT, gateway=b"g"))
        sched.abort([f"g/{i}"])

    return one


def worker_requests(tracing: bool):
    """The real worker's handling of one request, on the engine double: the Submit, then
    TOKENS outputs of one token each, as the loop delivers them step by step."""
    from inflight import schema
    from inflight.sampling_params import SamplingParams
    from inflight.schema import RequestOutput
    from testing.engine_double import InstantEngine
    from worker.engine_api import EngineConfig
    from worker.lifecycle import WorkerRequests

    worker = WorkerRequests(InstantEngine(EngineConfig(model="bench")), lambda raw: None, f"bench-{tracing}", "bench", 256,
                            WORKER_METRICS, tracing)
    params = SamplingParams(max_tokens=TOKENS)

    def one(i: int) -> None:
        rid = f"g/{i}"
        out: dict = {}
        worker.handle(schema.Submit(rid, "bench", [1] * 16, params, traceparent=TRACEPARENT, gateway=b"g"), out)
        worker.engine.abort(rid)  # the outputs below stand in for its steps
        now = time.time()
        for k in range(TOKENS):  # the engine stamps a request's first output with when it first ran
            worker.deliver(RequestOutput(rid, [7], "length" if k == TOKENS - 1 else None, prompt_tokens=16,
                                         scheduled_at=now if k == 0 else None), out)

    return one


def cpu_per_request(one, requests: int) -> float:
    t0 = time.process_time()
    for i in range(requests):
        one(i)
    from opentelemetry import trace

    trace.get_tracer_provider().force_flush()  # export work still waiting in this process counts
    return (time.process_time() - t0) / requests


def run(endpoint: str, requests: int, repeat: int) -> list[dict]:
    # A queue that holds every span: a loop this fast outruns any exporter, and a dropped
    # span would be export work not counted.
    os.environ.update({"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_EXPORTER_OTLP_INSECURE": "true",
                       "OTEL_BSP_MAX_QUEUE_SIZE": str(8 * requests)})
    from inflight import telemetry

    telemetry.setup_tracing("bench")
    rows = []
    for role, make in (("gateway", gateway_requests), ("scheduler", scheduler_requests), ("worker", worker_requests)):
        off, on = make(False), make(True)
        for i in range(requests // 10):  # warm up
            off(-1 - i)
            on(-1 - i)
        best = {"off": float("inf"), "on": float("inf")}
        for _ in range(repeat):  # alternate, so drift in the machine hits both
            best["off"] = min(best["off"], cpu_per_request(off, requests))
            best["on"] = min(best["on"], cpu_per_request(on, requests))
        rows.append({"process": role, "off_us": best["off"] * 1e6, "on_us": best["on"] * 1e6,
                     "tracing_us": (best["on"] - best["off"]) * 1e6})
    telemetry.shutdown_tracing()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--repeat", type=int, default=3, help="points per configuration; the least CPU time counts")
    ap.add_argument("--out", default="tracing_cpu.json")
    args = ap.parse_args()

    receiver, endpoint = start_trace_receiver()
    try:
        rows = run(endpoint, args.requests, args.repeat)
    finally:
        receiver.terminate()
    print(f"\nCPU µs per request in the serving process, {args.requests} requests, least of {args.repeat}, alternating")
    print(f"{'process':>10} {'tracing off':>12} {'tracing on':>11} {'tracing':>8}")
    for r in rows:
        print(f"{r['process']:>10} {r['off_us']:>12.1f} {r['on_us']:>11.1f} {r['tracing_us']:>8.1f}")
    with open(args.out, "w") as f:
        json.dump({"args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
