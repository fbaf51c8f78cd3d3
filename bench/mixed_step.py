"""Engine steps that carry prompt tokens, the steps continuous arrivals make: D running
decodes plus one new prompt of P tokens in every step, timed back to back on a GPU, with
mixed steps replayed from CUDA graphs against the same steps with graphs off (every step
launched from Python) in the same run. P = 0 is
the decode-only step for reference. Also reports how long the engine took to start
(graph capture included) and Triton compiles after start-up (0 expected). Random weights
of a real shape; prints a table and writes JSON.

    python -m bench.mixed_step --shape llama-3.2-1b --decodes 16 64 128 --prompts 0 16 128 512 2048 --out mixed_step.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from bench.shapes import SHAPES, model_config
from inflight.sampling_params import SamplingParams
from worker.embedded.engine import EmbeddedEngine
from worker.engine_api import EngineConfig, KernelConfig, KvCacheConfig


def decode_tokens(steps: int, windows: int = 5) -> int:
    """max_tokens of the running decodes: their whole run, and no more (the KV cache
    reserves every request's whole lifetime)."""
    return 4 + windows * steps + 8


def time_steps(engine: EmbeddedEngine, decodes: int, prompt: int, steps: int, gen: torch.Generator, context: int = 128,
               windows: int = 5) -> float:
    """ms per step, the median over `windows` runs of `steps` steps, each step carrying
    `decodes` decodes and a new `prompt`-token request (asking one token)."""
    vocab = engine.vocab_size
    # The decodes' own prompts take a few steps first, in which the earliest already decode.
    warm = -(-decodes * context // engine.max_num_tokens) + 4
    long = SamplingParams(max_tokens=decode_tokens(steps, windows) + warm, temperature=0, ignore_eos=True)
    one = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    tag = f"d{decodes}p{prompt}"
    for i in range(decodes):
        engine.submit(f"{tag}-{i}", torch.randint(0, vocab, (context,), generator=gen).tolist(), long)
    while engine.scheduler.waiting or any(s.num_uncomputed > 1 for s in engine.scheduler.running):
        engine.step()  # the decodes' prompts, over as many steps as they take
    for _ in range(4):
        engine.step()
    assert len(engine.scheduler.running) == decodes and not engine.scheduler.waiting, "the decodes did not all start"
    times = []
    n = produced = 0
    for _ in range(windows):
        prompts = [torch.randint(0, vocab, (prompt,), generator=gen).tolist() for _ in range(steps)] if prompt else []
        torch.cuda.synchronize()
        t = time.perf_counter()
        for i in range(steps):
            if prompt:
                engine.submit(f"{tag}-new-{n}", prompts[i], one)
                n += 1
            produced += sum(len(o.new_token_ids) for o in engine.step())
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    # Every step must have carried every decode and the new prompt (one step of lag: overlap).
    want = windows * steps * (decodes + (1 if prompt else 0))
    assert produced >= want - 2 * (decodes + 1), f"{produced} tokens where every step would give {want}: steps were not full"
    for rid in list(engine.requests):
        engine.abort(rid)
    while engine.has_work():
        engine.step()
    return 1000 * sorted(times)[windows // 2] / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-3.2-1b", choices=sorted(SHAPES))
    ap.add_argument("--decodes", type=int, nargs="+", default=[16, 64, 128], help="running decodes in every step")
    ap.add_argument("--prompts", type=int, nargs="+", default=[0, 16, 128, 512, 2048],
                    help="prompt tokens of the request added before every step (0: decode-only steps)")
    ap.add_argument("--max-num-tokens", type=int, default=None, help="the engine's step budget (default: the engine's)")
    ap.add_argument("--steps", type=int, default=30, help="steps per timed window (the median of 5 windows is reported)")
    ap.add_argument("--context", type=int, default=128, help="prompt tokens of each running decode (its context, plus what it generates)")
    ap.add_argument("--against", choices=["eager", "varlen-decodes"], default="eager",
                    help="the baseline side: graphs off (eager), or graphs with every row of a mixed step in the paged "
                         "varlen kernel (KernelConfig.mixed_decode_kernel off)")
    ap.add_argument("--out", default="mixed_step.json")
    args = ap.parse_args()

    cfg = model_config(args.shape)
    gen = torch.Generator().manual_seed(0)
    warm = -(-max(args.decodes) * args.context // 512) + 4  # steps the decodes' prompts take, at least (time_steps)
    kv = KvCacheConfig(tokens_per_block=32, max_tokens=max(args.decodes) * (args.context + decode_tokens(args.steps) + warm + 64)
                       + 4 * max(args.prompts) + 8192)
    rows, starts = [], {}
    for graphs in (True, False):  # False: the baseline side
        t0 = time.perf_counter()
        baseline = not graphs
        # Steps of a fixed make-up: no budget by time (step_time_target_ms), which would chunk the prompts.
        engine = EmbeddedEngine(EngineConfig(device="cuda", dtype="bfloat16", kv_cache=kv, max_seq_len=4096,
                                             max_batch_size=max(args.decodes) + 8, max_num_tokens=args.max_num_tokens,
                                             cuda_graphs=graphs or args.against != "eager", step_time_target_ms=0,
                                             kernels=KernelConfig(mixed_decode_kernel=not (baseline and args.against == "varlen-decodes"))),
                                cfg)
        starts[graphs] = time.perf_counter() - t0
        for d in args.decodes:
            for p in args.prompts:
                if p + d > engine.max_num_tokens:
                    continue
                before = engine.stats()
                ms = time_steps(engine, d, p, args.steps, gen, args.context)
                after = engine.stats()
                rows.append({"cuda_graphs": graphs, "decodes": d, "prompt": p, "ms_per_step": ms,
                             "graph_steps": after.steps_graph - before.steps_graph, "eager_steps": after.steps_eager - before.steps_eager,
                             "late_compiles": after.kernel_compiles_late})
        del engine
        torch.cuda.empty_cache()

    base = "eager" if args.against == "eager" else "varlen"
    print(f"\n{args.shape} mixed steps on {torch.cuda.get_device_name()}, bf16, decodes over {args.context}-token prompts; "
          f"engine start: graphs {starts[True]:.1f} s, baseline ({args.against}) {starts[False]:.1f} s")
    print(f"{'decodes':>7} {'prompt':>6} {'graphs ms':>9} {base + ' ms':>9} {base + '/graphs':>12} {'graph steps':>11} {'late compiles':>13}")
    eager = {(r["decodes"], r["prompt"]): r for r in rows if not r["cuda_graphs"]}
    for r in rows:
        if not r["cuda_graphs"]:
            continue
        e = eager[r["decodes"], r["prompt"]]
        share = r["graph_steps"] / max(1, r["graph_steps"] + r["eager_steps"])
        print(f"{r['decodes']:>7} {r['prompt']:>6} {r['ms_per_step']:>9.3f} {e['ms_per_step']:>9.3f} "
              f"{e['ms_per_step'] / r['ms_per_step']:>11.2f}x {share:>10.0%} {r['late_compiles']:>13}")
    with open(args.out, "w") as f:
        json.dump({"shape": args.shape, "device": torch.cuda.get_device_name(), "against": args.against, "context": args.context,
                   "start_s": {"graphs": starts[True], "baseline": starts[False]},
                   "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
