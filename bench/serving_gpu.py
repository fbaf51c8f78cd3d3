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

    python bench/serving_gpu.py --shape smollm2-135m --tokenizer .bench/tok --out serving_gpu.json

With --tracing it compares two stacks instead, tracing on (exporting to an OTLP receiver
started here) and off, the same requests through each, in rounds; --control makes it an
A/A run (both untraced) that shows what two identical stacks differ by on this machine,
--together loads both at once, and --pin gives each stack's worker and gateway cores of
their own. Each point also reports every stack process's CPU per 1,000 tokens and the
worker's share of eager forward passes (from its /metrics).

    python bench/serving_gpu.py --tracing --pin --warm-rounds 1 --rounds 5 --min-requests 256 --tokenizer .bench/tok --concurrency 16 64 256
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import multiprocessing as mp
import os
import random
import statistics
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.shapes import SHAPES  # noqa: E402
from testing.stack import free_port, free_port_range  # noqa: E402

ctx = mp.get_context("spawn")  # grpc does not survive fork


def make_model_dir(shape: str, tokenizer: Path) -> Path:
    import torch
    from safetensors.torch import save_file

    cfg = {"architectures": ["LlamaForCausalLM"], "torch_dtype": "bfloat16", **SHAPES[shape]}
    d = Path(tempfile.mkdtemp(prefix="inflight-bench-")) / shape
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer / name, d / name)
    g = torch.Generator().manual_seed(0)
    h, i, kv = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_key_value_heads"] * cfg["head_dim"]
    q = cfg["num_attention_heads"] * cfg["head_dim"]
    rnd = lambda *s: (torch.randn(*s, generator=g) * 0.02).to(torch.bfloat16)  # noqa: E731
    t = {"model.embed_tokens.weight": rnd(cfg["vocab_size"], h), "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)}
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        t |= {p + "self_attn.q_proj.weight": rnd(q, h), p + "self_attn.k_proj.weight": rnd(kv, h),
              p + "self_attn.v_proj.weight": rnd(kv, h), p + "self_attn.o_proj.weight": rnd(h, q),
              p + "mlp.gate_proj.weight": rnd(i, h), p + "mlp.up_proj.weight": rnd(i, h), p + "mlp.down_proj.weight": rnd(h, i),
              p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
              p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16)}
    if not cfg["tie_word_embeddings"]:
        t["lm_head.weight"] = rnd(cfg["vocab_size"], h)
    save_file(t, str(d / "model.safetensors"))
    return d


LENGTHS = (128, 1024, 128, 512)  # prompt min, max, output min, max


def workload(n: int, vocab: int, seed: int) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    pmin, pmax, omin, omax = LENGTHS
    return [([rng.randrange(vocab) for _ in range(rng.randint(pmin, pmax))], rng.randint(omin, omax)) for _ in range(n)]


def summarize(records: list[tuple[float, float, int, int]], wall: float) -> dict:
    """records: (ttft s, e2e s, tokens, request index) per request."""
    def pct(xs, p):
        xs = sorted(xs)
        return 1000 * xs[min(len(xs) - 1, int(p / 100 * len(xs)))]

    ttft = [r[0] for r in records]
    e2e = [r[1] for r in records]
    itl = [(r[1] - r[0]) / (r[2] - 1) for r in records if r[2] > 1]
    tokens = sum(r[2] for r in records)
    out = {"requests": len(records), "tokens": tokens, "seconds": wall, "tok_per_s": tokens / wall,
           "ttft_ms_by_request": {r[3]: 1000 * r[0] for r in records}, "e2e_ms_by_request": {r[3]: 1000 * r[1] for r in records}}
    for name, xs in (("ttft", ttft), ("itl", itl), ("e2e", e2e)):
        for p in (50, 90, 99):
            out[f"{name}_p{p}_ms"] = pct(xs, p)
    return out


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


