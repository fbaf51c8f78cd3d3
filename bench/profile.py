"""Profiles of the embedded engine on a GPU, random weights of a real shape; one mode a run:

decode   kernel-level (torch.profiler) profile of steady decode steps at a given batch
         size, without CUDA graphs so every kernel shows: where a decode step's device
         time goes.
offline  host-side (cProfile) profile of the offline workload through the engine: where
         the Python time of the steps goes. Prints the top functions and step counts.
step     GPU-side (torch.profiler) profile of one mixed prefill+decode step and of one
         decode-only step of the offline workload: the kernels that take the time.

    python -m bench.profile decode --shape llama-3.2-1b --batch 1
    python -m bench.profile decode --shape llama-3-8b --batch 400 --prompt-len 1500 --quantization fp8 --kv-cache-dtype fp8
    python -m bench.profile offline --shape llama-3.2-1b --requests 192
    python -m bench.profile step --shape llama-3.2-1b
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import pstats
import time

import torch
from torch.profiler import ProfilerActivity, profile

from bench.shapes import SHAPES, model_config
from bench.workload import workload
from inflight.sampling_params import SamplingParams
from worker.embedded.engine import EmbeddedEngine
from worker.engine_api import EngineConfig, KvCacheConfig


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
    engine = EmbeddedEngine(EngineConfig(device="cuda", dtype="bfloat16", max_seq_len=4096, cuda_graphs=False,
                                         max_batch_size=max(256, args.batch), quantization=args.quantization,
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
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA" or getattr(e, "self_device_time_total", 0)]
    total = sum(e.self_device_time_total for e in events)
    print(f"\n{args.shape}, {args.quantization} projections, {args.kv_cache_dtype} KV cache, batch {args.batch}, "
          f"context ~{args.prompt_len}: device time per step {total / args.steps:.1f} us")
    print(f"{'us/step':>8} {'calls/step':>10} {'us/call':>8}  kernel")
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:25]:
        per_step = e.self_device_time_total / args.steps
        calls = e.count / args.steps
        print(f"{per_step:>8.1f} {calls:>10.1f} {per_step / calls if calls else 0:>8.2f}  {e.key[:110]}")


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
    p = modes.add_parser("offline", parents=[shape], help="host time of the offline workload's steps (cProfile)")
    p.add_argument("--requests", type=int, default=192)
    modes.add_parser("step", parents=[shape], help="kernels of one mixed and one decode-only step (torch.profiler)")
    args = ap.parse_args()
    {"decode": decode, "offline": offline, "step": step}[args.mode](args)


if __name__ == "__main__":
    main()
