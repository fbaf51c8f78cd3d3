"""The client side of the serving benchmarks: concurrent Generate streams against one
target or several at once, from load processes of their own; request latency summaries;
and a local OTLP receiver for stacks that export spans.

grpc does not survive fork: helper processes start fresh (spawn), and the benchmark's own
process never opens a gRPC channel (its threads' fork handlers can hang the next process
started)."""

from __future__ import annotations

import asyncio
import dataclasses
import multiprocessing as mp
import os
import queue
import statistics
import time

from bench.stack_cpu import pin_stack, stack_cpu
from testing.stack import Stack, free_port

spawn = mp.get_context("spawn")

PROMPT = "Tell me a story."  # of the timed load, whose streams repeat one request


@dataclasses.dataclass
class Target:
    address: str
    stack: Stack | None = None  # to account each stack process's CPU time
    processes: int = 1  # load processes, the streams split among them
    load_cpus: list[int] | None = None  # for the load processes
    pin: tuple | None = None  # ({role: CPUs}, other CPUs): pin_stack once the load is connected
    engine_steps: bool = False  # count the worker's forward passes by mode (its /metrics)


def run_load(targets: dict[str, Target], concurrency: int, *, seconds: float | None = None, max_tokens: int = 128,
             requests: list[tuple[list[int], int]] | None = None, model: str = "") -> dict[str, dict]:
    """`concurrency` streams against each target, all starting together once every load
    process is connected; each stream sends its next request when the last one finished.
    With `requests` (token-id prompts, output lengths), the streams take those in turn
    until none is left; otherwise each repeats a short text prompt of `max_tokens`
    output tokens for `seconds`. With several targets, the first to finish stops the
    count of the others (`window`: tokens and seconds by then), so all of them see the
    same moments of a machine whose speed drifts.

    Returns, for each target: tokens, messages (events), seconds (the slowest load
    process), records [(TTFT s, end-to-end s, tokens, request key)], load_util (each load
    process's CPU seconds per second: near 1.0, it and not the stack sets the pace) and
    window; with a stack also cpu_s {role: CPU seconds used} and wall (seconds from the
    start to the last result); with engine_steps also engine_steps {mode: forward passes}."""
    assert requests is None or all(t.processes == 1 for t in targets.values()), "one load process takes a request list"
    go, stop = spawn.Event(), (spawn.Event() if len(targets) > 1 else None)
    queues = {k: spawn.Queue() for k in targets}
    procs = {}
    for k, t in targets.items():
        shares = [concurrency // t.processes + (i < concurrency % t.processes) for i in range(t.processes)]
        procs[k] = [spawn.Process(target=_load_process, args=(t.address, n, seconds, max_tokens, requests, model,
                                                              queues[k], go, stop, t.load_cpus)) for n in shares if n]

    def get(k: str):
        while True:
            try:
                return queues[k].get(timeout=1)
            except queue.Empty:
                dead = [p.exitcode for p in procs[k] if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"a load generator died (exit code {dead[0]})") from None

    for ps in procs.values():
        for p in ps:
            p.start()
    for k, ps in procs.items():
        for _ in ps:
            assert get(k) == "ready"  # connected: the stack serves
    for t in targets.values():
        if t.pin:
            pin_stack(t.stack.proc.pid, *t.pin)  # every run: threads started since are pinned too
    cpu_before = {k: stack_cpu(t.stack.proc.pid) for k, t in targets.items() if t.stack}
    steps_before = {k: engine_steps(t.stack) for k, t in targets.items() if t.engine_steps}
    t0 = time.monotonic()
    go.set()
    parts = {k: [get(k) for _ in ps] for k, ps in procs.items()}
    wall = time.monotonic() - t0
    for ps in procs.values():
        for p in ps:
            p.join()
    if steps_before:
        time.sleep(0.7)  # engine totals reach /metrics at the worker's next heartbeat (0.5 s)
    out = {}
    for k, t in targets.items():
        got = parts[k]
        windows = [r["window"] for r in got if r["window"]]
        res = {"tokens": sum(r["tokens"] for r in got), "messages": sum(r["messages"] for r in got),
               "seconds": max(r["seconds"] for r in got), "records": [x for r in got for x in r["records"]],
               "load_util": [round(r["cpu_s"] / r["seconds"], 3) for r in got],
               "window": (sum(w[0] for w in windows), max(w[1] for w in windows)) if windows else None}
        if t.stack:
            before = cpu_before[k]
            res["cpu_s"] = {r: v - before.get(r, 0.0) for r, v in stack_cpu(t.stack.proc.pid).items()}
            res["wall"] = wall
        if t.engine_steps:
            res["engine_steps"] = {m: v - steps_before[k].get(m, 0.0) for m, v in engine_steps(t.stack).items()}
        out[k] = res
    return out


def _load_process(address, concurrency, seconds, max_tokens, requests, model, results, go, stop, cpus) -> None:
    import uvloop

    if cpus:
        os.sched_setaffinity(0, cpus)  # before gRPC starts its threads, which inherit it
    results.put(uvloop.run(_streams(address, concurrency, seconds, max_tokens, requests, model, results, go, stop)))


async def _streams(address, concurrency, seconds, max_tokens, requests, model, results, go, stop) -> dict:
    """One load process's streams: says "ready" on `results` once connected, starts on
    `go`; with `stop`, sets it when done, and notes the tokens received when it is set."""
    from inflight.client import Client

    pending = list(enumerate(requests)) if requests is not None else None
    records = []
    tokens = messages = 0
    window = None
    clients = [Client(address) for _ in range(max(1, concurrency // 32))]  # several connections, as a fleet of callers would
    for c in clients:
        await asyncio.wait_for(c.channel.channel_ready(), 60)
    results.put("ready")
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, go.wait)

    def next_request(k: int, n: int):
        """(request key, Session.start's arguments), or None when the stream is done."""
        if pending is None:
            return (f"{k}-{n}", {"text": PROMPT, "max_tokens": max_tokens, "ignore_eos": True}) if time.perf_counter() < stop_at else None
        if not pending:
            return None
        i, (prompt, n_out) = pending.pop(0)
        return i, {"token_ids": prompt, "model": model, "max_tokens": n_out, "temperature": 0.0, "ignore_eos": True}

    async def stream(k: int) -> None:
        nonlocal tokens, messages
        client = clients[k % len(clients)]
        n = 0
        while (req := next_request(k, n)) is not None:
            key, start = req
            t = time.perf_counter()
            session = client.session()
            session.start(str(key), **start)
            session.close()
            # The timed load has counted latency from the request sent, the listed one from
            # before it was built (its prompt is long): as in BENCHMARKS.md.
            if pending is None:
                t = time.perf_counter()
            ttft, got = None, 0
            async for ev in session.events():
                messages += 1
                kind = ev.WhichOneof("kind")
                if kind == "delta":
                    n_tokens = len(ev.delta.token_ids)
                    if n_tokens and ttft is None:
                        ttft = time.perf_counter() - t
                    got += n_tokens
                    tokens += n_tokens
                elif kind == "error":
                    raise RuntimeError(ev.error.message)
            records.append((ttft, time.perf_counter() - t, got, key))
            n += 1

    async def watch() -> None:
        nonlocal window
        await loop.run_in_executor(None, stop.wait)
        window = (tokens, time.perf_counter() - t0)

    cpu0 = time.process_time()
    t0 = time.perf_counter()
    stop_at = t0 + (seconds or 0.0)
    watcher = asyncio.create_task(watch()) if stop is not None else None
    await asyncio.gather(*(stream(k) for k in range(concurrency)))
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    if watcher:
        stop.set()
        await watcher
    for c in clients:
        await c.channel.close()
    return {"tokens": tokens, "messages": messages, "seconds": elapsed, "cpu_s": cpu, "records": records, "window": window}


def engine_steps(stack: Stack, worker: int = 0) -> dict[str, float]:
    """A worker's forward passes so far by mode (graph, eager), from its /metrics."""
    prefix = "inflight_worker_engine_steps_total{mode="
    return {k[len(prefix):-1]: v for k, v in stack.metrics(worker).items() if k.startswith(prefix)}


# Latency summaries.

def percentile(xs: list[float], p: float) -> float:
    """The p-th percentile of xs (sorted), in milliseconds (xs in seconds)."""
    return 1000 * xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


def summarize(records: list[tuple[float, float, int, object]], wall: float) -> dict:
    """Throughput and TTFT, inter-token and end-to-end latency percentiles; records:
    (TTFT s, end-to-end s, tokens, request key) per request."""
    ttft = sorted(r[0] for r in records)
    e2e = sorted(r[1] for r in records)
    itl = sorted((r[1] - r[0]) / (r[2] - 1) for r in records if r[2] > 1)
    tokens = sum(r[2] for r in records)
    out = {"requests": len(records), "tokens": tokens, "seconds": wall, "tok_per_s": tokens / wall,
           "ttft_ms_by_request": {r[3]: 1000 * r[0] for r in records}, "e2e_ms_by_request": {r[3]: 1000 * r[1] for r in records}}
    for name, xs in (("ttft", ttft), ("itl", itl), ("e2e", e2e)):
        for p in (50, 90, 99):
            out[f"{name}_p{p}_ms"] = percentile(xs, p)
    return out


def paired_ms(a: dict, b: dict, key: str = "ttft_ms_by_request") -> float:
    """Median over requests of a's time minus b's for the same request: steadier than the
    difference of two medians, when both sides ran the same requests."""
    return statistics.median(a[key][i] - t for i, t in b[key].items())


# Tracing on: the stacks export spans to a receiver here.

def _receive(port: int) -> None:
    """A local OTLP/gRPC trace receiver that accepts and drops spans."""
    from concurrent import futures

    import grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

    class Sink(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request, context):  # noqa: N802
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Sink(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    server.wait_for_termination()


def start_trace_receiver() -> tuple[mp.Process, str]:
    """The receiver in a process of its own (terminate it when done), and its endpoint."""
    port = free_port()
    receiver = spawn.Process(target=_receive, args=(port,), daemon=True)
    receiver.start()
    return receiver, f"http://127.0.0.1:{port}"


def otlp_env(endpoint: str) -> dict[str, str]:
    """The variables that make a stack export its spans to `endpoint` over OTLP/gRPC."""
    return {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_EXPORTER_OTLP_INSECURE": "true"}
