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
from worker.embedded.kernels import paged_decode
from worker.engine_api import EngineConfig, KernelConfig, KvCacheConfig


def decode_tokens(steps: int, windows: int = 5) -> int:
    """max_tokens of the running decodes: their whole run, and no more (the KV cache
    reserves every request's whole lifetime)."""
    return 4 + windows * steps + 8


def decode_kernel_alone(engine: EmbeddedEngine, variants: dict[str, dict], repeats: int = 20) -> dict[str, float]:
    """The running decodes' attention timed outside the graphs: the paged-decode kernel
    over their real block tables and lengths, once for each layer's cache in turn (as a
    step meets them), us a layer, for each set of launch keywords in `variants`."""
    runner, cfg = engine.runner, engine.model_config
    seqs = list(engine.scheduler.running)
    W = max(len(s.block_table) for s in seqs)
    tables = torch.zeros(len(seqs), W, dtype=torch.int32)
    for i, s in enumerate(seqs):
        tables[i, : len(s.block_table)] = torch.tensor(s.block_table, dtype=torch.int32)
    tables = tables.cuda()
    ctx = torch.tensor([s.num_computed for s in seqs], dtype=torch.int32, device="cuda")
    q = torch.randn(len(seqs), cfg.num_heads, cfg.head_dim, dtype=torch.bfloat16, device="cuda")
    out = torch.empty_like(q)
    got = {}
    for name, kw in variants.items():
        kw = dict(kw)
        wide = kw.pop("int64", 0)  # tables and lengths in int64, as the graphs held them before they went int32
        t, c = (tables.long(), ctx.long()) if wide else (tables, ctx)

        def layers():
            for k_cache, v_cache in runner.kv_caches:
                engine_decode(q, k_cache, v_cache, t, c, cfg.head_dim ** -0.5, out, pdl=False, **kw)
        layers()  # compiles
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            layers()
        end.record()
        end.synchronize()
        got[name] = 1000 * start.elapsed_time(end) / (repeats * len(runner.kv_caches))
    return got


engine_decode = paged_decode.paged_decode_attention
# Launch keywords of the paged-decode kernel timed by --kernel-alone.
ALONE_VARIANTS = {"engine": {}, "int64 inputs": {"int64": 1}, "splits 4": {"splits": 4}, "warps 8": {"num_warps": 8},
                  "tile 128": {"tile": 128}, "tile 128, int64": {"tile": 128, "int64": 1}}


