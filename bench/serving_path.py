"""Streamed tokens per second through gateway + scheduler + worker, with the model-free
engine double (testing/engine_double.py) so that only the serving path is measured.

Baseline, in the same run: a bare grpc.aio server with the same API that streams each
token as its own message straight from the handler (no ZeroMQ, no scheduler, no
detokenizer). The ratio says what our path costs against gRPC alone.

    python -m bench.serving_path --concurrency 1 64 256 --seconds 10 --out serving_path.json

With --tracing the baseline is instead the same stack with tracing off, against tracing
on (every process exporting spans over OTLP/gRPC to a receiver started here):

    python -m bench.serving_path --tracing --seconds 10 --rounds 5 --out tracing_cost.json

Tracing's cost is a few percent, and one 10-second point moves by more than that on a
busy machine, so --rounds repeats every point (alternating which stack goes first) and
reports the median ratio. --env compares the same way a stack with some environment
variables set against one without, e.g. the collector left at Python's defaults:

    python -m bench.serving_path --env INFLIGHT_GC_SETTLE=0 --step-ms 10 --rounds 5 --out gc_settle.json

Each concurrent client holds one Generate stream and sends its next request when the
last one finished. The load generators run in processes of their own (--pin: on cores
of their own), and each stack process's CPU time per 1,000 tokens is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

from bench.load import Target, otlp_env, percentile, run_load, spawn, start_trace_receiver
from bench.stack_cpu import cpu_plan
from inflight.v1 import pb, pb_grpc
from testing.engine_double import CYCLE
from testing.stack import Stack, free_port


# The bare baseline server.

class BareServicer(pb_grpc.InferenceServicer):
    async def Generate(self, request_iterator, context):
        async for req in request_iterator:
            start = req.start
            for i in range(start.sampling.max_tokens):
                yield pb.GenerateResponse(events=[pb.Event(request_id=start.request_id, delta=pb.Delta(token_ids=[CYCLE[i % len(CYCLE)]], text=" the"))])
            yield pb.GenerateResponse(events=[pb.Event(request_id=start.request_id, finished=pb.Finished(reason=pb.FINISH_REASON_LENGTH))])


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


def start_stack(env: dict | None, step_ms: float, tokenizer: str | None) -> Stack:
    """The stack on the engine double, metrics off."""
    return Stack(env={"INFLIGHT_ENGINE": "testing.engine_double:InstantEngine", "INFLIGHT_SERVED_MODEL_NAME": "bench",
                      "ENGINE_DOUBLE_STEP_MS": str(step_ms), "INFLIGHT_MAX_BATCH_SIZE": "512", **(env or {})},
                 model=os.path.abspath(tokenizer) if tokenizer else None, host="127.0.0.1", metrics=False, tokens_per_block=None)


def stop_stack(stack: Stack) -> None:
    stack.stop()
    if stack.log:
        print("".join(stack.log)[-2000:])


def measure(address: str, concurrency: int, seconds: float, max_tokens: int, stack: Stack | None = None, load_procs: int = 1,
            load_cpus: list[int] | None = None, pin: tuple | None = None) -> dict:
    """One point, the clients spread over `load_procs` processes; with `stack`, also each
    stack process's CPU use over it: `cpu_util` (CPU seconds per second, 1.0 = one core
    busy) and `cpu_ms_per_1k_tokens`. `load_util`: the load generators' cores busy (near
    1.0 a process, they and not the stack set the pace). `pin`: ({role: CPUs}, other CPUs)
    for the stack's processes (pin_stack)."""
    got = run_load({"": Target(address, stack, load_procs, load_cpus, pin)}, concurrency, seconds=seconds, max_tokens=max_tokens)[""]
    ttfts = sorted(r[0] for r in got["records"] if r[0] is not None)
    tokens, elapsed = got["tokens"], got["seconds"]
    result = {"tokens_per_s": tokens / elapsed, "events_per_s": got["messages"] / elapsed,
              "requests": len(got["records"]), "ttft_p50_ms": percentile(ttfts, 50) if ttfts else None,
              "load_util": got["load_util"]}
    if stack:
        used = got["cpu_s"]
        result["cpu_util"] = {k: v / got["wall"] for k, v in used.items()}
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
            receiver, endpoint = start_trace_receiver()
            changed = otlp_env(endpoint)
            keys, labels = ("tracing_on", "tracing_off"), ("tracing on tok/s", "tracing off tok/s")
        else:
            changed = dict(kv.split("=", 1) for kv in args.env)
            keys, labels = ("with_env", "without_env"), ("with env tok/s", "without tok/s")
        plan = cpu_plan(2, load_procs_max) if args.pin else None
        pins = {key: (plan["stacks"][i], plan["rest"]) if plan else None for i, key in enumerate(("off", "on"))}
        stacks = {}
        try:
            stacks["off"] = start_stack(None, args.step_ms, args.tokenizer)
            stacks["on"] = start_stack(changed, args.step_ms, args.tokenizer)
            rounds = {c: [] for c in args.concurrency}
            for r in range(args.rounds):
                for c in args.concurrency:  # alternate, so drift in the machine hits both
                    order = ("off", "on") if r % 2 == 0 else ("on", "off")
                    got = {key: measure(stacks[key].target, c, args.seconds, args.max_tokens, stacks[key], load_procs(c),
                                        plan and plan["load"], pins[key]) for key in order}
                    rounds[c].append((got["on"], got["off"]))
            for c, pairs in rounds.items():
                ratios = sorted(a["tokens_per_s"] / b["tokens_per_s"] for a, b in pairs)
                cpu = lambda got, roles=None: sum(v for k, v in got["cpu_ms_per_1k_tokens"].items() if roles is None or k in roles)  # noqa: E731
                rows.append({"concurrency": c, keys[0]: pairs[-1][0], keys[1]: pairs[-1][1], "ratio": statistics.median(ratios),
                             "ratios": ratios, "rounds": [{keys[0]: a, keys[1]: b} for a, b in pairs],
                             # CPU per token, changed over baseline: the gateway alone (what saturates), and all processes
                             "gateway_cpu_ratio": statistics.median(cpu(a, ("gateway",)) / cpu(b, ("gateway",)) for a, b in pairs),
                             "stack_cpu_ratio": statistics.median(cpu(a) / cpu(b) for a, b in pairs)})
        finally:
            for stack in stacks.values():
                stop_stack(stack)
            if receiver is not None:
                receiver.terminate()
    else:
        bare_port = free_port()
        bare = spawn.Process(target=run_bare, args=(bare_port,), daemon=True)
        bare.start()
        stack = start_stack(None, args.step_ms, args.tokenizer)
        try:
            for c in args.concurrency:
                ours = measure(stack.target, c, args.seconds, args.max_tokens, stack, load_procs(c))
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
