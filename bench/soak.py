"""A bounded soak: many requests through a real stack (`inflight serve` on the CPU, the
default model) over many concurrent Generate streams, with every way a request can end:
normal completions, cancels (a cancel message, right after the start or after the first
delta), client disconnects (a stream dropped mid-request) and deadlines (a stream's
deadline, 50 ms to 1 s). The resident memory (VmRSS) of the gateway, scheduler and
worker is sampled after a warm-up, along the way and at the end, and at the end the
stack must be idle: nothing running or queued, no KV blocks in use.

    python -m bench.soak --requests 20000 --out soak.json
    python -m bench.soak --requests 1000 --streams 8

Outcomes: finished, cancelled, deadline exceeded (an error event, or the call's own
status), disconnected (dropped with its stream, no answer expected); `cancel after
finish` counts cancels that came too late and were answered INVALID_ARGUMENT, as they
should be. Anything else (another code, a request never answered, a stream that hangs)
is a failure."""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import json
import random
import time

import grpc

from inflight.v1 import pb, pb_grpc
from testing.stack import Stack, children_of

WORDS = ("river", "mountain", "lamp", "violin", "harbour", "comet", "garden", "engine", "winter", "pepper", "castle", "robot")
OK_OUTCOMES = ("finished", "cancelled", "deadline exceeded", "disconnected")
# How streams end, in turn: half of them normally, so that any few hundred requests hold every kind.
KINDS = ("normal", "cancel", "normal", "deadline", "normal", "disconnect")
STREAM_TIMEOUT = 120.0  # seconds for one stream to end; longer is a hang
IDLE = {  # (process, metric): every one must read 0 once the soak is over
    ("worker", "inflight_worker_requests{state=running}"): "worker running",
    ("worker", "inflight_worker_requests{state=queued}"): "worker queued",
    ("worker", "inflight_worker_kv_blocks{state=in_use}"): "worker KV blocks in use",
    ("scheduler", "inflight_scheduler_requests_queued"): "scheduler queued",
    ("scheduler", "inflight_scheduler_requests_running"): "scheduler running",
    ("gateway", "inflight_gateway_requests_running{protocol=grpc}"): "gateway running",
}


def processes(stack: Stack) -> dict[str, int]:
    """The stack's gateway, scheduler and workers by name, from their command lines."""
    out = {}
    for pid in children_of(stack.proc.pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = [a.decode() for a in f.read().split(b"\0")]
        except OSError:
            continue
        if "gateway" in argv or "scheduler" in argv:
            out["gateway" if "gateway" in argv else "scheduler"] = pid
        elif "worker" in argv:
            out[argv[argv.index("--worker-id") + 1] if "--worker-id" in argv else f"worker-{pid}"] = pid
    return out


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


@dataclasses.dataclass
class Plan:
    """One stream: its requests (id, StartRequest), how it ends, and when."""
    kind: str  # "normal", "cancel", "disconnect" or "deadline"
    starts: list[tuple[str, pb.StartRequest]]
    cancel_now: set[str] = dataclasses.field(default_factory=set)  # cancelled right after the starts
    cancel_on_delta: set[str] = dataclasses.field(default_factory=set)  # cancelled at their first delta
    disconnect_after: int = 0  # deltas seen before the client drops the stream
    deadline: float | None = None


def prompt(rng: random.Random, n: int) -> dict:
    words = " and ".join(rng.sample(WORDS, 2))
    if rng.random() < 0.5:
        return {"text": f"Note {n}: a few words about {words}."}
    return {"chat": pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=f"Say something about {words} ({n}).")])}


def plan(rng: random.Random, kind: str, first: int, size: int) -> Plan:
    """A stream of `size` requests, numbered from `first`. Short requests (1 to 4 tokens)
    complete; long ones (8 to 32 tokens, no end of sequence; half of those in a stream
    that is not normal) are the ones cancelled, dropped or cut by the deadline as they run."""
    p = Plan(kind, [])
    for i in range(first, first + size):
        rid = str(i)
        long = kind != "normal" and rng.random() < 0.5
        sampling = pb.SamplingParams(max_tokens=rng.randint(8, 32) if long else rng.randint(1, 4), ignore_eos=long,
                                     temperature=rng.choice((0.0, 0.7, 1.0)), seed=rng.randrange(2**32))
        p.starts.append((rid, pb.StartRequest(request_id=rid, sampling=sampling, **prompt(rng, i))))
        if kind == "cancel" and long:
            (p.cancel_now if rng.random() < 0.3 else p.cancel_on_delta).add(rid)
    if kind == "disconnect":
        p.disconnect_after = rng.randint(1, 8)
    if kind == "deadline":
        p.deadline = rng.uniform(0.05, 1.0)
    return p