async def _load(target: str, reqs, concurrency: int, model: str, q, go, stop) -> dict:
    """`go`: an event to wait for once connected (after putting "ready" on `q`). `stop`:
    an event shared with another load run at the same time; the first to finish sets it,
    and each reports the tokens it had received by then (`window_tokens`)."""
    from inflight.client import Client

    queue = list(enumerate(reqs))
    records = []
    received = 0
    window = None
    clients = [Client(target) for _ in range(max(1, concurrency // 32))]
    for c in clients:
        await asyncio.wait_for(c.channel.channel_ready(), 60)
    q.put("ready")
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, go.wait)  # as bench/serving_path.py's load does

    async def worker(k: int):
        nonlocal received
        client = clients[k % len(clients)]
        while queue:
            i, (prompt, n) = queue.pop(0)
            t = time.perf_counter()
            ttft, tokens = None, 0
            session = client.session()
            session.start(str(i), token_ids=prompt, model=model, max_tokens=n, temperature=0.0, ignore_eos=True)
            session.close()
            async for ev in session.events():
                kind = ev.WhichOneof("kind")
                if kind == "delta" and ev.delta.token_ids:
                    ttft = ttft if ttft is not None else time.perf_counter() - t
                    tokens += len(ev.delta.token_ids)
                    received += len(ev.delta.token_ids)
                elif kind == "error":
                    raise RuntimeError(ev.error.message)
            records.append((ttft, time.perf_counter() - t, tokens, i))

    async def watch():
        nonlocal window
        await loop.run_in_executor(None, stop.wait)
        window = (received, time.perf_counter() - t0)

    t0 = time.perf_counter()
    watcher = asyncio.create_task(watch()) if stop is not None else None
    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    wall = time.perf_counter() - t0
    if watcher:
        stop.set()
        await watcher
    for c in clients:
        await c.channel.close()
    out = summarize(records, wall)
    if window:
        out["window_tokens"], out["window_seconds"] = window
    return out


def _load_process(target, reqs, concurrency, model, q, go, stop, cpus=None):
    import uvloop

    if cpus:
        os.sched_setaffinity(0, cpus)  # before gRPC starts its threads, which inherit it

    q.put(uvloop.run(_load(target, reqs, concurrency, model, q, go, stop)))


def engine_steps(metrics_port: int) -> dict[str, float]:
    """The worker's forward passes so far by mode (graph, eager), from its /metrics."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {s.labels["mode"]: s.value for f in text_string_to_metric_families(text) for s in f.samples
            if s.name == "inflight_worker_engine_steps_total"}


@dataclasses.dataclass
class Target:
    address: str
    stack_pid: int | None = None  # to account each stack process's CPU time
    load_cpus: list[int] | None = None
    worker_metrics_port: int | None = None  # to count the worker's forward passes


def run_served(target: str, reqs, concurrency: int, model: str) -> dict:
    """The requests through the stack at `target`."""
    return run_loads({"": Target(target)}, reqs, concurrency, model)[""]


def run_loads(targets: dict[str, Target], reqs, concurrency: int, model: str) -> dict[str, dict]:
    """The same requests through each target at the same time, each from a load process
    of its own; with several, `tok_per_s` counts only the window in which all ran (until
    the first finished), so both sides see the same moments of a machine whose speed
    drifts. Also each stack process's CPU time per 1,000 tokens (bench/serving_path.py's
    accounting) and the worker's forward passes by mode, where the target says how."""
    import queue

    from bench.serving_path import stack_cpu

    go, stop = ctx.Event(), (ctx.Event() if len(targets) > 1 else None)
    qs = {k: ctx.Queue() for k in targets}
    procs = {k: ctx.Process(target=_load_process, args=(t.address, reqs, concurrency, model, qs[k], go, stop, t.load_cpus))
             for k, t in targets.items()}

    def get(k: str):
        while True:
            try:
                return qs[k].get(timeout=1)
            except queue.Empty:
                if not procs[k].is_alive():
                    raise RuntimeError(f"the load generator died (exit code {procs[k].exitcode})") from None

    for p in procs.values():
        p.start()
    for k in targets:
        assert get(k) == "ready"
    cpu_before = {k: stack_cpu(t.stack_pid) for k, t in targets.items() if t.stack_pid}
    steps_before = {k: engine_steps(t.worker_metrics_port) for k, t in targets.items() if t.worker_metrics_port}
    go.set()
    out = {k: get(k) for k in targets}
    for p in procs.values():
        p.join()
    if steps_before:
        time.sleep(0.7)  # engine totals reach /metrics at the worker's next heartbeat (0.5 s)
    for k, t in targets.items():
        res = out[k]
        if stop is not None:
            res["tok_per_s_whole_run"] = res["tok_per_s"]
            res["tok_per_s"] = res["window_tokens"] / res["window_seconds"]
        if t.stack_pid:
            before = cpu_before[k]
            res["cpu_ms_per_1k_tokens"] = {r: 1e6 * (v - before.get(r, 0.0)) / res["tokens"] for r, v in stack_cpu(t.stack_pid).items()}
        if t.worker_metrics_port:
            steps = {m: v - steps_before[k].get(m, 0.0) for m, v in engine_steps(t.worker_metrics_port).items()}
            res["engine_steps"] = steps
            res["eager_step_share"] = steps.get("eager", 0.0) / max(1.0, sum(steps.values()))
    return out


def start_stack(model_dir: Path, args, extra_env: dict | None = None) -> tuple[subprocess.Popen, int, Path, int]:
    """`inflight serve` on the model, with its metrics on (as by default); returns it with
    its port, log file and worker's metrics port once it serves. OTEL_* variables reach it
    only through `extra_env`."""
    port, metrics_base = free_port(), free_port_range(3)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env |= {"INFLIGHT_KV_CACHE_MAX_TOKENS": str(args.kv_tokens), "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            **(extra_env or {})}
    # The stack logs to a file: a pipe nobody drains would fill and stall the processes.
    log_path = model_dir.parent / f"stack-{port}.log"
    with open(log_path, "w") as log_file:
        stack = subprocess.Popen([sys.executable, "-m", "cli", "--log-level", "WARNING", "serve", "--model", str(model_dir),
                                  "--device", args.device, "--listen", f"127.0.0.1:{port}", "--metrics-port", str(metrics_base),
                                  "--gateway-address", f"tcp://127.0.0.1:{free_port()}", "--worker-address", f"tcp://127.0.0.1:{free_port()}"],
                                 env=env, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while "serving on" not in log_path.read_text():
        if stack.poll() is not None or time.monotonic() > deadline:
            stack.kill()
            sys.exit("the stack did not start:\n" + log_path.read_text()[-3000:])
        time.sleep(0.5)
    return stack, port, log_path, metrics_base + 2  # the worker's: gateway, scheduler, then workers


def stop_stack(stack: subprocess.Popen, log_path: Path) -> None:
    stack.terminate()
    stack.wait(60)
    print(log_path.read_text()[-2000:])


def paired_ms(a: dict, b: dict, key: str = "ttft_ms_by_request") -> float:
    """Median over requests of a's time minus b's for the same request: steadier than the
    difference of two medians, when both sides ran the same requests."""
    return statistics.median(a[key][i] - t for i, t in b[key].items())


def tracing_cost(args, model_dir: Path) -> None:
    """--tracing: two stacks on the same GPU, tracing on (exporting to a receiver started
    here) and off, the same requests through each, alternating which goes first. Each
    round has prompts of its own, so no round finds the last one's in the prefix cache,
    and the first --warm-rounds are not counted (new batch shapes compile in them)."""
    from bench.serving_path import cpu_plan, pin_stack, run_receiver

    vocab = SHAPES[args.shape]["vocab_size"]
    receiver_port = free_port()
    receiver = ctx.Process(target=run_receiver, args=(receiver_port,), daemon=True)
    receiver.start()
    otel = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver_port}", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
            "OTEL_EXPORTER_OTLP_INSECURE": "true"}
    # --control: an A/A run, both stacks untraced, to show how far two identical stacks
    # differ in this run (placement, GPU context, noise): the floor under the A/B ratio.
    stacks = {"off": start_stack(model_dir, args), "on": start_stack(model_dir, args, None if args.control else otel)}
    got = {c: [] for c in args.concurrency}
    plan = None
    if args.pin:  # each worker and gateway on cores of its own, the load generators too
        plan = cpu_plan(2, 2 if args.together else 1, {"worker": 2, "gateway": 1})

    def target(key: str, r: int) -> Target:
        stack, port, _, worker_metrics = stacks[key]
        i = list(stacks).index(key)
        if plan:  # the stacks swap cores every round, so neither keeps the better ones
            pin_stack(stack.pid, plan["stacks"][(i + r) % 2], plan["rest"])
        return Target(f"127.0.0.1:{port}", stack.pid, plan and [plan["load"][i % len(plan["load"])]], worker_metrics)

    def served(keys, reqs, c: int, r: int = 0) -> dict:
        if args.together:
            return run_loads({k: target(k, r) for k in keys}, reqs, c, model_dir.name)
        return {k: run_loads({k: target(k, r)}, reqs, c, model_dir.name)[k] for k in keys}

    try:
        served(stacks, workload(8, vocab, seed=99), 8)  # warm-up
        for r in range(args.warm_rounds + args.rounds):
            for c in args.concurrency:
                reqs = workload(max(args.min_requests, 2 * c), vocab, seed=1000 * r + c)
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
        for stack, _, log_path, _ in stacks.values():
            stop_stack(stack, log_path)
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
        json.dump({"shape": args.shape, "lengths": LENGTHS, "tracing": not args.control, "control": args.control, "pinned": bool(plan),
                   "together": args.together, "rows": rows}, f, indent=2)


def main() -> None:
    global LENGTHS
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
    LENGTHS = tuple(args.lengths)
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
    loads = {c: workload(max(args.min_requests, 2 * c), vocab, seed=c) for c in args.concurrency}

    engine = EmbeddedEngine(EngineConfig(model=str(model_dir), device=args.device, kv_cache=KvCacheConfig(max_tokens=args.kv_tokens)))
    run_direct(engine, workload(8, vocab, seed=99), 8)  # warm-up
    direct = {c: run_direct(engine, loads[c], c) for c in args.concurrency}
    del engine
    if args.device == "cuda":
        torch.cuda.empty_cache()

    stack, port, log_path, _ = start_stack(model_dir, args)
    served = {}
    try:
        run_served(f"127.0.0.1:{port}", workload(8, vocab, seed=99), 8, model_dir.name)  # warm-up
        for c in args.concurrency:
            served[c] = run_served(f"127.0.0.1:{port}", loads[c], c, model_dir.name)
    finally:
        stop_stack(stack, log_path)

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
        json.dump({"shape": args.shape, "device": device, "lengths": LENGTHS, "rows": rows}, f, indent=2)
    shutil.rmtree(model_dir.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
