"""Times the paged-decode attention kernel (worker/embedded/kernels/paged_decode.py) over
a grid of launch configurations (split count, tile, warps, pipeline stages) for the decode
batches serving meets, timed inside a CUDA graph that cycles through enough copies of the
KV cache to overflow L2, with each sequence's blocks scattered over the cache as a long-
running server leaves them. Prints, per case, the configuration the engine picks today
and the best one found, as time and KV bytes read per second; checks the best against a
float64 reference. Writes every timing as JSON, with the shared memory, registers and
spills of the kernel each configuration compiled to (what bounds the programs an SM holds).

With `--kv-cache-dtype fp8` the cache is float8 E4M3 and each configuration is also timed
reading it through Triton's own cast (`fp8_read` "cast", the kernel before kv_tile.py's
word reads): the "cast" column is that baseline at the engine's configuration (its split
count and tile, paged_decode.num_splits and wide_tile; 2 stages over an FP8 cache, Triton's
default 3 over a 16-bit one).

`--orders` sorts the rows by context and `--grids rows-outer` starts the programs row by
row (KernelConfig.decode_order "longest-first" is both); `--pad-rows` adds the length-0 rows
of a CUDA graph captured for more rows than it runs:

    python -m bench.paged_decode_tune --heads 8b --batches 127 --contexts mixed --pad-rows 33 \
        --orders given longest-first --grids heads-outer rows-outer --splits 1 2 --tiles 64 128 --out pdt_order.json

    python -m bench.paged_decode_tune --out paged_decode_tune.json
    python -m bench.paged_decode_tune --kv-cache-dtype fp8 --batches 32 256 512 --contexts 1536 4096 mixed \
        --splits 1 4 --stages 0 --out paged_decode_tune_fp8.json
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import random

import torch
import triton.testing

from worker.embedded.attention import to_cache
from worker.embedded.kernels.paged_decode import (DECODE_FP8_READS, _num_sms, num_splits, paged_decode_attention,
                                                  paged_decode_reference, wide_tile)

HEADS = {"8b": (32, 8, 128), "1b": (32, 8, 64)}  # Hq, Hkv, head_dim (Llama-3-8B, Llama-3.2-1B)
BLOCK_SIZE = 32  # EngineConfig.tokens_per_block's default


def bench_us(fn, copies: int) -> float:
    return triton.testing.do_bench_cudagraph(fn, rep=15, return_mode="median") * 1000 / copies


def compiled() -> dict[int, dict]:
    """The decode kernel's compiled variants so far, each with the resources that bound how
    many programs an SM holds (shared memory bytes, registers a thread, spills); empty where
    this Triton keeps its cache otherwise."""
    from worker.embedded.kernels.paged_decode import _paged_decode

    try:
        return {id(k): {"shared": k.metadata.shared, "regs": getattr(k, "n_regs", None),
                        "spills": getattr(k, "n_spills", None)}
                for cache in _paged_decode.device_caches.values() for k in cache[0].values()}
    except Exception:  # noqa: BLE001 - Triton's internals, which vary by version: report nothing
        return {}


def make_case(heads: str, batch: int, context: str, gen: torch.Generator, cache_dtype: torch.dtype,
              order: str = "given", pad_rows: int = 0):
    Hq, Hkv, D = HEADS[heads]
    if context.startswith("mixed"):  # a serving mix: 128 to 1,536 tokens, or mixed:LO-HI
        lo, hi = map(int, context.removeprefix("mixed:").split("-")) if ":" in context else (128, 1536)
        lens = [random.Random(batch * 7919 + i).randint(lo, hi) for i in range(batch)]
    else:
        lens = [int(context)] * batch
    if order != "given":  # the rows by context, longest or shortest first (programs start in row order)
        lens.sort(reverse=order == "longest-first")
    lens += [0] * pad_rows  # a captured graph's padding rows: length 0, no blocks
    batch += pad_rows
    blocks_per = [-(-n // BLOCK_SIZE) for n in lens]
    total = sum(blocks_per)
    kv_bytes = sum(lens) * Hkv * D * 2 * cache_dtype.itemsize
    copies = max(1, -(-256 * 2**20 // max(kv_bytes, 1)))
    num_blocks = total + 1
    caches = [tuple(to_cache(torch.randn(num_blocks, BLOCK_SIZE, Hkv, D, device="cuda", generator=gen), cache_dtype)
                    for _ in range(2))
              for _ in range(copies)]
    order = torch.randperm(total, generator=torch.Generator().manual_seed(batch)) + 1  # scattered blocks; 0 stays unused
    width = max(blocks_per)
    tables = torch.zeros(batch, width, dtype=torch.int32)
    at = 0
    for i, n in enumerate(blocks_per):
        tables[i, :n] = order[at:at + n]
        at += n
    q = torch.randn(batch, Hq, D, device="cuda", generator=gen).to(torch.bfloat16)
    return q, caches, tables.cuda(), torch.tensor(lens, dtype=torch.int32, device="cuda"), kv_bytes


def candidate(grid: str, kw: dict):
    """kernels/flat_decode.py's kernel as paged_decode_attention is called, `grid` "flatN"
    giving N programs an SM over all KV heads. Its map of the tiles (flat_plan) is made at
    the first call, outside the timing; the engine makes it inside each step's graph (a few
    small tensor operations a step, not a layer)."""
    from worker.embedded.kernels.flat_decode import flat_decode_attention, flat_plan

    plan = None

    def call(q, k, v, tables, lens, scale, out=None):
        nonlocal plan
        if plan is None:
            programs = max(1, int(grid.removeprefix("flat")) * _num_sms(q.device) // k.shape[2])
            plan = flat_plan(lens, tables, k.shape[1], programs, kw["tile"], q.shape[1], q.shape[2])
        return flat_decode_attention(q, k, v, scale, torch.empty_like(q) if out is None else out, plan,
                                     num_warps=kw["num_warps"], num_stages=kw["num_stages"])

    return call


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heads", nargs="+", default=list(HEADS), choices=list(HEADS))
    ap.add_argument("--batches", type=int, nargs="+", default=[16, 64, 128, 256])
    ap.add_argument("--contexts", nargs="+", default=["1024", "4096", "mixed"],
                    help="tokens per sequence, or 'mixed' (each drawn from 128-1,536), or 'mixed:LO-HI' (e.g. mixed:128-256, "
                         "the decodes of trtllm-bench's 128/128)")
    ap.add_argument("--splits", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--tiles", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--warps", type=int, nargs="+", default=[4])
    ap.add_argument("--stages", type=int, nargs="+", default=[0, 2], help="pipeline stages; 0: Triton's default (3)")
    ap.add_argument("--kv-cache-dtype", choices=["bf16", "fp8"], default="bf16")
    ap.add_argument("--fp8-reads", nargs="+", choices=DECODE_FP8_READS, default=["words", "cast"],
                    help="with --kv-cache-dtype fp8, the reads to time (default words and cast; dot: the query in "
                         "float8 and K straight into the dot, an experiment)")
    ap.add_argument("--max-regs", type=int, nargs="+", default=[0],
                    help="caps on registers a thread (Triton's maxnreg; 0: none), so that more programs fit an SM")
    ap.add_argument("--orders", nargs="+", choices=["given", "longest-first", "shortest-first"], default=["given"],
                    help="the rows' order by context (mixed contexts): as drawn, or sorted")
    ap.add_argument("--grids", nargs="+", choices=["heads-outer", "rows-outer"], default=["heads-outer"],
                    help="the order the GPU starts programs in: by KV head, then row (the default) or row by row, each "
                         "row's heads together (KernelConfig.decode_order longest-first, with --orders longest-first)")
    ap.add_argument("--kernels", nargs="+", choices=["paged", "flat"], default=["paged"],
                    help="the engine's paged-decode kernel and/or kernels/flat_decode.py (KernelConfig.decode_kernel flat: each KV head's "
                         "context tiles cut into equal shares; --tiles, --warps and --stages apply, --splits and "
                         "--grids do not)")
    ap.add_argument("--flat-per-sm", type=int, nargs="+", default=[2, 4, 8],
                    help="with --kernels flat: its programs an SM, over all KV heads")
    ap.add_argument("--pad-rows", type=int, default=0,
                    help="rows of length 0 after the real ones, as a CUDA graph captured for more rows has")
    ap.add_argument("--out", default="paged_decode_tune.json")
    args = ap.parse_args()
    gen = torch.Generator(device="cuda")
    cache_dtype = torch.float8_e4m3fn if args.kv_cache_dtype == "fp8" else torch.bfloat16
    reads = args.fp8_reads if args.kv_cache_dtype == "fp8" else ("words",)  # a 16-bit cache has one read
    configs = list(itertools.product(args.splits, args.tiles, args.warps, args.stages, reads, args.max_regs, args.grids))
    if "flat" in args.kernels:  # kernels/flat_decode.py: no splits, words reads, its programs an SM as the grid
        configs += [(0, tile, warps, stages, "words", 0, f"flat{per_sm}")
                    for tile, warps, stages, per_sm in itertools.product(args.tiles, args.warps, args.stages, args.flat_per_sm)]
    if "paged" not in args.kernels:
        configs = [c for c in configs if c[-1].startswith("flat")]
    results = []
    resources = {}  # configuration -> its kernel's shared memory, registers and spills
    print(f"{'case':>22} {'today':>24} {'cast (baseline)':>24} {'best':>38}  rel err")
    for heads, batch, context, order in itertools.product(args.heads, args.batches, args.contexts, args.orders):
        gen.manual_seed(0)
        q, caches, tables, lens, kv_bytes = make_case(heads, batch, context, gen, cache_dtype, order, args.pad_rows)
        out = torch.empty_like(q)
        Hkv = HEADS[heads][1]
        fp8 = args.kv_cache_dtype == "fp8"
        # paged_decode_attention's own choice for these rows (padding rows included, as a graph has them)
        today_splits = num_splits(q.shape[0] * Hkv, _num_sms(q.device), tables.shape[1] * BLOCK_SIZE, 128 if fp8 else 64)
        engine_tile = wide_tile(fp8, today_splits, HEADS[heads][2])
        timings = []
        for config in configs:
            splits, tile, warps, stages, read, regs, grid = config
            kw = dict(tile=tile, num_warps=warps, num_stages=stages or None)
            call = candidate(grid, kw) if grid.startswith("flat") else functools.partial(
                paged_decode_attention, splits=splits, fp8_read=read, max_regs=regs or None,
                rows_outer=grid == "rows-outer", **kw)
            fn = lambda: [call(q, k, v, tables, lens, 0.1, out) for k, v in caches]  # noqa: E731
            try:
                before = compiled()
                fn()
                made = [r for i, r in compiled().items() if i not in before]  # this configuration's kernel
                if made:
                    resources[config] = made[0]
                us = bench_us(fn, len(caches))
            except Exception as exc:  # a configuration that does not fit (shared memory)
                print(f"  skip {kw}: {type(exc).__name__}")
                continue
            timings.append({"splits": splits, "tile": tile, "warps": warps, "stages": stages, "fp8_read": read,
                            "max_regs": regs, "grid": grid, "us": us, "tb_s": kv_bytes / us / 1e6, "kernel": resources.get(config)})
        best = min(timings, key=lambda t: t["us"])
        engine = (today_splits, engine_tile, 4, 2 if args.kv_cache_dtype == "fp8" else 0)
        today, cast = (next((t for t in timings if (t["splits"], t["tile"], t["warps"], t["stages"]) == engine
                             and t["fp8_read"] == read and not t["max_regs"] and t["grid"] == "heads-outer"), None)
                       for read in ("words", "cast"))
        k, v = caches[0]
        kw = dict(tile=best["tile"], num_warps=best["warps"], num_stages=best["stages"] or None)
        if best["grid"].startswith("flat"):
            y = candidate(best["grid"], kw)(q, k, v, tables, lens, 0.1)
        else:
            y = paged_decode_attention(q, k, v, tables, lens, 0.1, splits=best["splits"], fp8_read=best["fp8_read"],
                                       max_regs=best["max_regs"] or None, rows_outer=best["grid"] == "rows-outer", **kw)
        ref = paged_decode_reference(q, k.float(), v.float(), tables, lens, 0.1)
        err = ((y.double() - ref).norm() / ref.norm()).item()
        name = f"{heads} B={batch} ctx={context}" + ("" if order == "given" else f" {order}")
        t_s, c_s = (f"{t['us']:8.1f} us {t['tb_s']:4.2f} TB/s" if t else "-" for t in (today, cast))
        print(f"{name:>22} {t_s:>24} {c_s:>24} {best['us']:8.1f} us {best['tb_s']:4.2f} TB/s "
              f"{best['splits']}/{best['tile']}/{best['warps']}/{best['stages']}/{best['fp8_read']}/{best['max_regs']}/{best['grid']}  "
              f"{err:.1e}  {best['kernel']}", flush=True)
        results.append({"heads": heads, "batch": batch, "context": context, "order": order, "pad_rows": args.pad_rows,
                        "kv_bytes": kv_bytes,
                        "kv_cache_dtype": args.kv_cache_dtype, "today_splits": today_splits, "today": today,
                        "cast": cast, "best": best, "rel_err": err, "timings": timings})
        del caches
        torch.cuda.empty_cache()
        with open(args.out, "w") as f:  # after every case: a run cut short keeps what it measured
            json.dump({"gpu": torch.cuda.get_device_name(), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