def time_steps(engine: EmbeddedEngine, decodes: int, prompt: int, steps: int, gen: torch.Generator, context: int = 128,
               windows: int = 5, alone: dict | None = None) -> float:
    """ms per step, the median over `windows` runs of `steps` steps, each step carrying
    `decodes` decodes and a new `prompt`-token request (asking one token). With `alone`
    (a dict), the decodes' attention is also timed outside the graphs into it."""
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
    if alone is not None:
        alone.update(decode_kernel_alone(engine, ALONE_VARIANTS))
    for rid in list(engine.requests):
        engine.abort(rid)
    while engine.has_work():
        engine.step()
    return 1000 * sorted(times)[windows // 2] / steps


def with_launch(launch: dict[str, int]):
    """The paged-decode kernel with these launch keywords over whatever its caller passes."""
    def call(*args, **kwargs):
        return engine_decode(*args, **{**kwargs, **launch})
    return call


def parse_launch(text: str) -> dict[str, int]:
    """'splits=4,num_warps=8' -> {'splits': 4, 'num_warps': 8}."""
    try:
        return {k: int(v) for k, v in (item.split("=") for item in text.split(","))}
    except ValueError:
        raise argparse.ArgumentTypeError(f"launch variant {text!r}: expected KEY=INT[,KEY=INT...]") from None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-3.2-1b", choices=sorted(SHAPES))
    ap.add_argument("--decodes", type=int, nargs="+", default=[16, 64, 128], help="running decodes in every step")
    ap.add_argument("--prompts", type=int, nargs="+", default=[0, 16, 128, 512, 2048],
                    help="prompt tokens of the request added before every step (0: decode-only steps)")
    ap.add_argument("--max-num-tokens", type=int, default=None, help="the engine's step budget (default: the engine's)")
    ap.add_argument("--steps", type=int, default=30, help="steps per timed window (the median of 5 windows is reported)")
    ap.add_argument("--context", type=int, nargs="+", default=[128],
                    help="prompt tokens of each running decode (its context, plus what it generates); several values: "
                         "each on the same engines, and what a context token adds a step between the first two")
    ap.add_argument("--against", choices=["eager", "varlen-decodes", "decode-launch"], default="eager",
                    help="the baseline side: graphs off (eager), graphs with every row of a mixed step in the paged "
                         "varlen kernel (KernelConfig.mixed_decode_kernel off), or graphs whose paged-decode kernel "
                         "launches as each --baseline-launch variant says (a side each)")
    ap.add_argument("--baseline-launch", nargs="+", type=parse_launch, default=[], metavar="KEY=INT[,KEY=INT]",
                    help="with --against decode-launch: the paged-decode kernel's launch keywords, one side per "
                         "variant, e.g. splits=4 num_warps=8 tile=128,num_stages=2")
    ap.add_argument("--kernel-alone", action="store_true",
                    help="also time the decodes' attention outside the graphs, on their real block tables, per launch "
                         "variant (us a layer), at each context's decode-only point (those variants' compiles then "
                         "count in the late-compiles column)")
    ap.add_argument("--out", default="mixed_step.json")
    args = ap.parse_args()
    if args.against == "decode-launch" and not args.baseline_launch:
        ap.error("--against decode-launch needs at least one --baseline-launch variant")

    cfg = model_config(args.shape)
    gen = torch.Generator().manual_seed(0)
    context = max(args.context)
    warm = -(-max(args.decodes) * context // 512) + 4  # steps the decodes' prompts take, at least (time_steps)
    kv = KvCacheConfig(tokens_per_block=32, max_tokens=max(args.decodes) * (context + decode_tokens(args.steps) + warm + 64)
                       + 4 * max(args.prompts) + 8192)
    # Sides: (name, CUDA graphs, kernel config, the paged-decode kernel's launch keywords).
    sides = [("graphs", True, KernelConfig(), {})]
    if args.against == "eager":
        sides.append(("eager", False, KernelConfig(), {}))
    elif args.against == "varlen-decodes":
        sides.append(("varlen", True, KernelConfig(mixed_decode_kernel=False), {}))
    else:
        sides += [(",".join(f"{k}={v}" for k, v in launch.items()), True, KernelConfig(), launch)
                  for launch in args.baseline_launch]
    rows, starts = [], {}
    for name, graphs, kernels, launch in sides:
        t0 = time.perf_counter()
        # attention.py looks the kernel up at each call: the graphs capture this side's launch
        paged_decode.paged_decode_attention = with_launch(launch) if launch else engine_decode
        # Steps of a fixed make-up: no budget by time (step_time_target_ms), which would chunk the prompts.
        engine = EmbeddedEngine(EngineConfig(device="cuda", dtype="bfloat16", kv_cache=kv, max_seq_len=4096,
                                             max_batch_size=max(args.decodes) + 8, max_num_tokens=args.max_num_tokens,
                                             cuda_graphs=graphs, step_time_target_ms=0, kernels=kernels), cfg)
        starts[name] = time.perf_counter() - t0
        for c in args.context:
            for d in args.decodes:
                for p in args.prompts:
                    if p + d > engine.max_num_tokens:
                        continue
                    before = engine.stats()
                    alone = {} if args.kernel_alone and name == "graphs" and p == 0 else None
                    ms = time_steps(engine, d, p, args.steps, gen, c, alone=alone)
                    after = engine.stats()
                    if alone:
                        print(f"decode kernel alone, {d} decodes over ~{c} tokens, us a layer: "
                              + ", ".join(f"{k} {v:.1f}" for k, v in alone.items()), flush=True)
                    rows.append({"side": name, "cuda_graphs": graphs, "context": c, "decodes": d, "prompt": p,
                                 "ms_per_step": ms, "kernel_alone_us": alone,
                                 "graph_steps": after.steps_graph - before.steps_graph,
                                 "eager_steps": after.steps_eager - before.steps_eager,
                                 "late_compiles": after.kernel_compiles_late})
        del engine
        torch.cuda.empty_cache()
    paged_decode.paged_decode_attention = engine_decode

    others = [name for name, *_ in sides[1:]]
    print(f"\n{args.shape} mixed steps on {torch.cuda.get_device_name()}, bf16; engine start: "
          + ", ".join(f"{k} {v:.1f} s" for k, v in starts.items()))
    print(f"{'context':>7} {'decodes':>7} {'prompt':>6} {'graphs ms':>9} " + " ".join(f"{o + ' ms (x)':>22}" for o in others)
          + f" {'graph steps':>11} {'late compiles':>13}")
    by = {(r["side"], r["context"], r["decodes"], r["prompt"]): r for r in rows}
    for r in rows:
        if r["side"] != "graphs":
            continue
        key = (r["context"], r["decodes"], r["prompt"])
        cells = []
        for o in others:
            b = by[(o, *key)]["ms_per_step"]
            ratio = b / r["ms_per_step"]
            cells.append(f"{f'{b:.3f} ({ratio:.2f}x)':>22}")
        share = r["graph_steps"] / max(1, r["graph_steps"] + r["eager_steps"])
        print(f"{r['context']:>7} {r['decodes']:>7} {r['prompt']:>6} {r['ms_per_step']:>9.3f} " + " ".join(cells)
              + f" {share:>10.0%} {r['late_compiles']:>13}")
    if len(args.context) > 1:  # what a decode's context token adds to a step, per side
        lo, hi = args.context[0], args.context[1]
        for name, *_ in sides:
            for d in args.decodes:
                for p in args.prompts:
                    a, b = by.get((name, lo, d, p)), by.get((name, hi, d, p))
                    if a and b:
                        per = (b["ms_per_step"] - a["ms_per_step"]) * 1000 / (d * (hi - lo))
                        print(f"{name}: {d} decodes + prompt {p}: a context token adds {per * 1000:.1f} ns a step")
    with open(args.out, "w") as f:
        json.dump({"shape": args.shape, "device": torch.cuda.get_device_name(), "against": args.against,
                   "sides": [{"name": n, "cuda_graphs": g, "launch": l} for n, g, _, l in sides],
                   "contexts": args.context, "start_s": starts, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
