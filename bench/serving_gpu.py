"""The serving path on a GPU: the offline workload's request mix sent through gateway,
scheduler and worker at several concurrencies, against the engine driven directly (same
GPU, same model, same requests, same concurrency) in the same run.

Each of C clients sends its next request when the last one finished; requests are random
token-id prompts (lengths uniform in [128, 1024]) with outputs uniform in [128, 512]
(ignore_eos), 2*C requests per point (at least --min-requests). Reports throughput, time
to first token, inter-token latency and end-to-end latency percentiles, and the TTFT the
service adds as the median of each request's served-minus-direct difference ("paired"). The model has random
weights of a real shape, saved with a real tokenizer (--tokenizer: a folder holding
tokenizer.json and tokenizer_config.json whose vocabulary fits the shape).

    python -m bench.serving_gpu --shape smollm2-135m --tokenizer .bench/tok --out serving_gpu.json

With --tracing it compares two stacks instead, tracing on (exporting to an OTLP receiver
started here) and off, the same requests through each, in rounds; --control makes it an
A/A run (both untraced) that shows what two identical stacks differ by on this machine,
--together loads both at once, and --pin gives each stack's worker and gateway cores of
their own. Each point also reports every stack process's CPU per 1,000 tokens and the
worker's share of eager forward passes (from its /metrics).

    python -m bench.serving_gpu --tracing --pin --warm-rounds 1 --rounds 5 --min-requests 256 --tokenizer .bench/tok --concurrency 16 64 256
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import statistics
import sys
import time
from pathlib import Path

from bench.load import Target, otlp_env, paired_ms, run_load, start_trace_receiver, summarize
from bench.shapes import SHAPES, make_model_dir
from bench.stack_cpu import cpu_plan, pin_stack
from bench.workload import LENGTHS, workload
from testing.stack import Stack


def run_direct(engine, reqs, concurrency: int) -> dict:
    from inflight.sampling_params import SamplingParams

    pending = list(enumerate(reqs))
    start, first, count, records = {}, {}, {}, []
    t0 = time.perf_counter()

    def submit():
        i, (prompt, n) = pending.pop(0)
        engine.submit(str(i), prompt, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
        start[str(i)] = time.perf_counter()

    for _ in range(min(concurrency, len(pending))):
        submit()
    while engine.has_work():
        outs = engine.step()
        now = time.perf_counter()
        for o in outs:
            first.setdefault(o.request_id, now)
            count[o.request_id] = count.get(o.request_id, 0) + len(o.new_token_ids)
            if o.finished:
                rid = o.request_id
                records.append((first[rid] - start[rid], now - start[rid], count[rid], int(rid)))
                if pending:
                    submit()
    return summarize(records, time.perf_counter() - t0)


def run_served(targets: dict[str, Target], reqs, concurrency: int, model: str) -> dict[str, dict]:
    """The same requests through each target at the same time, each from a load process
    of its own; with several, `tok_per_s` counts only the window in which all ran (until
    the first finished). Also each stack process's CPU time per 1,000 tokens and the
    worker's forward passes by mode, where the target says how."""
    out = {}
    for k, got in run_load(targets, concurrency, requests=reqs, model=model).items():
        res = summarize(got["records"], got["seconds"])
        if got["window"]:
            res["window_tokens"], res["window_seconds"] = got["window"]
            res["tok_per_s_whole_run"] = res["tok_per_s"]
            res["tok_per_s"] = res["window_tokens"] / res["window_seconds"]
        if "cpu_s" in got:
            res["cpu_ms_per_1k_tokens"] = {r: 1e6 * v / res["tokens"] for r, v in got["cpu_s"].items()}
        if "engine_steps" in got:
            steps = res["engine_steps"] = got["engine_steps"]
            res["eager_step_share"] = steps.get("eager", 0.0) / max(1.0, sum(steps.values()))
        out[k] = res
    return out


def start_stack(model_dir: Path, args, env: dict | None = None) -> Stack:
    """`inflight serve` on the model, with its metrics on (as by default). OTEL_* variables
    reach it only through `env`."""
    return Stack(env={"INFLIGHT_KV_CACHE_MAX_TOKENS": str(args.kv_tokens), **(env or {})}, model=model_dir, device=args.device,
                 host="127.0.0.1", tokens_per_block=None, timeout=300)


def stop_stack(stack: Stack) -> None:
    stack.stop(60)
    print("".join(stack.log)[-2000:])


