"""Where a request's time to first token goes on its way through the stack, from its trace:
the client's send and first delta (a traced load, bench.load.run_load's `trace`) and the
spans the gateway, scheduler and worker export (to bench.load's receiver, kept in a file).
Each hop is the time between two of these moments, so the hops of a request add up to its
TTFT. The engine driven directly has three of them: to the step boundary it is submitted at
(open loop), queued and first steps.

All the moments are unix times taken on one machine, so they compare across processes."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from bench.load import nearest_rank, trace_id_of

GATEWAY_SPAN = "inflight.v1.Inference/Generate"
SCHEDULER_SPAN = "inflight.scheduler.schedule"
WORKER_SPAN = "inflight.worker.request"
QUEUED_SPAN = "queued"  # the worker's: from its intake to the step that first ran the request

# (name, what it covers), in the order a request meets them
HOPS = (
    ("to gateway", "client sends -> the gateway's span starts (gRPC)"),
    ("gateway", "-> the scheduler's span starts (template, tokenizing, checks, ZeroMQ)"),
    ("scheduler", "its span: admission and routing"),
    ("to worker", "-> the worker takes it in (ZeroMQ, and the worker busy with a step)"),
    ("queued", "-> the engine step that first runs it is launched"),
    ("first steps", "-> the worker has its first token (the steps' device time)"),
    ("to gateway'", "-> the gateway has it (worker sends, scheduler relays)"),
    ("to client", "-> the client has it (gRPC)"),
)
DIRECT_HOPS = ("to worker", "queued", "first steps")  # to worker: from its arrival to the step boundary it was submitted at


def read_spans(path: str | Path) -> dict[str, list[dict]]:
    """The receiver's file (bench.load._receive's `keep`) as {trace id: [span]}."""
    traces: dict[str, list[dict]] = defaultdict(list)
    p = Path(path)
    if p.exists():
        for line in p.read_text().splitlines():
            if line.strip():
                span = json.loads(line)
                traces[span["trace_id"]].append(span)
    return traces


def _first(spans: list[dict], name: str) -> dict | None:
    named = [s for s in spans if s["name"] == name]
    return min(named, key=lambda s: s["start"]) if named else None


def request_hops(spans: list[dict], sent: float, ttft: float) -> dict[str, float] | None:
    """One request's hops in ms, from its spans and the client's send (unix s) and TTFT (s);
    None if a span or event is missing (a request requeued to another worker keeps its first
    of each)."""
    g, s, w, q = (_first(spans, n) for n in (GATEWAY_SPAN, SCHEDULER_SPAN, WORKER_SPAN, QUEUED_SPAN))
    if None in (g, s, w, q) or "first_token" not in g["events"] or "first_token" not in w["events"]:
        return None
    ns = 1e9
    moments = [sent, g["start"] / ns, s["start"] / ns, s["end"] / ns, w["start"] / ns, q["end"] / ns,
               w["events"]["first_token"] / ns, g["events"]["first_token"] / ns, sent + ttft]
    return {name: 1000 * (b - a) for (name, _), a, b in zip(HOPS, moments, moments[1:])}


def served_breakdown(records: list[tuple], traces: dict[str, list[dict]], trace: int) -> dict:
    """Each hop's percentiles over the requests of a traced load (records as run_load's, the
    request key at [3] and the send time at [6])."""
    hops = []
    for r in records:
        if r[0] is None:
            continue
        h = request_hops(traces.get(trace_id_of(trace, r[3]), []), r[6], r[0])
        if h is not None:
            hops.append(h)
    return summary(hops, [name for name, _ in HOPS], len(records))


def direct_hops(arrived: float, submitted: float, scheduled: float, first: float) -> dict[str, float]:
    """The engine driven directly: arrived (unix s; open loop, the driver submits at the
    next step boundary) -> submitted -> scheduled (its first step's launch) -> first token."""
    return {"to worker": 1000 * (submitted - arrived), "queued": 1000 * (scheduled - submitted),
            "first steps": 1000 * (first - scheduled)}


def summary(hops: list[dict[str, float]], names, requests: int) -> dict:
    out = {"requests": requests, "traced": len(hops), "hops": {}}
    for name in names:
        xs = sorted(h[name] for h in hops)
        if xs:
            out["hops"][name] = {"mean": sum(xs) / len(xs), **{f"p{p}": nearest_rank(xs, p) for p in (50, 90, 99)}}
    return out


def print_breakdown(title: str, served: dict, direct: dict | None) -> None:
    """A table: each hop's p50 / p90 / mean, served, and where the direct engine has the hop, direct."""
    print(f"\n{title}: {served['traced']} of {served['requests']} requests traced")
    print(f"{'hop':>13} {'served ms p50/p90/mean':>24} {'direct ms p50/p90/mean':>24}  covers")
    for name, covers in HOPS:
        s = served["hops"].get(name)
        d = direct["hops"].get(name) if direct else None

        def cell(x):
            return "-" if x is None else f"{x['p50']:.2f}/{x['p90']:.2f}/{x['mean']:.2f}"

        print(f"{name:>13} {cell(s):>24} {cell(d):>24}  {covers}")
