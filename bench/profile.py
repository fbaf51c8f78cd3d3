"""Profiles of the embedded engine on a GPU, random weights of a real shape; one mode a run:

decode   kernel-level (torch.profiler) profile of steady decode steps at a given batch
         size, without CUDA graphs so every kernel shows: where a decode step's device
         time goes. With --graphs, the steps replay their CUDA graphs as the engine
         serves them, and each kernel is charged the part of the step's timeline that it
         alone holds (its end minus the later of its start and the previous kernel's end):
         with PDL kernels overlap, and their own durations would count the overlap twice.
offline  host-side (cProfile) profile of the offline workload through the engine: where
         the Python time of the steps goes. Prints the top functions and step counts.
step     GPU-side (torch.profiler) profile of one mixed prefill+decode step and of one
         decode-only step of the offline workload: the kernels that take the time.
window   GPU-side profile of a window of steps in the middle of an offline run at fixed
         lengths (trtllm-bench's conditions: every request at once), CUDA graphs as the
         engine runs them: how much of the window the kernels hold and how much the device
         sat idle between steps, the steps' make-up (decodes, their context, prompt tokens),
         and the kernels charged as in `decode --graphs`. With four --lengths (prompt and
         output ranges, as bench.serving_load's), --max-batch-size near what a serving load
         keeps running and the step-time target on, every step mixes a prompt chunk into
         that many decodes, as steps do under a steady open-loop load.

    python -m bench.profile decode --shape llama-3.2-1b --batch 1
    python -m bench.profile decode --shape llama-3.2-1b --batch 1 --graphs --out prof_1b_graphs.json
    python -m bench.profile decode --shape llama-3-8b --batch 400 --prompt-len 1500 --quantization fp8 --kv-cache-dtype fp8
    python -m bench.profile offline --shape llama-3.2-1b --requests 192
    python -m bench.profile step --shape llama-3.2-1b
    python -m bench.profile window --shape llama-3-8b --lengths 2048 128 --requests 1000 --quantization fp8 --kv-cache-dtype fp8
    python -m bench.profile window --shape llama-3-8b --lengths 128 1024 128 512 --requests 1200 --max-batch-size 160 \
        --step-time-target-ms 15 --skip 600 --steps 30
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import json
import os
import pstats
import tempfile
import time

import torch
from torch.profiler import ProfilerActivity, profile

from bench.decode_latency import apply
from bench.shapes import SHAPES, model_config
from bench.workload import workload
from inflight.sampling_params import SamplingParams
from worker.embedded.engine import EmbeddedEngine
from worker.engine_api import EngineConfig, KernelConfig, KvCacheConfig


def submit(engine: EmbeddedEngine, reqs, prefix: str = "", max_tokens: int | None = None) -> None:
    for i, (p, n) in enumerate(reqs):
        engine.submit(f"{prefix}{i}", p, SamplingParams(max_tokens=max_tokens or n, temperature=0, ignore_eos=True))


def warm_up(engine: EmbeddedEngine, reqs, max_tokens: int) -> None:
    submit(engine, reqs, "w", max_tokens)
    while engine.has_work():
        engine.step()


def decode(args) -> None:
    cfg = model_config(args.shape)
    # Outputs long enough that the first requests still decode when the last prompt is
    # computed (about batch x prompt / 2,048 steps), and a pool that holds every request
    # whole: none waits, so the profiled steps run the whole batch.
    new_tokens = args.batch * args.prompt_len // 2048 + 64 + args.steps
    engine = EmbeddedEngine(EngineConfig(device="cuda", dtype="bfloat16", max_seq_len=4096, cuda_graphs=args.graphs,
                                         max_batch_size=max(256, args.batch), quantization=args.quantization,
                                         kernels=apply(args.variant),
                                         kv_cache=KvCacheConfig(max_tokens=args.batch * (args.prompt_len + new_tokens) + 4096,
                                                                dtype=args.kv_cache_dtype)), cfg)
    gen = torch.Generator().manual_seed(0)
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    for i in range(args.batch):
        engine.submit(str(i), torch.randint(0, cfg.vocab_size, (args.prompt_len,), generator=gen).tolist(), params)
    # Every prompt computed first (a large batch of long prompts takes many steps), then
    # a few steady decode steps before the profiled ones.
    while engine.scheduler.waiting or any(s.num_uncomputed > 1 for s in engine.scheduler.running):
        engine.step()
    for _ in range(4):
        engine.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            engine.step()
        torch.cuda.synchronize()
    if args.graphs:
        args.what = f"batch {args.batch}"
        timeline(prof, args, cfg.num_layers)
        return
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA" or getattr(e, "self_device_time_total", 0)]
    total = sum(e.self_device_time_total for e in events)
    print(f"\n{args.shape}, {args.quantization} projections, {args.kv_cache_dtype} KV cache, batch {args.batch}, "
          f"context ~{args.prompt_len}: device time per step {total / args.steps:.1f} us")
    print(f"{'us/step':>8} {'calls/step':>10} {'us/call':>8}  kernel")
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:25]:
        per_step = e.self_device_time_total / args.steps
        calls = e.count / args.steps
        print(f"{per_step:>8.1f} {calls:>10.1f} {per_step / calls if calls else 0:>8.2f}  {e.key[:110]}")


def kernel_events(prof) -> list[dict]:
    """The profile's kernels (and copies) from its Chrome trace, with grid sizes, by start."""
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            trace = json.load(f)
    finally:
        os.unlink(path)
    evs = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    return sorted(evs, key=lambda e: e["ts"])


