"""Times the paged varlen attention kernel (worker/embedded/kernels/paged_varlen.py: the
prompt chunks' attention inside mixed steps) over a grid of launch configurations (query
rows a program, context tokens an iteration, warps, pipeline stages), on the prompt chunks
that trtllm-bench's conditions put in a step, over a bf16 or an FP8 cache of scattered
32-token blocks. Timed inside a CUDA graph (`triton.testing.do_bench_cudagraph`); prints,
per case, the engine's configuration and the best found as time and attention TFLOPS (the
(query, key) pairs the causal mask leaves, times heads, head size and 4), and checks every
configuration against a float64 reference.

Cases (8B heads unless named): `2048x1` one fresh 2,048-token prompt; `2048/128` the step
trtllm-bench's 2,048/128 meets (the last 948 tokens of one prompt over its first 1,100,
and the first 980 of the next); `1000x2` two fresh 1,000-token prompts; `1b:...` the same
on the 1B shape's heads.

    python -m bench.paged_varlen_tune --kv-cache-dtype auto fp8 --out paged_varlen_tune.json
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
import triton.testing

from worker.embedded.attention import to_cache
from worker.embedded.kernels.paged_varlen import ROWS, block_q, paged_varlen_attention, paged_varlen_reference, tile_map

HEADS = {"8b": (32, 8, 128), "1b": (32, 8, 64)}  # Hq, Hkv, head_dim
BLOCK_SIZE = 32  # EngineConfig.tokens_per_block's default
CASES = {  # name: chunks as (tokens already cached, new tokens)
    "2048x1": [(0, 2048)],
    "2048/128": [(1100, 948), (0, 980)],
    "1000x2": [(0, 1000), (0, 1000)],
}


def make_case(heads: str, chunks: list[tuple[int, int]], cache_dtype: torch.dtype, gen: torch.Generator):
    Hq, Hkv, D = HEADS[heads]
    ctx = [a + n for a, n in chunks]
    qlen = [n for _, n in chunks]
    blocks_per = [-(-c // BLOCK_SIZE) for c in ctx]
    total = sum(blocks_per)
    k_cache, v_cache = (to_cache(torch.randn(total + 1, BLOCK_SIZE, Hkv, D, device="cuda", generator=gen), cache_dtype)
                        for _ in range(2))
    order = torch.randperm(total, generator=torch.Generator().manual_seed(total)) + 1  # scattered; block 0 unused
    tables = torch.zeros(len(chunks), max(blocks_per), dtype=torch.int32)
    at = 0
    for i, n in enumerate(blocks_per):
        tables[i, :n] = order[at:at + n]
        at += n
    T = sum(qlen)
    q = torch.randn(T, Hq, D, device="cuda", generator=gen).to(torch.bfloat16)
    starts = [sum(qlen[:i]) for i in range(len(qlen))]
    seq = [torch.tensor(x, dtype=torch.int32, device="cuda") for x in (starts, qlen, ctx)]
    pairs = sum(n * a + n * (n + 1) // 2 for a, n in chunks)
    return q, k_cache, v_cache, tables.cuda(), seq, qlen, pairs * Hq * D * 4


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kv-cache-dtype", nargs="+", default=["auto", "fp8"], choices=["auto", "fp8"])
    ap.add_argument("--cases", nargs="+", default=[*CASES, *(f"1b:{c}" for c in CASES)])
    ap.add_argument("--rows", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--tiles", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--stages", type=int, nargs="+", default=[0, 2, 3], help="0: Triton's default")
    ap.add_argument("--out", default="paged_varlen_tune.json")
    args = ap.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    results = []
    for dtype_name, case in itertools.product(args.kv_cache_dtype, args.cases):
        heads, _, name = case.rpartition(":")
        heads = heads or "8b"
        cache_dtype = torch.float8_e4m3fn if dtype_name == "fp8" else torch.bfloat16
        q, kc, vc, tables, seq, qlen, flops = make_case(heads, CASES[name], cache_dtype, gen)
        Hq, Hkv, D = HEADS[heads]
        scale = D ** -0.5
        ref = paged_varlen_reference(q, kc, vc, *seq, tables, scale)
        rows = []
        for r, tile, warps, stages in itertools.product(args.rows, args.tiles, args.warps, args.stages):
            tile_seq, tile_q = (torch.from_numpy(a).cuda() for a in tile_map(qlen, block_q(Hq // Hkv, r)))
            out = torch.empty_like(q)

            def run():
                paged_varlen_attention(q, kc, vc, out, tile_seq, tile_q, *seq, tables, scale, rows=r, tile=tile,
                                       num_warps=warps, num_stages=stages or None)

            try:
                run()
                torch.cuda.synchronize()
            except Exception as e:  # noqa: BLE001 - a configuration that does not compile (shared memory): recorded
                rows.append({"rows": r, "tile": tile, "warps": warps, "stages": stages, "error": str(e).splitlines()[0][:200]})
                continue
            err = ((out.double() - ref).norm() / ref.norm()).item()
            us = triton.testing.do_bench_cudagraph(run, rep=20, return_mode="median") * 1000
            rows.append({"rows": r, "tile": tile, "warps": warps, "stages": stages, "us": us, "tflops": flops / us / 1e6,
                         "rel_err": err})
        ok = [x for x in rows if "us" in x]
        engine = next((x for x in ok if x["rows"] == ROWS and x["tile"] == 64 and x["warps"] == 4 and x["stages"] == 0), None)
        best = min(ok, key=lambda x: x["us"]) if ok else None
        results.append({"case": case, "kv_cache_dtype": dtype_name, "chunks": CASES[name], "flops": flops, "configs": rows})
        fmt = lambda x: (f"{x['us']:.1f} us, {x['tflops']:.0f} TFLOPS (rows {x['rows']}, tile {x['tile']}, {x['warps']} warps, "  # noqa: E731
                         f"stages {x['stages'] or 'default'}, err {x['rel_err']:.1e})") if x else "-"
        print(f"{dtype_name:>4} {case:>12}: engine {fmt(engine)}\n{'':>18} best   {fmt(best)}", flush=True)
    bad = [(r["case"], r["kv_cache_dtype"], c) for r in results for c in r["configs"] if c.get("rel_err", 0) > 1e-2]
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "results": results, "bad": bad}, f, indent=1)
    if bad:
        raise SystemExit(f"configurations off the reference: {bad}")


if __name__ == "__main__":
    main()
