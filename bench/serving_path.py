"""Streamed tokens per second through gateway + scheduler + worker, with the model-free
engine double (testing/engine_double.py) so that only the serving path is measured.

Baseline, in the same run: a bare grpc.aio server with the same API that streams each
token as its own message straight from the handler (no ZeroMQ, no scheduler, no
detokenizer). The ratio says what our path costs against gRPC alone.

    python bench/serving_path.py --concurrency 1 64 256 --seconds 10 --out serving_path.json

With --tracing the baseline is instead the same stack with tracing off, against tracing
on (every process exporting spans over OTLP/gRPC to a receiver started here):

    python bench/serving_path.py --tracing --seconds 10 --rounds 5 --out tracing_cost.json

Tracing's cost is a few percent, and one 10-second point moves by more than that on a
busy machine, so --rounds repeats every point (alternating which stack goes first) and
reports the median ratio. --env compares the same way a stack with some environment
variables set against one without, e.g. the collector left at Python's defaults:

    python bench/serving_path.py --env INFLIGHT_GC_SETTLE=0 --step-ms 10 --rounds 5 --out gc_settle.json

Each concurrent client holds one Generate stream and sends its next request when the
last one finished. The load generators run in processes of their own (--pin: on cores
of their own), and each stack process's CPU time per 1,000 tokens is reported.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from inflight.v1 import pb, pb_grpc  # noqa: E402
from testing.engine_double import CYCLE  # noqa: E402
from testing.stack import children_of, free_port  # noqa: E402


# The bare baseline server.

class BareServicer(pb_grpc.InferenceServicer):
    async def Generate(self, request_iterator, context):
        async for req in request_iterator:
            start = req.start
            for i in range(start.sampling.max_tokens):
                yield pb.GenerateResponse(events=[pb.Event(request_id=start.request_id, delta=pb.Delta(token_ids=[CYCLE[i % len(CYCLE)]], text=" the"))])
            yield pb.GenerateResponse(events=[pb.Event(request_id=start.request_id, finished=pb.Finished(reason=pb.FINISH_REASON_LENGTH))])


def run_receiver(port: int) -> None:
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


def start_stack(port: int, extra_env: dict | None = None, step_ms: float = 0.0, tokenizer: str | None = None) -> subprocess.Popen:
    env = {**os.environ, **({"INFLIGHT_MODEL": os.path.abspath(tokenizer)} if tokenizer else {}), "INFLIGHT_BACKEND": "testing.engine_double:InstantEngine", "INFLIGHT_SERVED_MODEL_NAME": "bench",
           "ENGINE_DOUBLE_STEP_MS": str(step_ms),
           "INFLIGHT_MAX_BATCH_SIZE": "512", "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])), **(extra_env or {})}
    for k in [k for k in env if k.startswith("OTEL_") and not (extra_env and k in extra_env)]:
        del env[k]
    return subprocess.Popen([sys.executable, "-m", "cli", "--log-level", "WARNING", "serve", "--listen", f"127.0.0.1:{port}",
                             "--device", "cpu", "--metrics-port", "0", "--gateway-address", f"tcp://127.0.0.1:{free_port()}",
                             "--worker-address", f"tcp://127.0.0.1:{free_port()}"], env=env, cwd=ROOT)


def stop_stack(stack: subprocess.Popen) -> None:
    stack.terminate()
    stack.wait(30)


def run_bare(port: int) -> None:
    import grpc
    import uvloop

    async def main():
        server = grpc.aio.server()
        pb_grpc.add_InferenceServicer_to_server(BareServicer(), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    uvloop.run(main())


# The load generator.

async def load(target: str, concurrency: int, seconds: float, max_tokens: int, ready=None, go=None) -> dict:
    """`concurrency` clients for `seconds`; with `ready`/`go` (multiprocessing), says when
    connected and waits for the word to start. Returns counts, this process's CPU seconds
    and the TTFTs."""
    from inflight.client import Client

    tokens = messages = requests = 0
    ttfts: list[float] = []
    stop_at = time.monotonic() + seconds

    async def one_client(client: Client, idx: int):
        nonlocal tokens, messages, requests
        n = 0
        while time.monotonic() < stop_at:
            session = client.session()
            session.start(f"{idx}-{n}", text="Tell me a story.", max_tokens=max_tokens, ignore_eos=True)
            session.close()
            t0 = time.monotonic()
            first = True
            async for ev in session.events():
                messages += 1
                if ev.WhichOneof("kind") == "delta":
                    if first:
                        ttfts.append(time.monotonic() - t0)
                        first = False
                    tokens += len(ev.delta.token_ids)
            requests += 1
            n += 1

    channels = max(1, concurrency // 32)  # several connections, as a fleet of callers would
    clients = [Client(target) for _ in range(channels)]
    for c in clients:
        await asyncio.wait_for(c.channel.channel_ready(), 60)
    if ready is not None:
        ready.put("ready")
        await asyncio.get_running_loop().run_in_executor(None, go.wait)
    cpu0 = time.process_time()
    t0 = time.monotonic()
    stop_at = t0 + seconds
    await asyncio.gather(*(one_client(clients[i % channels], i) for i in range(concurrency)))
    elapsed = time.monotonic() - t0
    cpu = time.process_time() - cpu0
    for c in clients:
        await c.channel.close()
    return {"tokens": tokens, "messages": messages, "requests": requests, "seconds": elapsed, "cpu_s": cpu, "ttfts": ttfts}


def load_process(target, concurrency, seconds, max_tokens, queue, go, cpus):
    import uvloop

    if cpus:
        os.sched_setaffinity(0, cpus)  # before gRPC starts its threads, which inherit it
    queue.put(uvloop.run(load(target, concurrency, seconds, max_tokens, queue, go)))


# CPU time per process of a stack, from /proc: which process saturates, and where
# tracing's cost lands (steadier than throughput on a busy machine).

def _role(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().decode(errors="replace").split("\0")
    except OSError:
        return None
    if "inflight.span_export" in argv:
        return "export"
    if "cli" in argv:
        for role in ("gateway", "scheduler", "worker", "serve"):
            if role in argv:
                return role
    return None


def _cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def stack_cpu(root: int) -> dict[str, float]:
    """CPU seconds so far of each process under `root`, by role; a span-export child
    counts as "<its parent's role>-export"."""
    out: dict[str, float] = {}

    def walk(pid: int, parent_role: str | None) -> None:
        role = _role(pid)
        if role == "export":
            role = f"{parent_role}-export"
        if role:
            out[role] = out.get(role, 0.0) + _cpu_seconds(pid)
        for child in children_of(pid):
            walk(child, role or parent_role)

    walk(root, None)
    out.pop("serve", None)
    return out


# --pin: each gateway (the process that saturates) and the load generators get physical
# cores of their own, with the cores' other hardware threads left idle; the rest share
# what remains. A process that lands beside a busy sibling thread runs up to a third
# slower, which moved whole points by more than tracing costs.

def physical_cores() -> list[list[int]]:
    """The logical CPUs this process may use, grouped by physical core."""
    groups: dict[str, list[int]] = {}
    for cpu in sorted(os.sched_getaffinity(0)):
        try:
            with open(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list") as f:
                key = f.read().strip()
        except OSError:
            key = str(cpu)
        groups.setdefault(key, []).append(cpu)
    return list(groups.values())


def cpu_plan(stacks: int, load_procs: int, dedicated: dict[str, int] | None = None) -> dict:
    """Cores for `stacks` stacks: in each, every role in `dedicated` (default: the gateway)
    gets that many physical cores of its own; the load generators one each; the rest of
    the stacks' processes share what is left. Returns {"stacks": [{role: cpus}], "load":
    cpus, "rest": cpus}."""
    dedicated = dedicated or {"gateway": 1}
    cores = physical_cores()
    need = stacks * sum(dedicated.values()) + load_procs + 1
    if len(cores) < need:
        sys.exit(f"--pin needs {need} physical cores; this machine gives {len(cores)}")
    free = iter(cores)
    plan = {"stacks": [{role: [next(free)[0] for _ in range(n)] for role, n in dedicated.items()} for _ in range(stacks)]}
    plan["load"] = [next(free)[0] for _ in range(load_procs)]
    plan["rest"] = [cpu for c in free for cpu in c]
    return plan


def pin_stack(root: int, dedicated: dict[str, list[int]], rest: list[int]) -> None:
    """Every thread of every process under `root`: those of a role in `dedicated` on its
    CPUs, the others (span-export children included) on `rest`."""
    def walk(pid: int) -> None:
        cpus = dedicated.get(_role(pid), rest)
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            return  # the process ended
        for tid in tids:
            try:
                os.sched_setaffinity(int(tid), cpus)
            except OSError:
                pass  # a thread that just ended
        for child in children_of(pid):
            walk(child)

    walk(root)


# grpc does not survive fork: helper processes start fresh, and this process itself never
# opens a gRPC channel (its threads' fork handlers can hang the next process started).
ctx = mp.get_context("spawn")


def measure(target, concurrency, seconds, max_tokens, stack_pid: int | None = None, load_procs: int = 1,
            load_cpus: list[int] | None = None, pin: tuple | None = None) -> dict:
    """One point, the clients spread over `load_procs` processes; with `stack_pid`, also
    each stack process's CPU use over it: `cpu_util` (CPU seconds per second, 1.0 = one
    core busy) and `cpu_ms_per_1k_tokens`. `load_util`: the load generators' cores busy
    (near 1.0 a process, they and not the stack set the pace). `pin`: ({role: CPUs}, other
    CPUs) for the stack's processes (pin_stack)."""
    q, go = ctx.Queue(), ctx.Event()
    shares = [concurrency // load_procs + (i < concurrency % load_procs) for i in range(load_procs)]
    procs = [ctx.Process(target=load_process, args=(target, n, seconds, max_tokens, q, go, load_cpus)) for n in shares if n]
    for p in procs:
        p.start()
    for _ in procs:
        q.get(timeout=120)  # connected: the stack serves
    if pin:
        pin_stack(stack_pid, *pin)  # every point: threads started since are pinned too
    before = stack_cpu(stack_pid) if stack_pid else {}
    t0 = time.monotonic()
    go.set()
    parts = [q.get(timeout=seconds + 120) for _ in procs]
    wall = time.monotonic() - t0
    for p in procs:
        p.join()
    elapsed = max(r["seconds"] for r in parts)
    tokens = sum(r["tokens"] for r in parts)
    ttfts = sorted(t for r in parts for t in r["ttfts"])
    result = {"tokens_per_s": tokens / elapsed, "events_per_s": sum(r["messages"] for r in parts) / elapsed,
              "requests": sum(r["requests"] for r in parts), "ttft_p50_ms": 1000 * ttfts[len(ttfts) // 2] if ttfts else None,
              "load_util": [round(r["cpu_s"] / r["seconds"], 3) for r in parts]}
    if stack_pid:
        after = stack_cpu(stack_pid)
        used = {k: after[k] - before.get(k, 0.0) for k in after}
        result["cpu_util"] = {k: v / wall for k, v in used.items()}
        result["cpu_ms_per_1k_tokens"] = {k: 1e6 * v / tokens for k, v in used.items()} if tokens else {}
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 64, 256])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--tracing", action="store_true", help="compare tracing on against tracing off instead of bare gRPC")
    ap.add_argument("--env", nargs="+", metavar="KEY=VALUE",
                    help="compare a stack with these environment variables against one without (as --tracing does)")
    ap.add_argument("--step-ms", type=float, default=0.0, help="each engine-double step takes this long (0: instant)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="with --tracing or --env: measure every point this many times, alternating which stack goes first; "
                         "the ratio reported is the median (the range is printed too)")
    ap.add_argument("--tokenizer", help="folder with tokenizer.json and tokenizer_config.json (default: the built-in model's)")
    ap.add_argument("--streams-per-load-process", type=int, default=128,
                    help="the clients are spread over processes of at most this many streams each")
    ap.add_argument("--pin", action="store_true", help="with --tracing or --env: each gateway and the load generators on physical cores of their own")
    ap.add_argument("--out", default="serving_path.json")
    args = ap.parse_args()
    load_procs = lambda c: -(-c // args.streams_per_load_process)  # noqa: E731
    load_procs_max = max(map(load_procs, args.concurrency))

    rows = []
    if args.tracing or args.env:
        receiver = None
        if args.tracing:
            receiver_port = free_port()
            receiver = ctx.Process(target=run_receiver, args=(receiver_port,), daemon=True)
            receiver.start()
            changed = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver_port}", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
                       "OTEL_EXPORTER_OTLP_INSECURE": "true"}
            keys, labels = ("tracing_on", "tracing_off"), ("tracing on tok/s", "tracing off tok/s")
        else:
            changed = dict(kv.split("=", 1) for kv in args.env)
            keys, labels = ("with_env", "without_env"), ("with env tok/s", "without tok/s")
        off_port, on_port = free_port(), free_port()
        off, on = start_stack(off_port, None, args.step_ms, args.tokenizer), start_stack(on_port, changed, args.step_ms, args.tokenizer)
        pids = {off_port: off.pid, on_port: on.pid}
        plan = cpu_plan(2, load_procs_max) if args.pin else None
        pins = {port: (plan["stacks"][i], plan["rest"]) if plan else None for i, port in enumerate(pids)}
        try:
            rounds = {c: [] for c in args.concurrency}
            for r in range(args.rounds):
                for c in args.concurrency:  # alternate, so drift in the machine hits both
                    order = (off_port, on_port) if r % 2 == 0 else (on_port, off_port)
                    got = {port: measure(f"127.0.0.1:{port}", c, args.seconds, args.max_tokens, pids[port], load_procs(c),
                                         plan and plan["load"], pins[port]) for port in order}
                    rounds[c].append((got[on_port], got[off_port]))
            for c, pairs in rounds.items():
                ratios = sorted(a["tokens_per_s"] / b["tokens_per_s"] for a, b in pairs)
                cpu = lambda got, roles=None: sum(v for k, v in got["cpu_ms_per_1k_tokens"].items() if roles is None or k in roles)  # noqa: E731
                rows.append({"concurrency": c, keys[0]: pairs[-1][0], keys[1]: pairs[-1][1], "ratio": statistics.median(ratios),
                             "ratios": ratios, "rounds": [{keys[0]: a, keys[1]: b} for a, b in pairs],
                             # CPU per token, changed over baseline: the gateway alone (what saturates), and all processes
                             "gateway_cpu_ratio": statistics.median(cpu(a, ("gateway",)) / cpu(b, ("gateway",)) for a, b in pairs),
                             "stack_cpu_ratio": statistics.median(cpu(a) / cpu(b) for a, b in pairs)})
        finally:
            stop_stack(off)
            stop_stack(on)
            if receiver is not None:
                receiver.terminate()
    else:
        bare_port, port = free_port(), free_port()
        bare = ctx.Process(target=run_bare, args=(bare_port,), daemon=True)
        bare.start()
        stack = start_stack(port, None, args.step_ms, args.tokenizer)
        try:
            for c in args.concurrency:
                ours = measure(f"127.0.0.1:{port}", c, args.seconds, args.max_tokens, stack.pid, load_procs(c))
                base = measure(f"127.0.0.1:{bare_port}", c, args.seconds, args.max_tokens, None, load_procs(c))
                rows.append({"concurrency": c, "inflight": ours, "bare_grpc": base, "ratio": ours["tokens_per_s"] / base["tokens_per_s"]})
        finally:
            stop_stack(stack)
            bare.terminate()
        labels = ("inflight tok/s", "bare gRPC tok/s")
        keys = ("inflight", "bare_grpc")

    print(f"\nserving path, engine double ({args.step_ms:g} ms steps), {args.max_tokens} tokens per request, "
          f"{args.seconds:.0f}s per point, {os.cpu_count()} cores")
    print(f"{'streams':>8} {labels[0]:>17} {'msgs/s':>9} {'TTFT p50 ms':>12} {labels[1]:>18} {'ratio':>6} {'range':>13}"
          + (f" {'gw CPU/tok':>9} {'all CPU/tok':>9}" if args.tracing or args.env else ""))
    for r in rows:
        o, b = r[keys[0]], r[keys[1]]
        spread = f"{r['ratios'][0]:.3f}-{r['ratios'][-1]:.3f}" if len(r.get("ratios", ())) > 1 else ""
        cpu = f"{r['gateway_cpu_ratio']:>9.3f} {r['stack_cpu_ratio']:>9.3f}" if "gateway_cpu_ratio" in r else ""
        print(f"{r['concurrency']:>8} {o['tokens_per_s']:>17.0f} {o['events_per_s']:>9.0f} {o['ttft_p50_ms'] or 0:>12.1f} "
              f"{b['tokens_per_s']:>18.0f} {r['ratio']:>6.3f} {spread:>13} {cpu}")
    if any("cpu_util" in r[keys[0]] for r in rows):
        print_cpu(rows, keys, labels)
    with open(args.out, "w") as f:
        json.dump({"args": vars(args), "rows": rows}, f, indent=2)


def print_cpu(rows: list[dict], keys: tuple, labels: tuple) -> None:
    """Each stack process's CPU per 1,000 streamed tokens, and how busy it was (1.0 = a
    whole core), from the last round of each point."""
    print("\nCPU ms per 1k tokens (cores busy), last round")
    for r in rows:
        for key, label in zip(keys, labels):
            got = r[key]
            if "cpu_util" not in got:
                continue
            cells = "  ".join(f"{role} {got['cpu_ms_per_1k_tokens'][role]:6.1f} ({got['cpu_util'][role]:.2f})"
                              for role in sorted(got["cpu_util"]))
            cells += f"  load ({' '.join(f'{u:.2f}' for u in got['load_util'])})"
            print(f"{r['concurrency']:>8} {label.split(' tok/s')[0]:>12}  {cells}")


if __name__ == "__main__":
    main()