def timeline(prof, args, layers: int) -> None:
    """Charge each kernel of the replayed steps the time it alone holds on the timeline.
    A gap of more than `--host-gap-us` with no kernel running is counted as host time
    between steps, shorter gaps as launch gaps inside a step."""
    evs = kernel_events(prof)
    if not evs:
        print("no kernel events recorded (this torch/CUPTI does not trace kernels inside CUDA graph replays)")
        return
    rows = collections.defaultdict(lambda: {"calls": 0, "dur_us": 0.0, "held_us": 0.0})
    gaps_in = gaps_between = 0.0
    end = evs[0]["ts"]

    def kind(e) -> str:
        grid = e.get("args", {}).get("grid")
        return f"{e['name'][:70]} grid={grid[0] if isinstance(grid, list) else '-'}"

    # A kind launched k times a layer (o_proj and down_proj may share a grid) gets "#i":
    # its i-th launch within each layer, in order.
    per_layer = {k: c // (args.steps * layers) for k, c in collections.Counter(map(kind, evs)).items()
                 if c % (args.steps * layers) == 0 and c // (args.steps * layers) > 1}
    seen = collections.Counter()
    for e in evs:
        start, stop = e["ts"], e["ts"] + e["dur"]
        gap = start - end
        if gap > args.host_gap_us:
            gaps_between += gap
        elif gap > 0:
            gaps_in += gap
        key = kind(e)
        if key in per_layer:
            i = seen[key] % per_layer[key]
            seen[key] += 1
            key = f"{key} #{i}"
        r = rows[key]
        r["calls"] += 1
        r["dur_us"] += e["dur"]
        r["held_us"] += max(0.0, stop - max(start, end))
        end = max(end, stop)
    span = end - evs[0]["ts"]
    n = args.steps
    held = sum(r["held_us"] for r in rows.values())
    print(f"\n{args.shape}, {args.quantization} projections, {args.kv_cache_dtype} KV cache, {args.what}, CUDA graphs: "
          f"{span / n:.1f} us a step from the first kernel to the last; kernels hold {held / n:.1f}, "
          f"gaps inside steps {gaps_in / n:.1f}, gaps over {args.host_gap_us:g} us (host) {gaps_between / n:.1f}")
    print(f"{'held us/step':>12} {'calls/step':>10} {'us/call':>8} {'held/call':>9}  kernel")
    table = sorted(rows.items(), key=lambda kv: -kv[1]["held_us"])
    for key, r in table[:40]:
        calls = r["calls"] / n
        print(f"{r['held_us'] / n:>12.1f} {calls:>10.1f} {r['dur_us'] / r['calls']:>8.2f} {r['held_us'] / r['calls']:>9.2f}  {key}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"shape": args.shape, "quantization": args.quantization, "kv_cache_dtype": args.kv_cache_dtype,
                       "what": args.what, "batch": getattr(args, "batch", None), "steps": n, "device": torch.cuda.get_device_name(), **getattr(args, "extra", {}),
                       "span_us_per_step": span / n, "held_us_per_step": held / n, "gaps_in_us_per_step": gaps_in / n,
                       "host_gaps_us_per_step": gaps_between / n,
                       "kernels": [{"kernel": k, **{f: v / n for f, v in r.items()}} for k, r in table]}, f, indent=1)