async def run_stream(stub: pb_grpc.InferenceStub, p: Plan, outcomes: collections.Counter, details: collections.Counter) -> None:
    """Runs one planned stream; adds each of its requests' outcome to `outcomes`, and the
    message of each unexpected error or stream status to `details`."""
    outbox: asyncio.Queue = asyncio.Queue()
    ended: dict[str, str] = {}
    to_cancel = set(p.cancel_now | p.cancel_on_delta)
    late_cancels = 0

    async def requests():
        while (msg := await outbox.get()) is not None:
            yield msg

    def cancel(rid: str) -> None:
        to_cancel.discard(rid)
        outbox.put_nowait(pb.GenerateRequest(cancel=pb.CancelRequest(request_id=rid)))
        if not to_cancel:
            outbox.put_nowait(None)

    call = stub.Generate(requests(), timeout=p.deadline)
    for _, start in p.starts:
        outbox.put_nowait(pb.GenerateRequest(start=start))
    for rid in p.cancel_now:
        cancel(rid)
    if not to_cancel and p.kind != "disconnect":
        outbox.put_nowait(None)  # no more requests: the server ends the stream once they have
    deltas, dropped, status = 0, False, None

    async def read() -> None:
        nonlocal deltas, dropped, late_cancels
        async for response in call:
            for event in response.events:
                rid, kind = event.request_id, event.WhichOneof("kind")
                if kind == "delta":
                    deltas += 1
                    if rid in p.cancel_on_delta and rid in to_cancel:
                        cancel(rid)
                    continue
                if kind == "error" and event.error.message.startswith("cancel.request_id"):
                    late_cancels += 1  # it had ended before the cancel arrived
                    continue
                if rid in ended:
                    ended[rid] = "two terminal events"
                    continue
                if kind == "finished":
                    ended[rid] = "finished"
                else:
                    code = next((c for c in grpc.StatusCode if c.value[0] == event.error.code), grpc.StatusCode.UNKNOWN)
                    ended[rid] = {"CANCELLED": "cancelled", "DEADLINE_EXCEEDED": "deadline exceeded"}.get(code.name, f"error {code.name}")
                    if ended[rid].startswith("error"):
                        details[f"{code.name}: {event.error.message[:160]}"] += 1
                if rid in to_cancel:  # ended before its cancel was due
                    to_cancel.discard(rid)
                    if not to_cancel:
                        outbox.put_nowait(None)
                if p.kind == "disconnect" and len(ended) == len(p.starts):
                    outbox.put_nowait(None)  # everything ended before the drop was due
            if p.disconnect_after and deltas >= p.disconnect_after:
                dropped = True
                call.cancel()
                return

    try:
        await asyncio.wait_for(read(), STREAM_TIMEOUT)
    except asyncio.TimeoutError:
        status = "hung"
        call.cancel()
    except grpc.aio.AioRpcError as e:
        status = e.code().name
        if status != "DEADLINE_EXCEEDED":
            details[f"{p.kind} stream {status}: {(e.details() or '')[:160]}"] += 1
    except asyncio.CancelledError:
        if not dropped:
            raise
    for rid, _ in p.starts:
        if rid in ended:
            outcomes[ended[rid]] += 1
        elif dropped:
            outcomes["disconnected"] += 1
        elif status == "DEADLINE_EXCEEDED":
            outcomes["deadline exceeded"] += 1
        else:
            outcomes[f"unanswered (stream {status or 'OK'})"] += 1
    outcomes["cancel after finish"] += late_cancels


async def drive(target: str, requests: int, streams: int, rng: random.Random, outcomes: collections.Counter,
                details: collections.Counter, on_progress=None, every: int = 0) -> None:
    """`requests` requests over `streams` concurrent stream loops, each opening stream
    after stream (4 to 32 requests each) until none are left. `on_progress(done)` is
    called (in a thread) each time another `every` requests have been answered."""
    next_id, done, marks, opened = 0, 0, every, 0
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.InferenceStub(channel)

        async def loop() -> None:
            nonlocal next_id, done, marks, opened
            while next_id < requests:
                size = min(rng.randint(4, 32), requests - next_id)
                p = plan(rng, KINDS[opened % len(KINDS)], next_id, size)
                next_id, opened = next_id + size, opened + 1
                await run_stream(stub, p, outcomes, details)
                done += size
                if on_progress and every and done >= marks:
                    marks += every
                    await asyncio.to_thread(on_progress, done)

        await asyncio.gather(*(loop() for _ in range(streams)))


def wait_idle(stack: Stack, timeout: float = 30.0) -> dict[str, float]:
    """Each IDLE metric once it reads 0 (its last value if it never does within `timeout`)."""
    deadline = time.monotonic() + timeout
    while True:
        values = {}
        for (process, metric), name in IDLE.items():
            for p in (range(stack.workers) if process == "worker" else (process,)):
                values[name if process != "worker" else name.replace("worker", f"worker-{p}")] = stack.metrics(p).get(metric, float("nan"))
        if all(v == 0 for v in values.values()) or time.monotonic() > deadline:
            return values
        time.sleep(0.2)