def tracing_cost(args, model_dir: Path) -> None:
    """--tracing: two stacks on the same GPU, tracing on (exporting to a receiver started
    here) and off, the same requests through each, alternating which goes first. Each
    round has prompts of its own, so no round finds the last one's in the prefix cache,
    and the first --warm-rounds are not counted (new batch shapes compile in them)."""
    vocab = SHAPES[args.shape]["vocab_size"]
    lengths = tuple(args.lengths)
    receiver, endpoint = start_trace_receiver()
    got = {c: [] for c in args.concurrency}
    plan = None
    if args.pin:  # each worker and gateway on cores of its own, the load generators too
        plan = cpu_plan(2, 2 if args.together else 1, {"worker": 2, "gateway": 1})
    stacks = {}

    def target(key: str, r: int) -> Target:
        stack = stacks[key]
        i = list(stacks).index(key)
        if plan:  # the stacks swap cores every round, so neither keeps the better ones
            pin_stack(stack.proc.pid, plan["stacks"][(i + r) % 2], plan["rest"])
        return Target(stack.target, stack, load_cpus=plan and [plan["load"][i % len(plan["load"])]], engine_steps=True)

    def served(keys, reqs, c: int, r: int = 0) -> dict:
        if args.together:
            return run_served({k: target(k, r) for k in keys}, reqs, c, model_dir.name)
        return {k: run_served({k: target(k, r)}, reqs, c, model_dir.name)[k] for k in keys}

    try:
        # --control: an A/A run, both stacks untraced, to show how far two identical stacks
        # differ in this run (placement, GPU context, noise): the floor under the A/B ratio.
        stacks["off"] = start_stack(model_dir, args)
        stacks["on"] = start_stack(model_dir, args, None if args.control else otlp_env(endpoint))
        served(stacks, workload(8, vocab, seed=99, lengths=lengths), 8)  # warm-up
        for r in range(args.warm_rounds + args.rounds):
            for c in args.concurrency:
                reqs = workload(max(args.min_requests, 2 * c), vocab, seed=1000 * r + c, lengths=lengths)
                # which stack goes first alternates every other round, the cores every round
                order = ("off", "on") if r // 2 % 2 == 0 else ("on", "off")
                res = served(order, reqs, c, r)
                counted = r >= args.warm_rounds
                if counted:
                    got[c].append(res)
                    with open(args.out, "w") as f:  # so far, in case the run is cut short
                        json.dump({"partial": True, "rounds_by_concurrency": got}, f)
                print(f"round {r}{'' if counted else ' (warm-up)'} {c:>4} streams: " + ", ".join(
                    f"{k} {res[k]['tok_per_s']:.0f} tok/s ITL p50 {res[k]['itl_p50_ms']:.2f} ms eager steps "
                    f"{res[k]['eager_step_share']:.1%} worker CPU {res[k]['cpu_ms_per_1k_tokens']['worker']:.0f} ms/1k tok" for k in order),
                    flush=True)
    finally:
        for stack in stacks.values():
            stop_stack(stack)
        receiver.terminate()
    what = "A/A control: both stacks untraced, \"on\" is the second" if args.control else "tracing on / off"
    how = "both at once, counted until the first finished" if args.together else "one after the other"
    print(f"\n{what} through the served stack, {args.shape} (random weights), {how}, {args.rounds} rounds after "
          f"{args.warm_rounds} not counted{', cores swapped every round' if plan else ''}")
    print(f"{'streams':>7} {'off tok/s':>10} {'on tok/s':>10} {'on/off median':>13} {'range':>13} {'paired TTFT +ms':>15} "
          f"{'paired e2e +ms':>14} {'ITL p50 off/on ms':>17} {'worker CPU/tok':>14} {'gateway CPU/tok':>15} {'eager steps off/on':>18}")
    rows = []
    med = statistics.median
    for c, rounds in got.items():
        ratios = sorted(x["on"]["tok_per_s"] / x["off"]["tok_per_s"] for x in rounds)
        ttft = med(paired_ms(x["on"], x["off"]) for x in rounds)
        e2e = med(paired_ms(x["on"], x["off"], "e2e_ms_by_request") for x in rounds)
        # CPU per token of one process, on over off (the export children not counted)
        cpu = {role: med(x["on"]["cpu_ms_per_1k_tokens"][role] / x["off"]["cpu_ms_per_1k_tokens"][role] for x in rounds)
               for role in ("worker", "gateway")}
        itl = (med(x["off"]["itl_p50_ms"] for x in rounds), med(x["on"]["itl_p50_ms"] for x in rounds))
        # the share of forward passes run eagerly (with prompt tokens), each slower than a
        # graph replay: whether the two stacks did the same work, or one mixed in more prefill
        eager = (med(x["off"]["eager_step_share"] for x in rounds), med(x["on"]["eager_step_share"] for x in rounds))
        rows.append({"concurrency": c, "ratio": med(ratios), "ratios": ratios, "added_ttft_paired_median_ms": ttft,
                     "added_e2e_paired_median_ms": e2e, "itl_p50_ms_off_on": itl, "cpu_per_token_ratio": cpu,
                     "eager_step_share_off_on": eager, "rounds": rounds})
        print(f"{c:>7} {med(x['off']['tok_per_s'] for x in rounds):>10.0f} {med(x['on']['tok_per_s'] for x in rounds):>10.0f} "
              f"{med(ratios):>13.3f} {ratios[0]:.3f}-{ratios[-1]:.3f} {ttft:>15.2f} {e2e:>14.2f} {itl[0]:>8.2f}/{itl[1]:<8.2f} "
              f"{cpu['worker']:>14.3f} {cpu['gateway']:>15.3f} {eager[0]:>9.1%}/{eager[1]:<8.1%}")
    with open(args.out, "w") as f:
        json.dump({"shape": args.shape, "lengths": lengths, "tracing": not args.control, "control": args.control, "pinned": bool(plan),
                   "together": args.together, "rows": rows}, f, indent=2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="smollm2-135m", choices=sorted(SHAPES))
    ap.add_argument("--tokenizer", type=Path, required=True)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64, 256])
    ap.add_argument("--kv-tokens", type=int, default=400_000, help="KV cache size in tokens, the same on both sides")
    ap.add_argument("--lengths", type=int, nargs=4, default=list(LENGTHS), metavar=("PMIN", "PMAX", "OMIN", "OMAX"))
    ap.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke run with short --lengths")
    ap.add_argument("--min-requests", type=int, default=16, help="requests per point: this many, or 2 per stream if more")
    ap.add_argument("--tracing", action="store_true",
                    help="instead of the engine direct, compare the stack with tracing on (exporting to a local OTLP receiver) against tracing off")
    ap.add_argument("--rounds", type=int, default=3, help="with --tracing: points per concurrency, alternating which stack goes first")
    ap.add_argument("--warm-rounds", type=int, default=1, help="with --tracing: rounds run first and not counted")
    ap.add_argument("--pin", action="store_true",
                    help="with --tracing: each stack's worker (2 cores) and gateway (1), and the load generator, on cores of their own; "
                         "the stacks swap cores every round")
    ap.add_argument("--control", action="store_true",
                    help="with --tracing: an A/A run instead, both stacks untraced, to show what two identical stacks differ by")
    ap.add_argument("--together", action="store_true",
                    help="with --tracing: load both stacks at the same time (sharing the GPU), counting tokens until the first "
                         "finishes, so a host whose speed drifts slows both alike (two stacks need not share one GPU evenly: "
                         "run --control too); one after the other otherwise")
    ap.add_argument("--out", default="serving_gpu.json")
    args = ap.parse_args()
    lengths = tuple(args.lengths)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout` still stops the stacks (finally)

    import torch

    from worker.embedded.engine import EmbeddedEngine
    from worker.engine_api import EngineConfig, KvCacheConfig

    model_dir = make_model_dir(args.shape, args.tokenizer)
    vocab = SHAPES[args.shape]["vocab_size"]
    if args.tracing:
        tracing_cost(args, model_dir)
        shutil.rmtree(model_dir.parent, ignore_errors=True)
        return
    loads = {c: workload(max(args.min_requests, 2 * c), vocab, seed=c, lengths=lengths) for c in args.concurrency}

    engine = EmbeddedEngine(EngineConfig(model=str(model_dir), device=args.device, kv_cache=KvCacheConfig(max_tokens=args.kv_tokens)))
    run_direct(engine, workload(8, vocab, seed=99, lengths=lengths), 8)  # warm-up
    direct = {c: run_direct(engine, loads[c], c) for c in args.concurrency}
    del engine
    if args.device == "cuda":
        torch.cuda.empty_cache()

    stack = start_stack(model_dir, args)
    served = {}
    try:
        target = {"": Target(stack.target)}
        run_served(target, workload(8, vocab, seed=99, lengths=lengths), 8, model_dir.name)  # warm-up
        for c in args.concurrency:
            served[c] = run_served(target, loads[c], c, model_dir.name)[""]
    finally:
        stop_stack(stack)

    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"\nserving path vs engine direct, {args.shape} (random weights), {device}")
    print(f"{'streams':>7} {'direct tok/s':>12} {'served tok/s':>12} {'ratio':>6} {'TTFT p50 d/s ms':>16} {'+ms':>6} {'paired +ms':>10} "
          f"{'ITL p50 d/s ms':>15} {'e2e p50/p90/p99 served ms':>26}")
    rows = []
    for c in args.concurrency:
        d, s = direct[c], served[c]
        paired = paired_ms(s, d)
        rows.append({"concurrency": c, "direct": d, "served": s, "ratio": s["tok_per_s"] / d["tok_per_s"],
                     "added_ttft_p50_ms": s["ttft_p50_ms"] - d["ttft_p50_ms"], "added_ttft_paired_median_ms": paired})
        print(f"{c:>7} {d['tok_per_s']:>12.0f} {s['tok_per_s']:>12.0f} {s['tok_per_s'] / d['tok_per_s']:>6.2f} "
              f"{d['ttft_p50_ms']:>7.1f}/{s['ttft_p50_ms']:<8.1f} {s['ttft_p50_ms'] - d['ttft_p50_ms']:>6.1f} {paired:>10.1f} "
              f"{d['itl_p50_ms']:>6.2f}/{s['itl_p50_ms']:<8.2f} {s['e2e_p50_ms']:>8.0f}/{s['e2e_p90_ms']:.0f}/{s['e2e_p99_ms']:.0f}")
    with open(args.out, "w") as f:
        json.dump({"shape": args.shape, "device": device, "lengths": lengths, "rows": rows}, f, indent=2)
    shutil.rmtree(model_dir.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
