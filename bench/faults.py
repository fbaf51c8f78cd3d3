"""What each fault costs the clients of a real stack: requests lost, tokens wrong, time to
detect and time to recover. `inflight serve` on the CPU with the default model, two
workers; each scenario runs the same streams first undisturbed (the reference) and then
with the fault, and compares.

    python -m bench.faults --out faults.json
    python -m bench.faults --worker-timeout 2 --out faults_2s.json

Scenarios:
  worker-sigkill   a worker killed mid-stream: its streams go on on the other worker
  worker-sigterm   a worker told to stop mid-stream: it drains
  workers-stopped  every worker SIGSTOPped (alive, silent): the streams end UNAVAILABLE;
                   SIGCONT, and the time until a request is served again
  scheduler-kill   the scheduler killed mid-stream: the streams end UNAVAILABLE;
                   `inflight serve` starts it again, and the time until served again

Columns: lost (streams that ended in an error), wrong (finished streams whose tokens
differ from the undisturbed run), gap (the longest pause between two deltas of one stream
across the fault), ended (from the fault to the last stream's end, for the scenarios
that end streams), recovered (worker-sigkill: from the kill until `inflight serve` had the
worker started again and rejoined; workers-stopped: from SIGCONT, and scheduler-kill: from
the kill, until a new request was served)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import time

from inflight.client import Client
from testing.stack import Stack, children_of

CHATS = [[{"role": "user", "content": f"Tell me a short story about a {animal}."}]
         for animal in ("cat", "dog", "fox", "owl", "bee", "eel")]


def pid_of(stack: Stack, *words: str) -> int:
    for pid in children_of(stack.proc.pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if all(w.encode() in argv for w in words):
            return pid
    raise RuntimeError(f"no process {' '.join(words)}")


async def streams(target: str, max_tokens: int, fault=None) -> dict:
    """The chats on one stream; `fault()` once every request has had a delta. Per request:
    ids, end kind, delta times. Also when the fault fired."""
    async with Client(target) as client:
        session = client.session()
        for i, chat in enumerate(CHATS):
            session.start(str(i), chat=chat, max_tokens=max_tokens, temperature=0, ignore_eos=True)
        session.close()
        out: dict = {}
        fired = None
        async for event in session.events():
            r = out.setdefault(event.request_id, {"ids": [], "end": None, "times": [], "ended": None})
            now = time.monotonic()
            if event.WhichOneof("kind") == "delta":
                r["ids"] += event.delta.token_ids
                r["times"].append(now)
            else:
                r["end"], r["ended"] = event.WhichOneof("kind"), now
            if fault and fired is None and len(out) == len(CHATS) and all(x["times"] for x in out.values()):
                fault()
                fired = time.monotonic()
        return {"requests": out, "fired": fired}


def served_again(target: str, since: float, limit: float = 120.0) -> float:
    """Seconds from `since` until one short request is served."""
    async def retry() -> float:
        async with Client(target) as client:
            while time.monotonic() - since < limit:
                try:
                    async for _ in client.generate(chat=CHATS[0], max_tokens=2, temperature=0):
                        pass
                    return time.monotonic() - since
                except Exception:
                    await asyncio.sleep(0.1)
        return float("inf")

    return asyncio.run(retry())


def score(run: dict, reference: dict) -> dict:
    reqs, fired = run["requests"], run["fired"]
    lost = [k for k, r in reqs.items() if r["end"] != "finished"]
    wrong = [k for k, r in reqs.items() if r["end"] == "finished" and r["ids"] != reference["requests"][k]["ids"]]
    gap = max((b - a for r in reqs.values() for a, b in zip(r["times"], r["times"][1:]) if b > fired), default=0.0)
    ends = [r["ended"] for r in reqs.values() if r["end"] != "finished"]
    return {"requests": len(reqs), "lost": len(lost), "wrong": len(wrong), "gap_s": round(gap, 2),
            "ended_s": round(max(ends) - fired, 2) if ends else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker-timeout", type=float, default=10.0, help="the scheduler's --worker-timeout (its default: 10)")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--out", default="faults.json")
    args = ap.parse_args()
    rows = []
    with Stack(workers=2, env={"INFLIGHT_WORKER_TIMEOUT": str(args.worker_timeout)}) as stack:
        reference = asyncio.run(streams(stack.target, args.max_tokens))

        def scenario(name: str, fault, after=None) -> None:
            run = asyncio.run(streams(stack.target, args.max_tokens, fault))
            row = {"scenario": name, **score(run, reference)}
            if after:
                row["recovered_s"] = round(after(run["fired"]), 2)
            rows.append(row)
            print(row, flush=True)

        def replaced(name: str, old: int, limit: float = 120.0) -> None:
            """Until `inflight serve` started `name` again and both workers serve."""
            deadline = time.monotonic() + limit
            while time.monotonic() < deadline:
                try:
                    if pid_of(stack, "worker", name) != old and stack.workers_alive() >= 2:
                        return
                except RuntimeError:
                    pass
                time.sleep(0.2)

        victim = pid_of(stack, "worker", "worker-0")

        def rejoined(fired: float) -> float:
            replaced("worker-0", victim)
            return time.monotonic() - fired

        scenario("worker-sigkill", lambda: os.kill(victim, signal.SIGKILL), rejoined)
        victim = pid_of(stack, "worker", "worker-1")
        scenario("worker-sigterm", lambda: os.kill(victim, signal.SIGTERM))
        replaced("worker-1", victim)
        stopped = [pid_of(stack, "worker", f"worker-{i}") for i in range(2)]

        def stop_all() -> None:
            for pid in stopped:
                os.kill(pid, signal.SIGSTOP)

        def resume(fired: float) -> float:
            for pid in stopped:
                os.kill(pid, signal.SIGCONT)
            return served_again(stack.target, time.monotonic())

        scenario("workers-stopped", stop_all, resume)
        deadline = time.monotonic() + 60
        while stack.workers_alive() < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        scenario("scheduler-kill", lambda: os.kill(pid_of(stack, "scheduler"), signal.SIGKILL),
                 lambda fired: served_again(stack.target, fired))
    print(f"\nfaults on a CPU stack (2 workers, the default model), worker timeout {args.worker_timeout:.0f} s")
    print(f"{'scenario':>16} {'requests':>8} {'lost':>5} {'wrong':>6} {'gap s':>6} {'ended s':>8} {'recovered s':>12}")
    for r in rows:
        ended = "-" if r["ended_s"] is None else f"{r['ended_s']:.2f}"
        rec = f"{r['recovered_s']:.2f}" if "recovered_s" in r else "-"
        print(f"{r['scenario']:>16} {r['requests']:>8} {r['lost']:>5} {r['wrong']:>6} {r['gap_s']:>6.2f} {ended:>8} {rec:>12}")
    with open(args.out, "w") as f:
        json.dump({"worker_timeout": args.worker_timeout, "max_tokens": args.max_tokens, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