def soak(stack: Stack, requests: int, *, streams: int = 16, warmup: int = 500, seed: int = 0, samples: int = 20,
         log=print) -> dict:
    """Warms up with `warmup` requests, samples RSS, drives `requests` more (sampling RSS
    `samples` times along the way), waits for the stack to be idle, samples again."""
    pids = processes(stack)
    rng = random.Random(seed)
    warm: collections.Counter = collections.Counter()
    details: collections.Counter = collections.Counter()
    asyncio.run(drive(stack.target, warmup, streams, rng, warm, details))
    wait_idle(stack)
    trace = [{"requests": 0, **{name: round(rss_mib(pid), 1) for name, pid in pids.items()}}]
    log(f"after {warmup} warm-up requests: " + ", ".join(f"{k} {v} MiB" for k, v in trace[0].items() if k != "requests"))
    start = time.monotonic()

    def sample(done: int) -> None:
        trace.append({"requests": done, **{name: round(rss_mib(pid), 1) for name, pid in pids.items()}})
        log(f"{done} requests, {time.monotonic() - start:.0f} s: " + ", ".join(f"{k} {v} MiB" for k, v in trace[-1].items() if k != "requests"))

    outcomes: collections.Counter = collections.Counter()
    asyncio.run(drive(stack.target, requests, streams, rng, outcomes, details, sample, max(1, requests // samples)))
    seconds = time.monotonic() - start
    idle = wait_idle(stack)
    trace.append({"requests": requests, "idle": True, **{name: round(rss_mib(pid), 1) for name, pid in pids.items()}})
    rss = {name: {"start_mib": trace[0][name], "end_mib": trace[-1][name], "growth_mib": round(trace[-1][name] - trace[0][name], 1),
                  "peak_mib": max(t[name] for t in trace)} for name in pids}
    failures = {k: v for k, v in outcomes.items() if k not in OK_OUTCOMES and k != "cancel after finish"}
    return {"requests": requests, "streams": streams, "warmup": warmup, "seed": seed, "seconds": round(seconds, 1),
            "requests_per_s": round(requests / seconds, 1), "outcomes": dict(outcomes), "warmup_outcomes": dict(warm),
            "failures": failures, "failure_details": dict(details.most_common(20)),
            "rss": rss, "rss_trace": trace, "idle": idle, "is_idle": all(v == 0 for v in idle.values())}


def table(r: dict) -> str:
    lines = [f"soak: {r['requests']} requests over {r['streams']} concurrent streams in {r['seconds']:.0f} s "
             f"({r['requests_per_s']:.1f}/s), after {r['warmup']} warm-up requests", "",
             f"{'outcome':>22} {'requests':>9}"]
    for k in (*OK_OUTCOMES, "cancel after finish", *sorted(r["failures"])):
        lines.append(f"{k:>22} {r['outcomes'].get(k, 0):>9}")
    lines += ["", f"{'process':>10} {'RSS start MiB':>14} {'RSS end MiB':>12} {'growth MiB':>11} {'peak MiB':>9}"]
    for name, m in r["rss"].items():
        lines.append(f"{name:>10} {m['start_mib']:>14.1f} {m['end_mib']:>12.1f} {m['growth_mib']:>11.1f} {m['peak_mib']:>9.1f}")
    lines += [f"  {n} x {d}" for d, n in r["failure_details"].items()]
    lines += ["", "idle after: " + ", ".join(f"{k} {v:g}" for k, v in r["idle"].items()),
              "PASS" if r["is_idle"] and not r["failures"] else "FAIL"]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=20_000, help="requests after the warm-up")
    ap.add_argument("--streams", type=int, default=16, help="concurrent Generate streams")
    ap.add_argument("--warmup", type=int, default=500, help="requests before the first memory sample")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--stack-env", action="append", default=[], metavar="NAME=VALUE",
                    help="a variable for the stack's processes (e.g. INFLIGHT_MAX_NUM_TOKENS=1024); repeatable")
    ap.add_argument("--out", default="soak.json")
    args = ap.parse_args()
    env = dict(kv.split("=", 1) for kv in args.stack_env)
    with Stack(workers=args.workers, env=env) as stack:
        r = soak(stack, args.requests, streams=args.streams, warmup=args.warmup, seed=args.seed)
        r["stack_env"] = env
        r["stack_log_tail"] = stack.log[-200:]  # warnings and errors of the stack's processes
    print()
    print(table(r))
    with open(args.out, "w") as f:
        json.dump(r, f, indent=1)
    raise SystemExit(0 if r["is_idle"] and not r["failures"] else 1)


if __name__ == "__main__":
    main()