def offline(args) -> None:
    cfg = model_config(args.shape)
    reqs = workload(args.requests, cfg.vocab_size)
    engine = EmbeddedEngine(EngineConfig(device="cuda", dtype="bfloat16", max_seq_len=2048, quantization=args.quantization,
                                         kv_cache=KvCacheConfig(dtype=args.kv_cache_dtype)), cfg)
    warm_up(engine, reqs[:8], 8)
    submit(engine, reqs)
    kinds = collections.Counter()
    times = collections.defaultdict(float)
    # The model runner's forward passes by kind, timed: EngineStats counts them
    # (steps_graph, steps_eager) but does not time them.
    orig_run = engine.runner.run

    def run(chunks, eos):
        kind = "decode-only" if all(c.num_tokens == 1 for c in chunks) else "mixed"
        t = time.perf_counter()
        out = orig_run(chunks, eos)
        times[kind] += time.perf_counter() - t
        kinds[kind] += 1
        return out

    engine.runner.run = run
    prof = cProfile.Profile()
    t = time.perf_counter()
    prof.enable()
    while engine.has_work():
        engine.step()
    prof.disable()
    torch.cuda.synchronize()
    print(f"\n{args.requests} requests in {time.perf_counter() - t:.1f}s; steps: " +
          ", ".join(f"{k} {kinds[k]} ({1000 * times[k] / kinds[k]:.1f} ms each)" for k in kinds))
    pstats.Stats(prof).sort_stats("tottime").print_stats(25)


def window(args) -> None:
    from bench.offline_throughput import fixed_lengths

    cfg = model_config(args.shape)
    if len(args.lengths) not in (2, 4):
        raise SystemExit("--lengths takes IN OUT (fixed) or PMIN PMAX OMIN OMAX (uniform ranges)")
    lengths = fixed_lengths(args.lengths) if len(args.lengths) == 2 else tuple(args.lengths)
    reqs = workload(args.requests, cfg.vocab_size, lengths=lengths)
    engine = EmbeddedEngine(EngineConfig(device="cuda", dtype="bfloat16", max_seq_len=max(2048, lengths[1] + lengths[3]),
                                         max_batch_size=args.max_batch_size, max_num_tokens=args.max_num_tokens,
                                         overlap_scheduler="on", quantization=args.quantization,
                                         step_time_target_ms=args.step_time_target_ms,
                                         kernels=KernelConfig(decode_order=args.decode_order, decode_kernel=args.decode_kernel),
                                         kv_cache=KvCacheConfig(dtype=args.kv_cache_dtype)), cfg)
    warm_up(engine, reqs[:16], 16)
    submit(engine, reqs)
    made_up = collections.Counter()
    orig_run = engine.runner.run

    def run(chunks, eos):  # the steps' make-up, inside the window
        if recording:
            made_up["steps"] += 1
            for c in chunks:
                if c.num_tokens == 1:
                    made_up["decodes"] += 1
                    made_up["decode_context"] += c.seq.num_computed + 1
                else:
                    made_up["prompt_tokens"] += c.num_tokens
                    made_up["prompt_chunks"] += 1
        return orig_run(chunks, eos)

    engine.runner.run = run
    recording = False
    t = time.perf_counter()
    for _ in range(args.skip):
        engine.step()
    torch.cuda.synchronize()
    recording = True
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        w = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - w
    recording = False
    while engine.has_work():
        engine.step()
    torch.cuda.synchronize()
    total = time.perf_counter() - t
    n = made_up["steps"]
    mix = {k: v / max(n, 1) for k, v in made_up.items() if k != "steps"}
    shown = "/".join(map(str, args.lengths)) if len(args.lengths) == 2 else "{}-{}/{}-{}".format(*args.lengths)
    args.what = (f"{shown} x {args.requests}, steps {args.skip}-{args.skip + args.steps}, max_num_tokens "
                 f"{engine.max_num_tokens}, max_batch_size {args.max_batch_size}, step target {args.step_time_target_ms:g} ms")
    args.extra = {"wall_ms_per_step": 1000 * wall / args.steps, "whole_run_s": total, "step_mix": mix,
                  "output_tok_per_s_whole_run": sum(o for _, o in reqs) / total}
    print(f"\nwindow: {1000 * wall / args.steps:.2f} ms a step of wall time; a step holds {mix.get('decodes', 0):.0f} decodes "
          f"reading {mix.get('decode_context', 0) / max(mix.get('decodes', 1), 1):.0f} tokens each, "
          f"{mix.get('prompt_tokens', 0):.0f} prompt tokens in {mix.get('prompt_chunks', 0):.1f} chunks; the whole run "
          f"{total:.1f}s ({args.extra['output_tok_per_s_whole_run']:.0f} output tok/s, the profiled window included)")
    timeline(prof, args, cfg.num_layers)


