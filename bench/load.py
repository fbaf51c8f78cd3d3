"""The client side of the serving benchmarks: Generate streams against one target or
several at once, closed loop or open loop (requests at set times), from load processes of
their own; request latency summaries; and a local OTLP receiver for stacks that export
spans.

grpc does not survive fork: helper processes start fresh (spawn), and the benchmark's own
process never opens a gRPC channel (its threads' fork handlers can hang the next process
started)."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import multiprocessing as mp
import os
import queue
import statistics
import time

from bench.stack_cpu import pin_stack, stack_cpu
from testing.stack import Stack, free_port

spawn = mp.get_context("spawn")

PROMPT = "Tell me a story."  # of the timed load, whose streams repeat one request
# perf_counter() to unix seconds, for matching a record's times with spans' (both clocks are
# the machine's, so every process computes the same offset)
UNIX_OFFSET = time.time() - time.perf_counter()


def traceparent_of(trace: int, key: int) -> str:
    """The traceparent a traced load (run_load's `trace`) sends with request `key`: its
    trace id is the two numbers, which is how bench.path_breakdown finds the request's spans."""
    return f"00-{trace_id_of(trace, key)}-{key + 1:016x}-01"


def trace_id_of(trace: int, key: int) -> str:
    return f"{trace:08x}{key + 1:024x}"


@dataclasses.dataclass
class Target:
    address: str
    stack: Stack | None = None  # to account each stack process's CPU time
    processes: int = 1  # load processes, the streams split among them
    load_cpus: list[int] | None = None  # for the load processes
    pin: tuple | None = None  # ({role: CPUs}, other CPUs): pin_stack once the load is connected
    engine_steps: bool = False  # count the worker's forward passes by mode (its /metrics)
    # each load process opens a connection of its own for every this many of its streams (in open
    # loop: of the streams it expects open at once), as a fleet of callers would: a gateway fleet
    # on one port (SO_REUSEPORT) spreads connections, not streams
    streams_per_connection: int = 32


def run_load(targets: dict[str, Target], concurrency: int, *, seconds: float | None = None, max_tokens: int = 128,
             requests: list[tuple[list[int], int]] | None = None, model: str = "", arrivals: list[float] | None = None,
             per_stream: int = 1, trace: int = 0) -> dict[str, dict]:
    """`concurrency` streams against each target, all starting together once every load
    process is connected; each stream sends its next request when the last one finished.
    With `requests` (token-id prompts, output lengths), the streams take those in turn
    until none is left; otherwise each repeats a short text prompt of `max_tokens`
    output tokens for `seconds`. With several targets, the first to finish stops the
    count of the others (`window`: tokens and seconds by then), so all of them see the
    same moments of a machine whose speed drifts.

    With `arrivals` (seconds from the start, ascending, one per request) the load is open
    loop instead: each request starts at its time, however many are still open, and
    `concurrency` only sets how many connections a load process opens. `per_stream`
    requests share one Generate stream: in open loop, each run of that many consecutive
    arrivals; in closed loop, each stream keeps that many open (concurrency / per_stream
    streams), where with 1 every request opens a stream of its own.

    Returns, for each target: tokens, messages (events), seconds (the slowest load
    process, from the start to its last request's end), records [(TTFT s, end-to-end s,
    tokens, request key, [each delta's gap to the one before over its tokens, s], late s,
    unix time the request was sent)],
    latency counted from the arrival time (open loop) or from just before the request's
    stream opened or the request started on it (closed loop), late: how long after its
    arrival time the request was sent; errors {status code: count} of requests that
    failed (open loop only: in closed loop a failure raises); load_util (each load
    process's CPU seconds per second: near 1.0, it and not the stack sets the pace) and
    window; with a stack also cpu_s {role: CPU seconds used} and wall (seconds from the
    start to the last result); with engine_steps also engine_steps {mode: forward passes}.

    `trace` (a number other than 0), with a stream per request: each stream sends the
    traceparent traceparent_of(trace, key), so that a stack exporting spans makes each
    request a trace of a known id."""
    go, stop = spawn.Event(), (spawn.Event() if len(targets) > 1 else None)
    start = spawn.Value("d", 0.0)  # the common start, on the clock every process shares (perf_counter)
    queues = {k: spawn.Queue() for k in targets}
    listed = None if requests is None else [(i, p, n, arrivals[i] if arrivals else None) for i, (p, n) in enumerate(requests)]
    procs = {}
    for k, t in targets.items():
        n_procs = t.processes if arrivals else min(t.processes, -(-concurrency // per_stream))  # no stream split between two
        shares = [concurrency // n_procs + (i < concurrency % n_procs) for i in range(n_procs)]
        # each load process its own part of the requests: open loop by stream, so a
        # stream's requests stay together
        lists = [None if listed is None else [r for r in listed if (r[0] // per_stream if arrivals else r[0]) % n_procs == j]
                 for j in range(n_procs)]
        procs[k] = [spawn.Process(target=_load_process, args=(t.address, n, seconds, max_tokens, part, per_stream, model,
                                                              queues[k], go, start, stop, t.load_cpus, trace,
                                                              t.streams_per_connection))
                    for n, part in zip(shares, lists) if (part if arrivals else n)]

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
    start.value = time.perf_counter() + 0.05  # each load process sees `go` within this
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
        errors = collections.Counter()
        for r in got:
            errors.update(r["errors"])
        if errors and not arrivals:
            raise RuntimeError(f"requests failed: {dict(errors)}")
        res = {"tokens": sum(r["tokens"] for r in got), "messages": sum(r["messages"] for r in got),
               "seconds": max(r["seconds"] for r in got), "records": [x for r in got for x in r["records"]],
               "errors": dict(errors), "load_util": [round(r["cpu_s"] / r["seconds"], 3) for r in got],
               "window": (sum(w[0] for w in windows), max(w[1] for w in windows)) if windows else None}
        if t.stack:
            before = cpu_before[k]
            res["cpu_s"] = {r: v - before.get(r, 0.0) for r, v in stack_cpu(t.stack.proc.pid).items()}
            res["wall"] = wall
        if t.engine_steps:
            res["engine_steps"] = {m: v - steps_before[k].get(m, 0.0) for m, v in engine_steps(t.stack).items()}
        out[k] = res
    return out


class Timing:
    """One request's times as its tokens come: the load processes' and the engine-direct
    runs' record of it (run_load's records)."""

    __slots__ = ("key", "t", "late", "first", "last", "tokens", "gaps")

    def __init__(self, key, t: float, late: float = 0.0):
        self.key, self.t, self.late = key, t, late
        self.first = self.last = None
        self.tokens, self.gaps = 0, []

    def add(self, n: int, now: float) -> None:
        """n tokens arrived at `now`."""
        if not n:
            return
        if self.first is None:
            self.first = now
        else:
            self.gaps.append((now - self.last) / n)
        self.last, self.tokens = now, self.tokens + n

    def record(self, now: float) -> tuple:
        return (None if self.first is None else self.first - self.t, now - self.t, self.tokens, self.key, self.gaps, self.late,
                self.t + UNIX_OFFSET)


def _load_process(address, concurrency, seconds, max_tokens, requests, per_stream, model, results, go, start, stop, cpus,
                  trace, streams_per_connection) -> None:
    import uvloop

    if cpus:
        os.sched_setaffinity(0, cpus)  # before gRPC starts its threads, which inherit it
    results.put(uvloop.run(_streams(address, concurrency, seconds, max_tokens, requests, per_stream, model, results, go, start, stop,
                                    trace, streams_per_connection)))


async def _streams(address, concurrency, seconds, max_tokens, requests, per_stream, model, results, go, start, stop,
                   trace, streams_per_connection) -> dict:
    """One load process's streams: says "ready" on `results` once connected, starts on
    `go` at `start`; with `stop`, sets it when done, and notes the tokens received when it
    is set. `requests`: [(key, prompt, output tokens, arrival s or None)], or None for the
    timed load."""
    from inflight.client import Client

    records = []
    errors = collections.Counter()
    tokens = messages = 0
    window = None
    # several connections, as a fleet of callers would: each channel a connection of its own (by
    # default grpc gives a process's channels to one target a single shared connection)
    clients = [Client(address, options=[("grpc.use_local_subchannel_pool", 1)])
               for _ in range(max(1, -(-concurrency // streams_per_connection)))]
    for c in clients:
        await asyncio.wait_for(c.channel.channel_ready(), 60)
    results.put("ready")
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, go.wait)
    t0 = start.value
    stop_at = t0 + (seconds or 0.0)
    open_loop = bool(requests) and requests[0][3] is not None
    pending = collections.deque(requests or ())
    timed = itertools.count()

    def take(source: collections.deque | None = None):
        """The next request from `source` (else the process's list, or the timed load's),
        as (key, Session.start's arguments, arrival time or None), or None if none is left."""
        source = pending if source is None else source
        if requests is None:
            if time.perf_counter() >= stop_at:
                return None
            return next(timed), {"text": PROMPT, "max_tokens": max_tokens, "ignore_eos": True}, None
        if not source:
            return None
        key, prompt, n_out, at = source.popleft()
        return key, {"token_ids": prompt, "model": model, "max_tokens": n_out, "temperature": 0.0, "ignore_eos": True}, None if at is None else t0 + at

    async def stream(client, next_request, slots: int, key=None) -> None:
        """One Generate stream with up to `slots` requests open on it: starts those
        next_request() gives, each at its arrival time or once a slot is free, and closes when it gives
        None (the server ends the stream when the open ones finish)."""
        nonlocal tokens, messages
        opened = time.perf_counter()
        session = client.session([("traceparent", traceparent_of(trace, key))] if trace and key is not None else None)
        free = asyncio.Semaphore(slots)
        live: dict[str, Timing] = {}

        async def feed() -> None:
            first = True
            while (req := next_request()) is not None:
                key, args, at = req
                await free.acquire()
                if at is not None:
                    await sleep_until(at)
                now = time.perf_counter()
                live[str(key)] = Timing(key, at if at is not None else (opened if first else now), 0.0 if at is None else now - at)
                first = False
                session.start(str(key), **args)
            session.close()

        feeder = asyncio.create_task(feed())
        async for ev in session.events():
            messages += 1
            kind = ev.WhichOneof("kind")
            if kind == "delta":
                n = len(ev.delta.token_ids)
                live[ev.request_id].add(n, time.perf_counter())
                tokens += n
            elif kind == "finished":
                records.append(live.pop(ev.request_id).record(time.perf_counter()))
                free.release()
            else:
                errors[ev.error.code] += 1
                live.pop(ev.request_id, None)
                free.release()
        await feeder

    async def one_at_a_time(k: int) -> None:
        """Closed loop, a stream per request."""
        while (req := take()) is not None:
            one = [req]
            await stream(clients[k % len(clients)], lambda: one.pop() if one else None, 1, key=req[0])

    async def arrivals() -> None:
        """Open loop: a stream for each run of `per_stream` requests, opened at the first one's arrival."""
        tasks = []
        for g, i in enumerate(range(0, len(requests), per_stream)):
            group = collections.deque(requests[i:i + per_stream])
            await sleep_until(t0 + group[0][3])
            key = group[0][0] if per_stream == 1 else None
            tasks.append(asyncio.create_task(stream(clients[g % len(clients)], lambda q=group: take(q), per_stream, key=key)))
        await asyncio.gather(*tasks)

    async def watch() -> None:
        nonlocal window
        await loop.run_in_executor(None, stop.wait)
        window = (tokens, time.perf_counter() - t0)

    await sleep_until(t0)
    cpu0 = time.process_time()
    watcher = asyncio.create_task(watch()) if stop is not None else None
    if open_loop:
        await arrivals()
    elif per_stream == 1:
        await asyncio.gather(*(one_at_a_time(k) for k in range(concurrency)))
    else:
        await asyncio.gather(*(stream(clients[s % len(clients)], take, min(per_stream, concurrency - s * per_stream))
                               for s in range(-(-concurrency // per_stream))))
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    if watcher:
        stop.set()
        await watcher
    for c in clients:
        await c.channel.close()
    return {"tokens": tokens, "messages": messages, "seconds": elapsed, "cpu_s": cpu, "records": records,
            "errors": dict(errors), "window": window}


async def sleep_until(t: float) -> None:
    """Until perf_counter() reaches t (the event loop's timers round to milliseconds)."""
    while (d := t - time.perf_counter()) > 0:
        await asyncio.sleep(d)


def engine_steps(stack: Stack, worker: int = 0) -> dict[str, float]:
    """A worker's forward passes so far by mode (graph, eager), from its /metrics."""
    prefix = "inflight_worker_engine_steps_total{mode="
    return {k[len(prefix):-1]: v for k, v in stack.metrics(worker).items() if k.startswith(prefix)}


def host_info() -> dict:
    """The host's CPU model, logical CPUs and load averages (1, 5, 15 min): a serving point's
    added latency depends on the host's CPUs as well as the device (BENCHMARKS.md, run 26),
    so each result says which host made it and how busy it was."""
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cpus": os.cpu_count(), "loadavg": [round(x, 2) for x in os.getloadavg()]}


# Latency summaries.

def nearest_rank(xs: list[float], p: float) -> float:
    """The p-th percentile of xs (sorted), in their unit."""
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


def percentile(xs: list[float], p: float) -> float:
    """The p-th percentile of xs (sorted), in milliseconds (xs in seconds)."""
    return 1000 * nearest_rank(xs, p)


def summarize(records: list[tuple], wall: float, gaps: bool = False) -> dict:
    """Throughput and TTFT, inter-token and end-to-end latency percentiles (None where
    nothing was measured); records: (TTFT s, end-to-end s, tokens, request key, ...) per
    request. ITL: each request's mean time between tokens after its first, or with
    `gaps`, every gap between two deltas over the tokens of the later (the records' fifth
    field, as run_load's)."""
    records = [r for r in records if r[0] is not None]
    ttft = sorted(r[0] for r in records)
    e2e = sorted(r[1] for r in records)
    if gaps:
        itl = sorted(g for r in records for g in r[4])
    else:
        itl = sorted((r[1] - r[0]) / (r[2] - 1) for r in records if r[2] > 1)
    tokens = sum(r[2] for r in records)
    out = {"requests": len(records), "tokens": tokens, "seconds": wall, "tok_per_s": tokens / wall,
           "ttft_ms_by_request": {r[3]: 1000 * r[0] for r in records}, "e2e_ms_by_request": {r[3]: 1000 * r[1] for r in records}}
    for name, xs in (("ttft", ttft), ("itl", itl), ("e2e", e2e)):
        for p in (50, 90, 99):
            out[f"{name}_p{p}_ms"] = percentile(xs, p) if xs else None
    return out


def paired_ms(a: dict, b: dict, key: str = "ttft_ms_by_request") -> float:
    """Median over requests of a's time minus b's for the same request: steadier than the
    difference of two medians, when both sides ran the same requests."""
    return statistics.median(a[key][i] - t for i, t in b[key].items() if i in a[key])


# Tracing on: the stacks export spans to a receiver here.

def _receive(port: int, keep: str | None = None) -> None:
    """A local OTLP/gRPC trace receiver that accepts spans and drops them, or with `keep`
    appends each to that file as a JSON line: trace_id (hex), service, name, start and end
    (unix ns) and events ({name: unix ns})."""
    import json
    import threading
    from concurrent import futures

    import grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

    out = open(keep, "a") if keep else None
    lock = threading.Lock()

    class Sink(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request, context):  # noqa: N802
            if out is not None:
                lines = []
                for rs in request.resource_spans:
                    service = next((a.value.string_value for a in rs.resource.attributes if a.key == "service.name"), "")
                    lines += [json.dumps(span_row(service, sp)) + "\n" for ss in rs.scope_spans for sp in ss.spans]
                with lock:
                    out.writelines(lines)
                    out.flush()
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Sink(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    server.wait_for_termination()


def span_row(service: str, span) -> dict:
    """An OTLP span as the receiver keeps it (and bench.path_breakdown reads it)."""
    return {"trace_id": span.trace_id.hex(), "service": service, "name": span.name, "start": span.start_time_unix_nano,
            "end": span.end_time_unix_nano, "events": {e.name: e.time_unix_nano for e in span.events}}


def start_trace_receiver(keep: str | None = None) -> tuple[mp.Process, str]:
    """The receiver in a process of its own (terminate it when done), and its endpoint;
    `keep`: the file it appends spans to (see _receive)."""
    port = free_port()
    receiver = spawn.Process(target=_receive, args=(port, keep), daemon=True)
    receiver.start()
    return receiver, f"http://127.0.0.1:{port}"


def otlp_env(endpoint: str) -> dict[str, str]:
    """The variables that make a stack export its spans to `endpoint` over OTLP/gRPC."""
    return {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_EXPORTER_OTLP_INSECURE": "true"}
