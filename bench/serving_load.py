"""The service under load as users meet it: requests arriving open loop (a Poisson process
at each of --rates per second, every request sent at its time however many are still
open) or closed loop (--concurrency: each of C clients sends its next request when its
last one finished), through gateway, scheduler and worker (`inflight serve`), against
the same requests on the same schedule driven straight into the engine in this process
(same model, same config, same device): the ceiling the service is measured against.

Requests are random token-id prompts (lengths uniform in [128, 1024]) with outputs
uniform in [128, 512] (ignore_eos); each on a Generate stream of its own, or with
--per-stream K, K to a stream. Each point reports TTFT, ITL (every gap between two
deltas, over the tokens of the later) and end-to-end latency at p50/p90/p99, output
tokens per second, offered and achieved request rates, and goodput: the requests per
second that met both SLOs (--slo-ttft-ms, --slo-itl-ms), and their share of those sent.
Latency counts from each request's arrival time in open loop, so a stack that falls
behind shows it; "late" is how long after that time the load generator sent it (it, not
the stack, is the limit if that grows, or if a load process's CPU share nears 1.0).

With --breakdown every served request is traced, and each point prints where its time to
first token went: client to gateway, gateway, scheduler, to the worker's intake, queued in
the engine, the first steps, and back (bench/path_breakdown.py), next to the engine's own
queue and first steps when driven directly:

    python -m bench.serving_load --shape llama-3.2-1b --vocab 49152 --tokenizer .bench/tok \
        --concurrency 16 64 256 --breakdown --out closed_1b_breakdown.json

With --shape the model has random weights of a real shape, saved with a tokenizer whose
vocabulary fits (--tokenizer, a folder holding tokenizer.json and tokenizer_config.json,
such as the built-in SmolLM2's folder that `python -m models.gguf_convert` prints, the
default; its vocabulary has 49,152 tokens, hence --vocab 49152 for the Llama shapes):

    python -m bench.serving_load --shape llama-3.2-1b --vocab 49152 --tokenizer .bench/tok \\
        --rates 8 32 96 --concurrency 16 64 256 --out serving_load_1b.json
    python -m bench.serving_load --shape llama-3-8b --vocab 49152 --tokenizer .bench/tok \\
        --rates 4 12 24 --slo-ttft-ms 150 --slo-itl-ms 15 --out serving_load_8b.json
    python -m bench.serving_load --shape llama-3.2-1b --vocab 49152 --tokenizer .bench/tok \\
        --rates 32 96 --per-stream 16 --out serving_load_1b_mux.json

Without --shape it serves the built-in SmolLM2-135M-Instruct; a smoke run on the CPU:

    python -m bench.serving_load --device cpu --rates 2 4 --requests 20 --lengths 8 16 4 8 \\
        --slo-ttft-ms 1000 --slo-itl-ms 250 --out /tmp/serving_load.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from bench.load import (UNIX_OFFSET, Target, Timing, host_info, otlp_env, paired_ms, percentile, run_load, start_trace_receiver,
                        summarize)
from bench.path_breakdown import DIRECT_HOPS, direct_hops, print_breakdown, read_spans, served_breakdown, summary
from bench.shapes import SHAPES, make_model_dir
from bench.workload import LENGTHS, workload
from testing.stack import Stack

PERCENTILES = (50, 90, 99)


def poisson_arrivals(n: int, rate: float, seed: int = 0) -> list[float]:
    """n arrival times of a Poisson process of `rate` a second, in seconds from the start
    (the first at 0): exponential gaps of mean 1/rate."""
    rng = random.Random(seed)
    out, t = [], 0.0
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


def meets_slo(record: tuple, slo_ttft_ms: float, slo_itl_ms: float) -> bool:
    """A request (a run_load record) whose TTFT and mean time between tokens after its
    first are within the SLOs."""
    ttft, e2e, tokens = record[0], record[1], record[2]
    if ttft is None:
        return False
    itl = (e2e - ttft) / (tokens - 1) if tokens > 1 else 0.0
    return 1000 * ttft <= slo_ttft_ms and 1000 * itl <= slo_itl_ms


def goodput(records: list[tuple], seconds: float, sent: int, slo_ttft_ms: float, slo_itl_ms: float) -> tuple[float, float]:
    """Requests a second that met both SLOs, and their share of the `sent` (failed ones miss)."""
    good = sum(meets_slo(r, slo_ttft_ms, slo_itl_ms) for r in records)
    return good / seconds, good / sent


def drive_engine(engine, reqs, *, arrivals: list[float] | None = None, concurrency: int = 1) -> dict:
    """The requests straight into the engine, stepped in this process: each submitted at
    the first step boundary after its arrival time (as the worker's loop takes them), or
    `concurrency` at a time. Records and seconds as run_load's."""
    from inflight.sampling_params import SamplingParams

    live: dict[str, Timing] = {}
    records, hops = [], []
    t0 = time.perf_counter()
    nxt = 0

    def submit(due: float | None) -> None:
        nonlocal nxt
        prompt, n_out = reqs[nxt]
        now = time.perf_counter()
        engine.submit(str(nxt), prompt, SamplingParams(max_tokens=n_out, temperature=0, ignore_eos=True))
        live[str(nxt)] = Timing(nxt, now if due is None else due, 0.0 if due is None else now - due)
        nxt += 1

    if arrivals is None:
        for _ in range(min(concurrency, len(reqs))):
            submit(None)
    while nxt < len(reqs) or engine.has_work():
        if arrivals is not None:
            while nxt < len(reqs) and t0 + arrivals[nxt] <= time.perf_counter():
                submit(t0 + arrivals[nxt])
            if not engine.has_work():
                time.sleep(max(0.0, t0 + arrivals[nxt] - time.perf_counter()))
                continue
        outs = engine.step()
        now = time.perf_counter()
        for o in outs:
            if o.error_code:
                raise RuntimeError(f"request {o.request_id}: {o.error_code} {o.error_message}")
            timing = live[o.request_id]
            if timing.first is None and o.new_token_ids and o.scheduled_at is not None:
                hops.append(direct_hops(timing.t + UNIX_OFFSET, timing.t + timing.late + UNIX_OFFSET, o.scheduled_at,
                                        now + UNIX_OFFSET))
            timing.add(len(o.new_token_ids), now)
            if o.finished:
                records.append(live.pop(o.request_id).record(now))
                if arrivals is None and nxt < len(reqs):
                    submit(None)
    return {"records": records, "seconds": time.perf_counter() - t0, "errors": {}, "hops": hops}


def point_summary(got: dict, point: dict, args) -> dict:
    """One side of a point: summarize's latencies (ITL by delta gaps), rates and goodput."""
    records, seconds, sent = got["records"], got["seconds"], len(point["requests"])
    res = summarize(records, seconds, gaps=True)
    late = sorted(r[5] for r in records)
    res["late_p99_ms"] = percentile(late, 99) if late else None
    res["achieved_rps"] = len(records) / seconds
    res["goodput_rps"], res["goodput_share"] = goodput(records, seconds, sent, args.slo_ttft_ms, args.slo_itl_ms)
    res["errors"] = got["errors"]
    for k in ("load_util", "cpu_s"):
        if k in got:
            res[k] = got[k]
    return res


def traced_breakdown(records: list[tuple], spans_file: Path, trace: int, wait: float = 20.0) -> dict:
    """served_breakdown once the point's spans have come in (every process exports on its
    own schedule): every served request's, or what came in `wait` seconds."""
    want = sum(r[0] is not None for r in records)
    deadline = time.monotonic() + wait
    while True:
        got = served_breakdown(records, read_spans(spans_file), trace)
        if got["traced"] == want or time.monotonic() > deadline:
            return got
        time.sleep(0.2)


def make_points(args, vocab: int) -> list[dict]:
    """The run's points, each with its own seeded requests (no point finds another's
    prompts in the prefix cache) and, open loop, arrival times."""
    lengths = tuple(args.lengths)
    points = []
    for i, rate in enumerate(args.rates):
        n = args.requests or max(20, round(rate * args.seconds))
        arrivals = poisson_arrivals(n, rate, seed=i)
        reqs = workload(n, vocab, seed=1000 + i, lengths=lengths)
        offered = (n - 1) / arrivals[-1] if n > 1 else rate  # the schedule's own rate, near `rate`
        points.append({"name": f"rate {rate:g}/s", "rate": rate, "arrivals": arrivals, "requests": reqs,
                       "offered_rps": offered, "offered_tok_per_s": offered * sum(o for _, o in reqs) / n})
    for i, c in enumerate(args.concurrency):
        n = args.requests or max(32, 4 * c)
        points.append({"name": f"{c} in flight", "concurrency": c, "arrivals": None,
                       "requests": workload(n, vocab, seed=2000 + i, lengths=lengths)})
    return points


def ms(x: float | None, sign: bool = False) -> str:
    if x is None:
        return "-"
    digits = 0 if abs(x) >= 100 else 1 if abs(x) >= 10 else 2
    return f"{x:{'+' if sign else ''}.{digits}f}"


def pct(res: dict, name: str) -> str:
    return "/".join(ms(res[f"{name}_p{p}_ms"]) for p in PERCENTILES)


def print_table(rows: list[dict], title: str) -> None:
    cols = [("point", 13), ("side", 7), ("req/s sent", 10), ("req/s done", 10), ("tok/s offered", 13), ("tok/s out", 10),
            ("TTFT ms p50/90/99", 20), ("ITL ms p50/90/99", 20), ("e2e ms p50/90/99", 20), ("goodput/s", 9),
            ("share", 6), ("late p99", 8), ("errors", 6)]
    print(f"\n{title}")
    print(" ".join(f"{name:>{w}}" for name, w in cols))

    def line(*cells) -> None:
        print(" ".join(f"{c:>{w}}" for c, (_, w) in zip(cells, cols)))

    for row in rows:
        for side in ("direct", "served"):
            r = row[side]
            line(row["point"] if side == "direct" else "", side, f"{row['offered_rps']:.1f}" if row.get("offered_rps") else "-",
                 f"{r['achieved_rps']:.1f}", f"{row['offered_tok_per_s']:.0f}" if row.get("offered_tok_per_s") else "-",
                 f"{r['tok_per_s']:.0f}", pct(r, "ttft"), pct(r, "itl"), pct(r, "e2e"), f"{r['goodput_rps']:.1f}",
                 f"{r['goodput_share']:.0%}", ms(r["late_p99_ms"]), sum(r["errors"].values()))
        v = row["vs_direct"]

        def added(name: str) -> str:
            return "/".join(ms(v[f"{name}_p{p}_added_ms"], sign=True) for p in PERCENTILES)

        good = "-" if v["goodput_rps"] is None else f"x{v['goodput_rps']:.2f}"
        line("", "s/d", "", f"x{v['achieved_rps']:.2f}", "", f"x{v['tok_per_s']:.2f}", added("ttft"), added("itl"), added("e2e"), good)
    print("s/d: served over direct (x: ratio; +/-: served minus direct, ms); share: of the requests sent, those that met both SLOs")


def compare(served: dict, direct: dict) -> dict:
    out = {k: served[k] / direct[k] if direct[k] else None for k in ("achieved_rps", "tok_per_s", "goodput_rps")}
    for name in ("ttft", "itl", "e2e"):
        for p in PERCENTILES:
            a, b = served[f"{name}_p{p}_ms"], direct[f"{name}_p{p}_ms"]
            out[f"{name}_p{p}_added_ms"] = None if a is None or b is None else a - b
    out["ttft_added_paired_median_ms"] = paired_ms(served, direct) if served["requests"] and direct["requests"] else None
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", type=float, nargs="+",
                    help="open-loop points: Poisson arrivals at each of these requests per second (default: 8 32 96, "
                         "none if only --concurrency is given)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[],
                    help="closed-loop points: this many clients, each sending its next request when its last one finished")
    ap.add_argument("--per-stream", type=int, default=1, metavar="K",
                    help="requests that share one Generate stream: open loop, each K consecutive arrivals; closed loop, "
                         "streams that each keep K requests open (1: every request opens a stream of its own)")
    ap.add_argument("--requests", type=int, default=0,
                    help="requests per point; 0 means rate x --seconds (at least 20) open loop, 4 per client (at least 32) closed loop")
    ap.add_argument("--seconds", type=float, default=30.0, help="open loop, with --requests 0: how long each point's arrivals last")
    ap.add_argument("--lengths", type=int, nargs=4, default=list(LENGTHS), metavar=("PMIN", "PMAX", "OMIN", "OMAX"),
                    help="prompt and output tokens, each uniform in [min, max] (short ones for a CPU smoke run)")
    ap.add_argument("--slo-ttft-ms", type=float, default=300.0, help="goodput counts requests whose time to first token is at most this")
    ap.add_argument("--slo-itl-ms", type=float, default=10.0,
                    help="... and whose mean time between tokens after the first is at most this")
    ap.add_argument("--shape", choices=sorted(SHAPES), help="random weights of this model shape; unset: the built-in SmolLM2-135M-Instruct")
    ap.add_argument("--vocab", type=int, help="with --shape: the vocabulary size instead of the shape's, to fit --tokenizer")
    ap.add_argument("--tokenizer", type=Path,
                    help="with --shape: a folder holding tokenizer.json and tokenizer_config.json (default: the built-in SmolLM2's)")
    ap.add_argument("--device", default="auto", help="auto (cuda where there is one), cuda or cpu; the stack and the direct engine alike")
    ap.add_argument("--kv-tokens", type=int, default=400_000, help="KV cache size in tokens, the same on both sides")
    ap.add_argument("--max-num-tokens", type=int, default=None,
                    help="the engine's step budget in tokens, the same on both sides (default: the engine's)")
    ap.add_argument("--step-time-target-ms", type=float, default=None,
                    help="the engine's step_time_target_ms, the same on both sides (default: the engine's; 0: off)")
    ap.add_argument("--quantization", default="none", choices=["none", "fp8", "int8-weight-only", "int8-smoothquant"],
                    help="the engine's projection weights, the same on both sides")
    ap.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"], help="what the KV cache stores, both sides")
    ap.add_argument("--step-time-learning", default="on", choices=["on", "off"],
                    help="the engine's step_time_learning, both sides (off: steps sized from the start-up timings alone)")
    ap.add_argument("--step-time-margin", default="on", choices=["on", "off"],
                    help="the engine's step_time_margin, both sides (off: steps sized to the target itself, not less the margin)")
    ap.add_argument("--direct-only", action="store_true",
                    help="drive the engine alone, no stack: for comparing engine settings at half the time")
    ap.add_argument("--warmup", type=int, default=0,
                    help="requests run through each side before the points, not counted (0: the first point meets a fresh stack)")
    ap.add_argument("--load-procs", type=int, default=max(1, min(4, (os.cpu_count() or 1) // 4)),
                    help="load-generating processes, the requests split among them (default: a quarter of the cores, 1 to 4)")
    ap.add_argument("--serve-flags", default="",
                    help="more flags for `inflight serve`, ones that leave the engine as the direct side's (e.g. \"--gateways 4\")")
    ap.add_argument("--breakdown", action="store_true",
                    help="trace every served request (the stack exports spans to a receiver here) and print where each "
                         "point's time to first token went, hop by hop (bench/path_breakdown.py), beside the engine's "
                         "own queue and first steps when driven directly; needs --per-stream 1. Tracing costs the "
                         "serving processes a little CPU (BENCHMARKS.md, tracing cost)")
    ap.add_argument("--streams-per-connection", type=int, nargs="+", default=[32], metavar="N",
                    help="each load process opens a connection of its own for every N of its streams (open loop: of "
                         "the streams expected open at once); several values serve every point once for each, "
                         "against one stack")
    ap.add_argument("--out", default="serving_load.json", help="the JSON results: arguments, and every point's both sides in full")
    args = ap.parse_args()
    if args.breakdown and args.per_stream != 1:
        ap.error("--breakdown needs --per-stream 1: a request's trace is its stream's")
    if args.rates is None:
        args.rates = [] if args.concurrency else [8.0, 32.0, 96.0]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout` still stops the stack (finally)
    # As in the worker (worker/main.py): OpenMP threads that spin while they wait make a CPU
    # engine many times slower on a busy machine; read once, when torch loads libgomp.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    import torch

    from inflight.process import settle_gc
    from worker.embedded.engine import EmbeddedEngine
    from inflight.flags import config_from_args
    from worker.engine_api import EngineConfig

    model_dir = None
    if args.shape:
        from models.gguf_convert import default_model_dir

        model_dir = make_model_dir(args.shape, args.tokenizer or default_model_dir(), args.vocab)
    try:
        # INFLIGHT_* variables first, as the served stack reads them: both sides run one engine
        config = config_from_args(EngineConfig, argparse.Namespace())
        config.model, config.device = str(model_dir) if model_dir else None, args.device
        config.kv_cache.max_tokens, config.kv_cache.dtype = args.kv_tokens, args.kv_cache_dtype
        config.max_num_tokens, config.quantization = args.max_num_tokens, args.quantization
        if args.step_time_target_ms is not None:
            config.step_time_target_ms = args.step_time_target_ms
        config.step_time_learning = args.step_time_learning == "on"
        config.step_time_margin = args.step_time_margin == "on"
        engine = EmbeddedEngine(config)
        settle_gc()  # as the worker does once its model is loaded
        cuda = engine.device.type == "cuda"
        device = torch.cuda.get_device_name(engine.device) if cuda else "cpu"
        model = engine.model_config.name
        runner = engine.runner
        step_times = {"mixed_sizes": runner.mixed_sizes, "mixed_ms": runner.mixed_ms,
                      "context_us_per_token": runner.context_ms_per_token * 1000,
                      "step_time_target_ms": engine.config.step_time_target_ms}
        print(f"step times at start-up: {step_times}", flush=True)
        points = make_points(args, engine.vocab_size)
        warmup = workload(args.warmup, engine.vocab_size, seed=99, lengths=tuple(args.lengths))
        if warmup:
            drive_engine(engine, warmup, concurrency=len(warmup))
        direct = []
        for p in points:
            got = drive_engine(engine, p["requests"], arrivals=p["arrivals"], concurrency=p.get("concurrency", 1))
            direct.append(point_summary(got, p, args))
            if args.breakdown:
                direct[-1]["breakdown"] = summary(got["hops"], DIRECT_HOPS, len(got["records"]))
            if runner.step_model is not None:  # where the step-time fit stood after the point
                a, b, e = runner.step_model.coef.tolist()
                direct[-1]["step_time_fit"] = {"a": a, "context_us_per_token": b * 1000, "prompt_ns_per_pair": e * 1e6,
                                               "steps": runner.step_model.steps,
                                               "residual_ms": runner.step_model.residuals(engine.config.step_time_target_ms)}
            print(f"direct {p['name']}: {direct[-1]['tok_per_s']:.0f} tok/s; step-time fit {direct[-1].get('step_time_fit')}",
                  flush=True)
        del engine
        if cuda:
            torch.cuda.empty_cache()

        if args.direct_only:
            return finish(args, points, direct, None, step_times, device, model)
        env = {"INFLIGHT_KV_CACHE_MAX_TOKENS": str(args.kv_tokens), "INFLIGHT_QUANTIZATION": args.quantization,
               "INFLIGHT_KV_CACHE_DTYPE": args.kv_cache_dtype, "INFLIGHT_STEP_TIME_LEARNING": "true" if args.step_time_learning == "on" else "false",
               "INFLIGHT_STEP_TIME_MARGIN": "true" if args.step_time_margin == "on" else "false"}
        if args.max_num_tokens:
            env["INFLIGHT_MAX_NUM_TOKENS"] = str(args.max_num_tokens)
        if args.step_time_target_ms is not None:
            env["INFLIGHT_STEP_TIME_TARGET_MS"] = str(args.step_time_target_ms)
        spans_file = receiver = None
        if args.breakdown:
            spans_file = Path(tempfile.mkdtemp(prefix="inflight-spans-")) / "spans.jsonl"
            receiver, endpoint = start_trace_receiver(str(spans_file))
            env |= otlp_env(endpoint) | {"OTEL_BSP_SCHEDULE_DELAY": "200"}  # spans out soon after each point
        stack = Stack(env=env, extra=shlex.split(args.serve_flags),
                      model=model_dir, device=args.device, host="127.0.0.1", tokens_per_block=None, timeout=900)
        served = {}  # streams a connection -> each point's summary
        try:
            name = model_dir.name if model_dir else ""
            for k, per_connection in enumerate(dict.fromkeys(args.streams_per_connection)):  # each value once
                target = {"": Target(stack.target, stack, processes=args.load_procs, streams_per_connection=per_connection)}
                if warmup and k == 0:
                    run_load(target, len(warmup), requests=warmup, model=name)
                served[per_connection] = []
                for i, p in enumerate(points):
                    # open loop: the streams expected open at once set the connections
                    trace = k * len(points) + i + 1 if args.breakdown else 0
                    got = run_load(target, p.get("concurrency", 128 * args.load_procs), requests=p["requests"], model=name,
                                   arrivals=p["arrivals"], per_stream=args.per_stream, trace=trace)[""]
                    served[per_connection].append(point_summary(got, p, args))
                    if args.breakdown:
                        served[per_connection][-1]["breakdown"] = traced_breakdown(got["records"], spans_file, trace)
                    print(f"served {p['name']}, {per_connection} streams a connection: "
                          f"{served[per_connection][-1]['tok_per_s']:.0f} tok/s", flush=True)
        except BaseException:
            print("".join(stack.log)[-3000:])
            raise
        finally:
            stack.stop(60)
            if receiver is not None:
                receiver.terminate()
                shutil.rmtree(spans_file.parent, ignore_errors=True)
    finally:
        if model_dir:
            shutil.rmtree(model_dir.parent, ignore_errors=True)
    finish(args, points, direct, served, step_times, device, model)


def finish(args, points: list[dict], direct: list[dict], served: dict[int, list[dict]] | None, step_times: dict,
           device: str, model: str) -> None:
    """Print the table (direct only where nothing was served) and write the JSON."""
    if served is None:
        print(f"\nengine direct only: {args.shape or model}, {device}; step_time_learning {args.step_time_learning}")
        print(f"{'point':>14} {'tok/s':>8} {'TTFT ms p50/90/99':>22} {'ITL ms p50/90/99':>22} {'goodput share':>14}")
        for p, d in zip(points, direct):
            print(f"{p['name']:>14} {d['tok_per_s']:8.0f} {pct(d, 'ttft'):>22} {pct(d, 'itl'):>22} {d['goodput_share']:14.1%}")
    rows = []
    for per_connection, sides in (served or {None: [None] * len(direct)}).items():
        for p, d, s in zip(points, direct, sides):
            rows.append({"point": p["name"], "rate": p.get("rate"), "concurrency": p.get("concurrency"),
                         "requests": len(p["requests"]), "offered_rps": p.get("offered_rps"),
                         "offered_tok_per_s": p.get("offered_tok_per_s"), "streams_per_connection": per_connection,
                         "direct": d, "served": s, "vs_direct": compare(s, d) if s else None})
    streams = "a stream per request" if args.per_stream == 1 else f"{args.per_stream} requests per stream"
    for per_connection in served or ():
        print_table([r for r in rows if r["streams_per_connection"] == per_connection],
                    f"served (inflight serve) vs engine direct: {args.shape or model} "
                    f"({'random weights' if args.shape else 'real weights'}), {device}, {streams}, "
                    f"a connection per {per_connection} streams of a load process; "
                    f"SLO TTFT <= {args.slo_ttft_ms:g} ms, mean ITL <= {args.slo_itl_ms:g} ms")
    for row in rows:
        if row["served"] and "breakdown" in row["served"]:
            print_breakdown(f"time to first token, hop by hop: {row['point']}, a connection per "
                            f"{row['streams_per_connection']} streams", row["served"]["breakdown"],
                            row["direct"].get("breakdown"))
    host = host_info()
    print(f"host: {host['cpu']}, {host['cpus']} CPUs, load average {' / '.join(map(str, host['loadavg']))} (1 / 5 / 15 min) at the end")
    with open(args.out, "w") as f:
        json.dump({"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "model": model,
                   "device": device, "host": host, "step_times": step_times, "rows": rows}, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