def step(args) -> None:
    cfg = model_config(args.shape)
    engine = EmbeddedEngine(EngineConfig(device="cuda", dtype="bfloat16", max_seq_len=2048, quantization=args.quantization,
                                         kv_cache=KvCacheConfig(dtype=args.kv_cache_dtype)), cfg)
    reqs = workload(48, cfg.vocab_size)
    warm_up(engine, reqs[:4], 4)
    submit(engine, reqs)
    for label in ("mixed step", "decode-only step"):
        if label == "decode-only step":
            # Until no prompt is left to compute: EngineStats counts the waiting requests
            # but not the running ones still prefilling.
            while engine.scheduler.waiting or any(s.num_uncomputed > 1 for s in engine.scheduler.running):
                engine.step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            engine.step()
            torch.cuda.synchronize()
        print(f"\n== {label}")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    modes = ap.add_subparsers(dest="mode", required=True)
    shape = argparse.ArgumentParser(add_help=False)
    shape.add_argument("--shape", default="llama-3.2-1b", choices=sorted(SHAPES))
    shape.add_argument("--quantization", default="none", choices=["none", "fp8", "int8-weight-only", "int8-smoothquant"])
    shape.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"])
    p = modes.add_parser("decode", parents=[shape], help="kernels of steady decode steps, no CUDA graphs (torch.profiler)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=192)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--graphs", action="store_true", help="replay the CUDA graphs as serving does; each kernel charged "
                   "the part of the timeline it alone holds")
    p.add_argument("--variant", default="all", help="kernel variant, as bench.decode_latency's --variants (e.g. all+fma)")
    p.add_argument("--host-gap-us", type=float, default=20.0, help="with --graphs: gaps longer than this count as host time between steps")
    p.add_argument("--out", default="", help="with --graphs: write the table as JSON here")
    p = modes.add_parser("offline", parents=[shape], help="host time of the offline workload's steps (cProfile)")
    p.add_argument("--requests", type=int, default=192)
    modes.add_parser("step", parents=[shape], help="kernels of one mixed and one decode-only step (torch.profiler)")
    p = modes.add_parser("window", parents=[shape], help="kernels and idle time of a window of steps in an offline run at "
                         "fixed lengths or length ranges (torch.profiler, CUDA graphs as served)")
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 128],
                   help="IN OUT: every request's prompt and output tokens; or PMIN PMAX OMIN OMAX: uniform ranges")
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--max-batch-size", type=int, default=512)
    p.add_argument("--max-num-tokens", type=int, default=None, help="the engine's max_num_tokens (unset: its default)")
    p.add_argument("--step-time-target-ms", type=float, default=0.0,
                   help="the engine's step_time_target_ms (0: off, steps sized by max_num_tokens alone; serving's default is 15)")
    p.add_argument("--decode-order", default=KernelConfig.decode_order, choices=["arrival", "longest-first"],
                   help="KernelConfig.decode_order: the decode rows and the paged-decode kernel's programs")
    p.add_argument("--decode-kernel", default=KernelConfig.decode_kernel, choices=["paged", "flat"],
                   help="KernelConfig.decode_kernel: the decodes' attention kernel")
    p.add_argument("--skip", type=int, default=300, help="steps run before the window")
    p.add_argument("--steps", type=int, default=20, help="steps in the window")
    p.add_argument("--host-gap-us", type=float, default=20.0, help="gaps longer than this count as host time between steps")
    p.add_argument("--out", default="", help="write the table as JSON here")
    args = ap.parse_args()
    {"decode": decode, "offline": offline, "step": step, "window": window}[args.mode](args)


if __name__ == "__main__":
    main()
